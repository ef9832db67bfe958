"""capture_dynamo: dynamo's graph of an HF MoE model -> the same region-tagged graph ``capture`` gives.

Contract::

    captured = from_dynamo(gm, example_inputs, root)   # inside a torch.compile backend
    captured(input_ids=ids, labels=ids).loss            # == model(input_ids=ids, labels=ids).loss
    # graph: parameters are get_attr of their original FQNs, each MoE layer's routed
    # experts one call_module(experts)(hidden, top_k_index, top_k_weights) node, and
    # every node tagged by capture.tag_regions -- what insert_dispatch/split_stages take.

Dynamo hands a backend one flat graph: parameters and buffers are placeholders whose
sources name them (``L['self']._modules['model']...._parameters['weight']``), module
calls are inlined, and ``nn_module_stack`` says which module each op came from. Three
rewrites make it the leaf tracer's graph, after which both front doors share the tagging,
the dispatch insertion, the split and the runtime:

    for placeholder p:   parameter/buffer -> get_attr(fqn of its source)
                         model input      -> placeholder named input_ids / attention_mask / labels
    for MoE layer l:     nodes whose module stack contains <experts of l>  ->  one call_module
                         (inputs told apart by dtype and shape: hidden rows [T, H] float,
                          top_k_index [T, K] integer, top_k_weights [T, K] float)
    output:              (loss, logits), or logits; dynamo's other outputs (the KV cache)
                         are listed in ``extra_outputs`` by position, shape and dtype

Everything it cannot map is a :class:`~fxdisag.capture.CaptureError` naming the module,
the reason and the fix: a graph break (a partial graph), a dynamic-shape graph, an experts
region with unexpected inputs, an unsupported input.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from fxdisag.capture import SUPPORTED_INPUTS, CapturedModel, CaptureError, depends_on, tag_regions
from fxdisag.layout import find_layout

__all__ = ["DynamoInputs", "DynamoOutputs", "dynamo_inputs", "dynamo_outputs", "from_dynamo", "graph_root"]

_INDEX = re.compile(r"\[(?:'([^']*)'|(\d+))\]")


@dataclass(frozen=True)
class DynamoOutputs:
    """How dynamo's flat outputs map onto the captured program's: position of the loss and
    of the logits, and (position, shape, dtype) of every other output."""

    count: int
    loss: int | None
    logits: int
    extra: tuple[tuple[int, tuple[int, ...], torch.dtype], ...]
    labels_alias: bool = False  # labels was the input_ids tensor itself: dynamo gave one placeholder


def _source_name(node: fx.Node) -> str:
    arg = node.meta.get("grapharg")
    if arg is None:
        raise CaptureError(
            f"dynamo placeholder {node.name!r} has no source; from_dynamo must run inside the backend call"
        )
    name = arg.source.name
    return name() if callable(name) else name


def _split_source(name: str) -> tuple[str, list[str]]:
    """``L['self']._modules['model']._parameters['w']`` -> ("self", ["_modules", "model", ...])."""
    m = re.match(r"L\['([^']+)'\]", name)
    if m is None:
        raise CaptureError(f"dynamo input {name} is not a local of the compiled frame")
    rest = name[m.end():]
    parts: list[str] = []
    for token in re.finditer(r"\.(\w+)|" + _INDEX.pattern, rest):
        parts.append(token.group(1) or token.group(2) or token.group(3))
    return m.group(1), parts


def graph_root(gm: fx.GraphModule) -> tuple[str, nn.Module]:
    """The compiled frame's local that owns the parameters (``self`` for ``torch.compile(model)``)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    locals_ = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            local, parts = _split_source(_source_name(node))
            if "_parameters" in parts or "_buffers" in parts:
                locals_.add(local)
    tx = InstructionTranslator.current_tx()
    root = tx.f_locals.get(next(iter(locals_))) if tx is not None and len(locals_) == 1 else None
    if not isinstance(root, nn.Module) or not _is_moe_model(root):
        raise _partial_graph_error(tx, f"it reads the parameters of {sorted(locals_) or 'no'} frame local(s)")
    return locals_.pop(), root


