"""capture: an unmodified HF MoE causal LM -> a region-tagged ``torch.fx.GraphModule``.

Contract::

    captured = capture(model, {"input_ids": ids, "labels": ids})
    captured(input_ids=ids, labels=ids).loss   # == model(input_ids=ids, labels=ids).loss, bit for bit
    # every node: node.meta["fxdisag_region"] -> RegionTag("attn", 3, "model.layers.3.self_attn")
    # the routed experts of each MoE layer are exactly one call_module node

Route (see ../shared/notes/hf-moe-capture-facts.md): a ``torch.fx.Tracer`` with *leaf
modules*. We chose it over ``torch.export`` and dynamo because

* the split point we need -- ``experts(hidden_rows, top_k_index, top_k_weights)`` -- stays
  one ``call_module`` node whose inputs are exactly what crosses the network; export and
  dynamo inline it into dozens of aten ops with the expert count baked into constants;
* leaves run the original modules, so forward and backward are the model's own code
  (parity is exact), and the graph is short enough to read;
* it is fast: a full-size DeepSeek-V3 on the meta device traces in well under a second.

Plain ``symbolic_trace`` fails on HF models; four things make the leaf tracer work, each
general rather than per family:

1. trace a small wrapper with explicit arguments (HF forwards take ``**kwargs``);
2. the ``transformers.masking_utils.create_*mask`` functions become leaf functions;
3. config objects are kept live (``get_attr`` of the model's own ``config`` attribute):
   FX would otherwise rebuild dataclass configs and drop private fields such as
   ``_attn_implementation`` (GPT-OSS then silently gives wrong logits);
4. proxies carry fake-tensor values computed on demand, so ``a, b, c = x.shape``,
   ``x.view(*shape)`` and ``len(x.shape)`` trace. Python control flow on tensor
   *values* is refused with an error naming the module.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxdisag.layout import LayoutError, ModelLayout, find_layout

__all__ = ["CaptureError", "CapturedModel", "RegionTag", "capture", "depends_on", "REGION_KINDS"]

REGION_KINDS = (
    "embed",
    "attn",
    "router",
    "experts",
    "shared_experts",
    "combine",
    "dense_mlp",
    "norm",
    "head",
    "loss",
)
SUPPORTED_INPUTS = ("input_ids", "attention_mask", "labels")


class CaptureError(RuntimeError):
    """Capturing the model failed; the message names the module and the construct."""


@dataclass(frozen=True)
class RegionTag:
    kind: str
    layer: int | None
    fqn: str

    def __str__(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}[{self.layer}]"


# --------------------------------------------------------------------------- tracer


class _ShapeAware:
    """Proxy mixin: len() and iteration use the node's fake value (e.g. ``x.view(*x.shape)``)."""

    def __len__(self) -> int:
        return len(self.tracer.concrete(self.node))

    def __iter__(self):
        import dis
        import inspect
        from bisect import bisect_left

        # Keep FX's own handling of ``a, b = proxy`` (UNPACK_SEQUENCE) first.
        frame = inspect.currentframe().f_back
        insts = list(dis.get_instructions(frame.f_code))
        idx = bisect_left(insts, frame.f_lasti, key=lambda x: x.offset)
        if idx < len(insts) and insts[idx].opname == "UNPACK_SEQUENCE":
            return (self[i] for i in range(insts[idx].argval))
        return self.tracer.iter(self)

    def __getattr__(self, k: str):
        return _ShapeAwareAttribute(self, k)


class _ShapeAwareProxy(_ShapeAware, fx.Proxy):
    pass


class _ShapeAwareAttribute(_ShapeAware, fx.proxy.Attribute):
    pass


def _mask_functions() -> tuple[Callable, ...]:
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return tuple(
        getattr(masking_utils, n)
        for n in dir(masking_utils)
        if n.startswith("create_") and n.endswith("mask") and callable(getattr(masking_utils, n))
    )


class _LeafFunction:
    """Stands in for a module-level function while tracing: records a call_function node."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def __call__(self, *args, **kwargs):
        proxies: list[fx.Proxy] = []
        fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", self.fn, args, kwargs)
        return self.fn(*args, **kwargs)


@contextlib.contextmanager
def _leaf_functions(model: nn.Module):
    """Swap mask-construction functions for leaf stand-ins in every modeling module's globals."""
    fns = {id(f): f for f in _mask_functions()}
    patched = []
    modules = {type(m).__module__ for m in model.modules()}
    try:
        for modname in modules:
            g = getattr(sys.modules.get(modname), "__dict__", None)
            if g is None:
                continue
            for key, value in list(g.items()):
                if id(value) in fns:
                    g[key] = _LeafFunction(value)
                    patched.append((g, key, value))
        yield
    finally:
        for g, key, value in patched:
            g[key] = value


class _Wrapper(nn.Module):
    """Explicit-argument front for the HF forward (which takes ``**kwargs``).

    ``forward`` is generated per input set, so the graph has exactly one placeholder per
    input the user gave -- no placeholders specialised to None.
    """

    def __init__(self, model: nn.Module, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.input_names = input_names

    @classmethod
    def build(cls, model: nn.Module, input_names: tuple[str, ...]) -> "_Wrapper":
        params = ", ".join(input_names)
        namespace: dict[str, Any] = {}
        exec(f"def forward(self, {params}):\n    return self._run({params})\n", namespace)
        subclass = type(cls.__name__, (cls,), {"forward": namespace["forward"]})
        return subclass(model, input_names)

    def _run(self, *values):
        kwargs = dict(zip(self.input_names, values))
        out = self.model(**kwargs, use_cache=False)
        if "labels" in self.input_names:
            return out.loss, out.logits
        return out.logits


class _MoETracer(fx.Tracer):
    def __init__(
        self,
        leaves: set[int],
        experts: set[int],
        example_inputs: Mapping[str, torch.Tensor],
        config_paths: dict[int, str],
    ):
        super().__init__()
        self._leaves = leaves
        self._experts = experts
        self._config_paths = config_paths
        self._example = dict(example_inputs)
        self._concrete: dict[fx.Node, Any] = {}
        self._fake_mode = None
        self.specialized: list[str] = []
        self.record_stack_traces = True  # errors quote the line that broke

    # ---- leaves and attribute paths
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self._leaves or super().is_leaf_module(m, qualname)

    def create_arg(self, a: Any):
        path = self._config_paths.get(id(a))
        if path is not None:
            return self.create_node("get_attr", path, (), {})
        return super().create_arg(a)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapeAwareProxy(node, self)

    # ---- on-demand fake values (shapes for iteration / len / bool)
    def concrete(self, node: fx.Node) -> Any:
        if node in self._concrete:
            return self._concrete[node]
        from torch._subclasses.fake_tensor import FakeTensorMode

        if self._fake_mode is None:
            self._fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        mode = self._fake_mode

        def value(n: fx.Node):
            return self.concrete(n)

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        # no_grad: shapes need no autograd graph, and one would keep the model's parameters
        # referenced (saved for backward) for as long as the fake values live.
        with mode, _untraced(), torch.no_grad():
            if node.op == "placeholder":
                result = mode.from_tensor(self._example[node.target]) if node.target in self._example else None
            elif node.op == "get_attr":
                result = _fetch_attr(self.root, node.target)
            elif node.op == "call_function":
                fn = node.target.fn if isinstance(node.target, _LeafFunction) else node.target
                result = fn(*args, **kwargs)
            elif node.op == "call_method":
                result = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module" and id(self.root.get_submodule(node.target)) in self._experts:
                # Contract of an experts call: rows in, rows out. Running it on fake tensors
                # would be data-dependent (routing) and slow on full-size models.
                result = torch.empty_like(args[0])
            elif node.op == "call_module":
                result = self.root.get_submodule(node.target)(*args, **kwargs)
            else:  # pragma: no cover
                raise CaptureError(f"cannot evaluate node {node.format_node()}")
        self._concrete[node] = result
        return result

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self.concrete(obj.node)
        if isinstance(value, torch.Tensor):
            raise CaptureError(
                f"{_where(obj.node)} branches on a tensor value ({obj.node.format_node()}). "
                "fxdisag captures a static graph; make that module a leaf or remove the data-dependent branch."
            )
        self.specialized.append(f"{_where(obj.node)}: {obj.node.format_node()} -> {bool(value)}")
        return bool(value)

    def iter(self, obj: fx.Proxy):
        value = self.concrete(obj.node)
        if isinstance(value, (tuple, list, torch.Size)):
            return iter([obj[i] for i in range(len(value))])
        raise CaptureError(f"{_where(obj.node)} iterates over a tensor ({obj.node.format_node()}); make it a leaf")


@contextlib.contextmanager
def _untraced():
    """Run real code while tracing: undo FX's patches of Module.__call__/__getattr__."""
    from torch.fx import _symbolic_trace as st

    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = st._orig_module_call, st._orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = call, getattr_


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    where = "the model's top-level forward"
    if stack:
        fqn, cls = list(stack.values())[-1]
        fqn = fqn[len("model.") :] if fqn.startswith("model.") else fqn  # the tracing wrapper's prefix
        where = f"module {fqn!r} ({getattr(cls, '__name__', cls)})"
    source = _source_line(node)
    return f"{where}{' at ' + source if source else ''}"


def _source_line(node: fx.Node) -> str:
    """``file:line: code`` of the user frame that created ``node`` (FX records the stack).

    A frame is the user's unless its file lies inside fxdisag's or torch's installed
    package directory; a user's own folder may well be called ``fxdisag`` or ``torch``.
    """
    trace = (node.stack_trace or "").strip().splitlines()
    for i in range(len(trace) - 1, -1, -1):
        line = trace[i].strip()
        match = _FRAME.match(line)
        if match and not _is_library_file(match.group(1)):
            code = trace[i + 1].strip() if i + 1 < len(trace) else ""
            return f"{line[5:]}: {code}"
    return ""


_FRAME = re.compile(r'File "([^"]+)", line \d+')


def _library_dirs() -> tuple[str, ...]:
    import fxdisag

    return tuple(os.path.realpath(os.path.dirname(m.__file__)) + os.sep for m in (fxdisag, torch))


def _is_library_file(path: str) -> bool:
    return os.path.realpath(path).startswith(_library_dirs())


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# --------------------------------------------------------------------------- tagging


def _module_at(model: nn.Module, fqn: str) -> nn.Module | None:
    try:
        return model.get_submodule(fqn) if fqn else None
    except AttributeError:
        return None


def tag_regions(gm: fx.GraphModule, layout: ModelLayout, model: nn.Module | None = None) -> None:
    """Set ``node.meta["fxdisag_region"]`` on every node of a graph of ``model``'s forward.

    Works on any graph whose nodes carry ``nn_module_stack`` with FQNs relative to
    ``model`` (the leaf tracer's, and dynamo's after ``capture_dynamo`` normalises it):
    a node belongs to the innermost layout role (attention, router, experts, shared
    experts, dense MLP) among its enclosing modules; inside a decoder layer otherwise to
    ``norm`` (a module owning only 1-D parameters) or ``attn``; before the first layer to
    ``embed``; after the last to ``norm``, ``head`` (a Linear / ``lm_head``) and ``loss``.
    The routed experts must already be one ``call_module`` node per layer: nodes of a MoE
    block after it are ``combine``, before it ``router``.
    """
    model = gm if model is None else model
    roles: dict[str, tuple[str, int | None]] = {}
    for layer, fqn in layout.attention.items():
        roles[fqn] = ("attn", layer)
    for layer, fqn in layout.dense_mlp.items():
        roles[fqn] = ("dense_mlp", layer)
    blocks: dict[str, int] = {}
    for m in layout.moe:
        blocks[m.block] = m.layer
        roles[m.experts] = ("experts", m.layer)
        if m.router:
            roles[m.router] = ("router", m.layer)
        for s in m.shared:
            roles[s] = ("shared_experts", m.layer)
    layer_prefix = layout.layers + "."
    experts_done: set[str] = set()
    seen_layers = False
    head_done = False

    def layer_of(fqn: str) -> int | None:
        if fqn.startswith(layer_prefix):
            return int(fqn[len(layer_prefix) :].split(".", 1)[0])
        return None

    def classify(fqn: str, node: fx.Node) -> RegionTag:
        nonlocal seen_layers, head_done
        # innermost role module containing fqn
        probe = fqn
        while probe:
            if probe in roles:
                kind, layer = roles[probe]
                if kind == "experts" and node.op == "call_module":
                    experts_done.add(probe.rsplit(".", 1)[0])
                return RegionTag(kind, layer, probe)
            if probe in blocks:
                kind = "combine" if probe in experts_done else "router"
                return RegionTag(kind, blocks[probe], fqn)
            probe = probe.rsplit(".", 1)[0] if "." in probe else ""
        # The module the node runs in: a leaf's own call (the leaf tracer), or the module
        # whose code an inlined op came from (dynamo's graph) -- the same tag either way.
        mod = _module_at(model, fqn)
        layer = layer_of(fqn)
        if layer is not None:
            seen_layers = True
            if mod is not None and all(p.dim() == 1 for p in mod.parameters()) and any(True for _ in mod.parameters()):
                return RegionTag("norm", layer, fqn)
            return RegionTag("attn", layer, fqn)
        if not seen_layers:
            return RegionTag("embed", None, fqn)
        if mod is not None and fqn:
            if isinstance(mod, nn.Linear) or fqn.endswith("lm_head"):
                head_done = True
                return RegionTag("head", None, fqn)
            return RegionTag("norm", None, fqn)
        return RegionTag("loss" if head_done else "norm", None, fqn)

    for node in gm.graph.nodes:
        if node.op == "call_module":
            fqn = node.target
        else:
            stack = node.meta.get("nn_module_stack") or {}
            fqn = list(stack.values())[-1][0] if stack else ""
            fqn = "" if fqn == "model" else fqn
        if node.op == "placeholder":
            tag = RegionTag("embed", None, "")
        elif node.op == "output":
            tag = RegionTag("loss" if head_done else "head", None, "")
        else:
            tag = classify(fqn, node)
        node.meta["fxdisag_region"] = tag


# --------------------------------------------------------------------------- public API


class CapturedModel(nn.Module):
    """The captured, region-tagged training forward of an HF causal LM.

    Calling it runs the FX graph; parameters are the original model's (shared, not copied).
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        layout: ModelLayout,
        model: nn.Module,
        input_names: tuple[str, ...],
        example_shapes: dict[str, tuple[int, ...]],
        specialized: list[str],
        capture_seconds: float,
        traced_by: str = "fx",
    ):
        super().__init__()
        self.traced_by = traced_by  # "fx" (capture) or "dynamo" (capture_dynamo.from_dynamo)
        self.graph_module = graph_module
        self.layout = layout
        self.input_names = input_names
        self.example_shapes = example_shapes
        self.specialized = specialized
        self.capture_seconds = capture_seconds
        self.__dict__["model"] = model  # not a submodule: graph_module already owns its parameters

    def forward(self, **inputs: torch.Tensor):
        from transformers.modeling_outputs import CausalLMOutput

        _check_inputs(inputs, require=self.input_names, where="CapturedModel")
        out = self.graph_module(*(inputs[name] for name in self.input_names))
        if "labels" in self.input_names:
            return CausalLMOutput(loss=out[0], logits=out[1])
        return CausalLMOutput(logits=out)

    def for_profile(self) -> "CapturedModel":
        """The graph the profile runs: this one, or for dynamo's graph the leaf tracer's of the
        same model (tagged by the same ``tag_regions``). Dynamo bakes the device, and unless
        compiled with dynamic shapes the sizes, into its ops; the profile runs on the meta
        device at two sequence lengths."""
        if self.traced_by == "fx":
            return self
        if self.__dict__.get("_for_profile") is None:
            example = {n: torch.zeros(self.example_shapes[n], dtype=torch.long) for n in self.input_names}
            if "attention_mask" in example:
                example["attention_mask"] = torch.ones_like(example["attention_mask"])
            self.__dict__["_for_profile"] = capture(self.model, example)
        return self.__dict__["_for_profile"]

    def region_table(self) -> str:
        from fxdisag.dump import region_table

        return region_table(self)

    def code(self) -> str:
        from fxdisag.dump import tagged_code

        return tagged_code(self.graph_module)


def _check_inputs(inputs: Mapping[str, Any], *, require: tuple[str, ...] | None = None, where: str = "capture") -> None:
    for name, value in inputs.items():
        if name not in SUPPORTED_INPUTS:
            raise TypeError(
                f"{where}: unsupported input {name!r}; fxdisag captures training forwards with "
                f"{', '.join(SUPPORTED_INPUTS)} (no inputs_embeds, caches or custom kwargs)"
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: input {name!r} must be a torch.Tensor, got {type(value).__name__}")
    if "input_ids" not in inputs:
        raise TypeError(f"{where}: 'input_ids' is required")
    if require is not None and set(inputs) != set(require):
        raise TypeError(
            f"{where}: was captured with inputs {list(require)}, called with {list(inputs)}; "
            "capture again with the inputs you train with"
        )


def _leaf_set(model: nn.Module, layout: ModelLayout) -> set[int]:
    leaves: set[int] = set()
    for fqn in list(layout.attention.values()) + list(layout.dense_mlp.values()):
        leaves.add(id(model.get_submodule(fqn)))
    for m in layout.moe:
        leaves.add(id(model.get_submodule(m.experts)))
        if m.router:
            leaves.add(id(model.get_submodule(m.router)))
        for s in m.shared:
            leaves.add(id(model.get_submodule(s)))
    # Modules without children (norms, rotary embeddings, ...) are leaves too: their
    # internals are not what we split on, and keeping them whole keeps the graph short.
    for mod in model.modules():
        if not list(mod.children()) and mod is not model:
            leaves.add(id(mod))
    return leaves


def _config_paths(model: nn.Module) -> dict[int, str]:
    paths: dict[int, str] = {}
    for name, mod in model.named_modules():
        cfg = mod.__dict__.get("config")
        if cfg is not None and id(cfg) not in paths and not isinstance(cfg, (torch.Tensor, nn.Module)):
            # "model." is the tracing wrapper's attribute; _strip_wrapper_prefix removes it.
            paths[id(cfg)] = f"model.{name}.config" if name else "model.config"
    return paths


def capture(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> CapturedModel:
    """Capture the training forward of ``model`` (an HF causal LM with MoE layers).

    ``example_inputs``: ``input_ids`` [B, S] (required), ``attention_mask`` and ``labels``
    (optional). The graph takes the same inputs; with ``labels`` it returns the loss too.
    """
    _check_inputs(example_inputs)
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        raise CaptureError(
            f"{type(model).__name__}: config.output_router_logits=True (auxiliary load-balancing loss) "
            "is not supported yet; set model.config.output_router_logits = False"
        )
    t0 = time.perf_counter()
    layout = find_layout(model)
    input_names = tuple(n for n in SUPPORTED_INPUTS if n in example_inputs)
    wrapper = _Wrapper.build(model, input_names)
    experts = {id(model.get_submodule(m.experts)) for m in layout.moe}
    tracer = _MoETracer(_leaf_set(model, layout), experts, example_inputs, _config_paths(model))
    try:
        with _leaf_functions(model):
            graph = tracer.trace(wrapper)
    except (CaptureError, LayoutError):
        raise
    except Exception as exc:  # name the module that broke
        frame_mod = _innermost_module(tracer)
        raise CaptureError(
            f"capturing {type(model).__name__} failed in {frame_mod}: {type(exc).__name__}: {exc}\n"
            "hint: fxdisag traces with attention, routers, experts and norms as leaf modules; "
            "Python control flow on tensor values outside those modules cannot be captured."
        ) from exc
    # Example values for every node (fake tensors): dumps show shapes, passes read them.
    for node in graph.nodes:
        if node.op != "output":
            node.meta["val"] = tracer.concrete(node)
    forget_real_tensors(tracer._fake_mode)
    _strip_wrapper_prefix(graph)
    gm = fx.GraphModule(model, graph, class_name=f"Captured{type(model).__name__}")
    tag_regions(gm, layout, model)
    seconds = time.perf_counter() - t0
    captured = CapturedModel(
        gm,
        layout,
        model,
        input_names,
        {k: tuple(v.shape) for k, v in example_inputs.items()},
        tracer.specialized,
        seconds,
    )
    from fxdisag.dump import maybe_dump_graph

    maybe_dump_graph("captured", gm)
    return captured


def forget_real_tensors(mode) -> None:
    """Drop a fake mode's memo of the real tensors it converted (the model's parameters).

    The memo holds weak references to them, and a weakly referenced tensor cannot be
    swapped in place (``torch.utils.swap_tensors``), which a meta-device build needs to
    give a rank's own parameters storage. The fake values already made keep working; only
    a later conversion of the same parameter would make a new fake tensor.
    """
    if mode is None:
        return
    meta = mode.fake_tensor_converter.meta_converter
    for memo in (meta.tensor_memo, meta.storage_memo, meta.describer.lookup_tensor, meta.describer.lookup_storage):
        memo.clear()


def _strip_wrapper_prefix(graph: fx.Graph) -> None:
    """Targets were recorded relative to the tracing wrapper; make them the model's own FQNs."""
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target.startswith("model."):
            node.target = node.target[len("model.") :]
            if node.name.startswith("model_"):
                node._rename(node.name[len("model_") :])
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (fqn[len("model.") :] if fqn.startswith("model.") else fqn, cls) for k, (fqn, cls) in stack.items()
            }


def _innermost_module(tracer: _MoETracer) -> str:
    if tracer.module_stack:
        fqn, cls = list(tracer.module_stack.values())[-1]
        fqn = fqn[len("model.") :] if fqn.startswith("model.") else fqn
        return f"module {fqn!r} ({getattr(cls, '__name__', cls)})"
    return "the top-level forward"


def depends_on(node: fx.Node, source: fx.Node | None) -> bool:
    """Whether ``node`` is ``source`` or computed from it (a walk over its inputs)."""
    if source is None:
        return False
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is source:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False