def _is_moe_model(module: nn.Module) -> bool:
    try:
        find_layout(module)
    except Exception:
        return False
    return hasattr(module, "config")


def _partial_graph_error(tx, why: str) -> CaptureError:
    """Dynamo handed over a graph that is not the whole model's forward: name the frame, and
    the experts modules when their implementation is the one dynamo cannot trace whole."""
    code = getattr(tx, "f_code", None)
    where = f"{code.co_name} ({code.co_filename}:{code.co_firstlineno})" if code is not None else "an unknown frame"
    found = []
    values = list(getattr(tx, "f_locals", {}).values()) if tx is not None else []
    # The frame that called the compiled model is on the Python stack (dynamo's own frame
    # may hold only arguments): its locals name the model (``OptimizedModule._orig_mod``).
    frame = sys._getframe(1)
    while frame is not None:
        values.extend(frame.f_locals.values())
        frame = frame.f_back
    values = [getattr(v, "_orig_mod", v) for v in values]
    seen: set[int] = set()
    while values:
        v = values.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, (tuple, list)):
            values.extend(v)
        elif isinstance(v, dict):
            values.extend(v.values())
        elif isinstance(v, nn.Module) and _is_moe_model(v):
            found.append(v)
    hint = ("find the graph breaks with torch._dynamo.explain(model)(**batch) and remove them, or use "
            "fxdisag.disaggregate(model, batch), which needs no graph")
    for model in found:
        impl = getattr(model.config, "_experts_implementation", None)
        if impl == "eager":
            layout = find_layout(model)
            cls = type(model.get_submodule(layout.moe[0].experts)).__name__
            return CaptureError(
                f"dynamo gave fxdisag part of {type(model).__name__}'s forward: a graph break in module "
                f"{layout.moe[0].experts!r} ({cls}) and the other experts modules: with experts_implementation="
                "'eager' they loop over the experts the batch hits, which dynamo cannot trace into one graph. "
                "Build the model with experts_implementation='grouped_mm' (or 'batched_mm'): "
                "from_config(cfg, experts_implementation='grouped_mm'), or set "
                "model.config._experts_implementation = 'grouped_mm'. Other breaks: " + hint)
    return CaptureError(f"dynamo gave fxdisag a graph of {where} that is not a whole HF MoE model's forward ({why}): "
                        "a graph break, or torch.compile of something else than the model. fxdisag needs the whole "
                        "forward in one graph: " + hint)


def _module_path(parts: Sequence[str]) -> tuple[str, str] | None:
    """("model.layers.0.q_proj.weight", "parameter"|"buffer") from a source path, else None."""
    names: list[str] = []
    kind = None
    it = iter(parts)
    for p in it:
        if p == "_modules":
            names.append(next(it))
        elif p in ("_parameters", "_buffers"):
            names.append(next(it))
            kind = p
        else:
            names.append(p)  # a plain attribute (e.g. an unspecialised module reached by getattr)
    if kind is None:
        return None
    return ".".join(names), kind


def _stack_fqn(path: str, local: str) -> str | None:
    prefix = f"L['{local}']"
    if path == prefix:
        return ""
    if path.startswith(prefix + "."):
        return path[len(prefix) + 1:]
    return None  # a function frame dynamo records (e.g. G[...].apply_rotary_pos_emb), not a module


def _normalise_stack(node: fx.Node, local: str) -> list[str]:
    """Capture's form: {key: (fqn relative to the model, class)}, module entries only."""
    stack = node.meta.get("nn_module_stack") or {}
    out, fqns = {}, []
    for key, (path, cls) in stack.items():
        fqn = _stack_fqn(path, local)
        if fqn is None:
            continue
        out[key] = (fqn if fqn else "model", cls)  # capture names the top module "model"
        fqns.append(fqn)
    node.meta["nn_module_stack"] = out
    return fqns


def _value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _experts_regions(gm: fx.GraphModule, layout, stacks: dict[fx.Node, list[str]], root: nn.Module):
    regions = {}
    for m in layout.moe:
        # Size arithmetic (SymInt values) stays in the graph: dynamo shares it across modules.
        nodes = [n for n in gm.graph.nodes if m.experts in stacks.get(n, ())
                 and not isinstance(_value(n), (torch.SymInt, int))]
        if not nodes:
            raise CaptureError(
                f"module {m.experts!r} ({type(root.get_submodule(m.experts)).__name__}) is not in the graph dynamo "
                f"gave fxdisag: the forward of {type(root).__name__} was broken into several graphs (a graph break), so "
                "no one graph holds the whole model. Find the breaks with torch._dynamo.explain(model)(**batch); "
                "in the experts, choose an implementation dynamo traces whole: "
                "config._experts_implementation = 'grouped_mm' (or 'batched_mm'), not 'eager'"
            )
        regions[m.experts] = nodes
    return regions


def _region_io(nodes: list[fx.Node], fqn: str, params: set[fx.Node], root: nn.Module):
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in params and a not in inputs:
                inputs.append(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    cls = type(root.get_submodule(fqn)).__name__
    if len(outputs) != 1:
        raise CaptureError(
            f"module {fqn!r} ({cls}): {len(outputs)} values leave its code in dynamo's graph "
            f"({[n.name for n in outputs]}); fxdisag splits on an experts call with one output. "
            "Use a transformers experts implementation ('grouped_mm' or 'batched_mm')")
    tensors = [(a, _value(a)) for a in inputs]
    ints = [a for a, v in tensors if isinstance(v, torch.Tensor) and not v.is_floating_point()]
    floats = [a for a, v in tensors if isinstance(v, torch.Tensor) and v.is_floating_point()]
    others = [a for a, v in tensors if not isinstance(v, (torch.Tensor, int, torch.SymInt))]
    if len(ints) != 1 or len(floats) != 2 or others:
        raise CaptureError(
            f"module {fqn!r} ({cls}) reads {[a.name for a in inputs]} in dynamo's graph; fxdisag expects "
            "(hidden rows [T, H], top_k_index [T, K], top_k_weights [T, K]) and sizes")
    index = ints[0]
    k = str(tuple(_value(index).shape))  # symbolic sizes compare by expression
    weights = [a for a in floats if str(tuple(_value(a).shape)) == k]
    hidden = [a for a in floats if a not in weights]
    if len(weights) != 1 or len(hidden) != 1:
        raise CaptureError(f"module {fqn!r} ({cls}): cannot tell the hidden rows from the routing weights among "
                           f"{[a.name for a in floats]} (shapes {[tuple(_value(a).shape) for a in floats]})")
    return (hidden[0], index, weights[0]), outputs[0]


def _input_name(parts: list[str]) -> str:
    if parts and parts[-1] in SUPPORTED_INPUTS:
        return parts[-1]
    if parts in (["0"], ["args", "0"]):
        return "input_ids"  # the HF forward's first positional argument
    raise CaptureError(f"unsupported model input {parts}; fxdisag trains with keyword inputs "
                       f"{', '.join(SUPPORTED_INPUTS)}")


def _outputs(out_node: fx.Node, labels: fx.Node | None, vocab: int, ids: fx.Node | None = None) -> DynamoOutputs:
    values = out_node.args[0]
    values = list(values) if isinstance(values, (tuple, list)) else [values]
    shapes = [tuple(_value(v).shape) if isinstance(v, fx.Node) and isinstance(_value(v), torch.Tensor) else None
              for v in values]
    alias = False
    if labels is None and ids is not None:  # model(input_ids=x, labels=x): the same tensor twice
        alias = any(s == () and _value(v).is_floating_point() and depends_on(v, ids) for v, s in zip(values, shapes))
    source = ids if alias else labels
    losses = [i for i, s in enumerate(shapes) if s == () and depends_on(values[i], source)]
    logits = [i for i, s in enumerate(shapes) if s is not None and len(s) == 3 and str(s[-1]) == str(vocab)
              and _value(values[i]).is_floating_point()]
    has_labels = source is not None
    if len(logits) != 1 or (has_labels and len(losses) != 1):
        raise CaptureError(
            f"dynamo's graph returns {len(values)} values of shapes {shapes}: fxdisag needs the whole forward "
            "in one graph (one loss, one logits). A graph break splits it: find it with torch._dynamo.explain")
    loss = losses[0] if has_labels else None
    extra = tuple((i, shapes[i], _value(values[i]).dtype) for i in range(len(values)) if i not in (loss, logits[0])
                  and shapes[i] is not None)
    return DynamoOutputs(len(values), loss, logits[0], extra, alias)


@dataclass
class DynamoInputs:
    """What each of dynamo's placeholders is: a parameter/buffer (its FQN), a model input
    (its name), or a dynamic size of one (input name, dim)."""

    placeholders: list[fx.Node]
    params: dict[fx.Node, str]
    inputs: dict[fx.Node, str]
    sizes: dict[fx.Node, tuple[str, int]]
    attrs: dict[fx.Node, tuple[str, str]]  # (module FQN, attribute): a scalar read off the module

    @property
    def names(self) -> list[str]:
        """Per placeholder: the model input's name, "" otherwise."""
        return [self.inputs.get(n, "") for n in self.placeholders]

    @property
    def is_dynamic(self) -> bool:
        """Whether the graph is generic in the batch and the sequence length (dynamo marks
        only the dimensions it saw change dynamic: a graph generic in one is not)."""
        return {("input_ids", 0), ("input_ids", 1)} <= set(self.sizes.values())


def dynamo_inputs(gm: fx.GraphModule) -> DynamoInputs:
    """Classify dynamo's placeholders by their sources (inside the backend call)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    params: dict[fx.Node, str] = {}
    inputs: dict[fx.Node, str] = {}
    sizes: dict[fx.Node, tuple[str, int]] = {}
    attrs: dict[fx.Node, tuple[str, str]] = {}
    for node in placeholders:
        _, parts = _split_source(_source_name(node))
        path = _module_path(parts)
        if path is not None:
            params[node] = path[0]
        elif parts and parts[0] == "_modules":  # a module's plain attribute (dynamic=True lifts scalars)
            attrs[node] = (".".join(parts[1:-1:2]) if len(parts) > 2 else "", parts[-1])
        elif "size" in parts:  # a dynamic dimension: L['kwargs']['input_ids'].size()[0]
            at = parts.index("size")
            sizes[node] = (_input_name(parts[:at]), int(parts[-1]))
        elif isinstance(_value(node), torch.Tensor):
            inputs[node] = _input_name(parts)
        else:
            raise CaptureError(f"dynamo input {_source_name(node)} ({_value(node)!r}) is not a model input, a "
                               "parameter or an input's size; fxdisag cannot map it")
    if "input_ids" not in inputs.values():
        raise CaptureError("the compiled call has no input_ids; call the model with input_ids=...")
    return DynamoInputs(placeholders, params, inputs, sizes, attrs)


def dynamo_outputs(gm: fx.GraphModule, vocab_size: int, io: DynamoInputs | None = None) -> DynamoOutputs:
    """Which of dynamo's outputs is the loss, which the logits, and what the others are."""
    io = io or dynamo_inputs(gm)
    labels = next((n for n, name in io.inputs.items() if name == "labels"), None)
    ids = next((n for n, name in io.inputs.items() if name == "input_ids"), None)
    return _outputs(next(n for n in gm.graph.nodes if n.op == "output"), labels, vocab_size, ids)



def from_dynamo(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> CapturedModel:
    """Rewrite dynamo's graph of an HF MoE causal LM into a :class:`CapturedModel` (inside the
    backend call: the placeholders' sources are read then). A dynamic-shape graph (sizes as
    inputs) gives a graph that runs at any batch and length: the sizes are read off the inputs."""
    t0 = time.perf_counter()
    local, root = graph_root(gm)
    layout = find_layout(root)
    if getattr(getattr(root, "config", None), "output_router_logits", False):
        raise CaptureError(f"{type(root).__name__}: config.output_router_logits=True (auxiliary load-balancing loss) "
                           "is not supported yet; set model.config.output_router_logits = False")
    io_in = dynamo_inputs(gm)
    placeholders, params, inputs, sizes = io_in.placeholders, io_in.params, io_in.inputs, io_in.sizes
    names = io_in.names
    input_names = tuple(n for n in SUPPORTED_INPUTS if n in inputs.values())

    stacks = {n: _normalise_stack(n, local) for n in gm.graph.nodes}
    regions = _experts_regions(gm, layout, stacks, root)
    expert_params = {n for n, fqn in params.items() if any(fqn.startswith(e + ".") for e in regions)}
    io = {fqn: _region_io(nodes, fqn, expert_params, root) for fqn, nodes in regions.items()}
    skip = {n for nodes in regions.values() for n in nodes}
    emit_at = {out: (fqn, args) for fqn, (args, out) in io.items()}

    example = dict(zip(names, example_inputs))
    out_map = dynamo_outputs(gm, layout.vocab_size, io_in)
    if out_map.labels_alias:  # the program takes labels like capture's; dynamo's guards keep them == input_ids
        input_names = tuple(n for n in SUPPORTED_INPUTS if n in set(input_names) | {"labels"})
        example["labels"] = example["input_ids"]

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    by_name = {}
    for name in input_names:
        by_name[name] = graph.placeholder(name)
    for node in placeholders:
        if node in inputs:
            env[node] = by_name[inputs[node]]
            env[node].meta["val"] = _value(node)
    for node, (fqn, attr) in io_in.attrs.items():  # the module's own value, as a constant
        value = getattr(root.get_submodule(fqn), attr)
        if isinstance(_value(node), torch.Tensor):  # dynamo wrapped the scalar in a 0-d tensor
            env[node] = graph.call_function(torch.tensor, (value,), {"dtype": _value(node).dtype})
            env[node].meta.update(val=_value(node), nn_module_stack={})
        else:
            env[node] = value
    for node, (name, dim) in sizes.items():  # computed from the input: the graph runs at any batch / length
        env[node] = graph.call_method("size", (by_name[name], dim))
        env[node].meta.update(val=_value(node), nn_module_stack={})
    for node, fqn in params.items():
        if node.users and node not in expert_params:
            env[node] = graph.get_attr(fqn)
            env[node].meta.update(val=_value(node), nn_module_stack={})
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            values = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            kept = [env[values[out_map.logits]]]
            if out_map.loss is not None:
                kept.insert(0, env[values[out_map.loss]])
            graph.output(tuple(kept) if len(kept) > 1 else kept[0])
            continue
        if node in emit_at:
            fqn, (hidden, index, weights) = emit_at[node]
            call = graph.call_module(fqn, (env[hidden], env[index], env[weights]))
            call.meta.update(val=_value(node), nn_module_stack=_experts_stack(node.meta["nn_module_stack"], fqn))
            env[node] = call
            continue
        if node in skip:
            continue
        if node.op == "get_attr":
            raise CaptureError(f"dynamo's graph reads its own attribute {node.target!r}; not supported by fxdisag")
        copied = graph.node_copy(node, lambda a: env[a])
        copied.meta["val"] = _value(node)
        env[node] = copied
    for node in graph.nodes:
        # Dynamo's fake values name its shape symbols; split_module would look for them among
        # the placeholders. Sizes are real nodes here (size() of an input): keep "val" only.
        node.meta.pop("example_value", None)
    graph.lint()
    out = fx.GraphModule(root, graph, class_name=f"Captured{type(root).__name__}")
    tag_regions(out, layout, root)
    shapes = {k: tuple(v.shape) for k, v in example.items() if k}
    captured = CapturedModel(out, layout, root, input_names, shapes, [], time.perf_counter() - t0,
                             traced_by="dynamo")
    from fxdisag.dump import maybe_dump_graph

    maybe_dump_graph("captured_dynamo", out)
    return captured


def _experts_stack(stack: Mapping, fqn: str) -> dict:
    """The experts call's module stack: the enclosing entries up to the experts module itself."""
    out = {}
    for key, (path, cls) in stack.items():
        out[key] = (path, cls)
        if path == fqn:
            break
    return out
