"""split_stages: cut a dispatch-inserted graph into attention stages and expert boundaries.

Contract: ``split_stages(gm) -> StagedProgram`` for a graph that went through
``insert_dispatch`` (its experts nodes carry ``meta["fxdisag_boundary"] = j``):

* with J experts nodes there are J+1 attention stages and J expert boundaries;
  attention stage s holds every node that comes after experts node s-1 and before
  experts node s in the graph's order (stage 0 starts at the inputs, stage J ends at
  the outputs). Keeping the original order keeps the model's own sequence of
  operations, so every stage computes exactly what the whole graph did;
* boundary j holds the experts node and the ``expand``/``reduce_rows`` around it; its
  inputs are ``expand``'s arguments (``xs, ids, ws``), all produced by stage j; its
  output ``ys`` is consumed by stage j+1 only;
* values that stage s needs from earlier stages (residual stream, rotary tables, the
  mask, labels, ...) are explicit stage inputs, named after the top-level value;
* ``program.graph_module`` (the ``split_module`` result) still runs in one process and
  gives the same outputs as ``gm``.

Pseudo-code::

    stage(n) = boundaries entered before n            # boundary j (expand, experts, reduce): 2j+1
    top = split_module(gm, stage, keep_original_order=True, tuple_return=True)
    for each submodule call in top: record its input value names and output value names
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from fxdisag.dump import maybe_dump_graph
from fxdisag.runtime import dispatch

__all__ = ["AttentionStage", "ExpertBoundary", "StagedProgram", "split_stages"]


@dataclass
class AttentionStage:
    index: int
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]


@dataclass
class ExpertBoundary:
    index: int  # MoE layer j (0..J-1), in layer order
    experts_fqn: str
    xs: str  # token rows, one per (token, expert rank)       [R, H]
    ids: str  # the row's expert ids, -1 in other ranks' slots [R, K]
    ws: str  # routing weights, 0 in other ranks' slots        [R, K]
    ys: str  # weighted expert outputs summed per row          [R, H]
    module: fx.GraphModule = field(repr=False)
    shared_fqn: str | None = None  # shared experts run here as one more expert (insert_dispatch's shared_slots)


@dataclass
class StagedProgram:
    graph_module: fx.GraphModule  # the whole split program, runnable in one process
    stages: list[AttentionStage]
    boundaries: list[ExpertBoundary]
    inputs: list[str]
    outputs: list[str]

    def describe(self) -> str:
        lines = []
        for s, stage in enumerate(self.stages):
            lines.append(f"attention stage {s}: inputs {stage.inputs} -> outputs {stage.outputs}")
            if s < len(self.boundaries):
                b = self.boundaries[s]
                shared = f" + shared experts {b.shared_fqn}" if b.shared_fqn else ""
                lines.append(f"  boundary {b.index} ({b.experts_fqn}{shared}): send {b.xs}, {b.ids}, {b.ws} -> "
                             f"receive {b.ys}")
        return "\n".join(lines)


def _partition_ids(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """Boundary j (the experts node and the expand/reduce nodes around it) -> 2j + 1; every
    other node -> 2 x (boundaries entered before it)."""
    part: dict[fx.Node, int] = {}
    j = 0  # boundaries entered so far
    for node in gm.graph.nodes:
        boundary = node.meta.get("fxdisag_boundary", node.meta.get("fxdisag_boundary_part"))
        if boundary is not None:
            if boundary not in (j - 1, j):
                raise ValueError(f"experts nodes out of order: expected boundary {j}, found {boundary} at {node.name}")
            if boundary == j - 1 and part.get(node.prev) != 2 * boundary + 1:
                raise ValueError(f"boundary {boundary} is interrupted before {node.name}: its nodes must be consecutive")
            part[node] = 2 * boundary + 1
            j = boundary + 1
        else:
            part[node] = 2 * j
    return part


def _duplicate_shared_getattrs(gm: fx.GraphModule, part: dict[fx.Node, int]) -> None:
    """A get_attr used by several stages gets one copy per stage (no constants cross stages)."""
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        by_part: dict[int, list[fx.Node]] = {}
        for user in node.users:
            by_part.setdefault(part[user], []).append(user)
        first = True
        for p, users in sorted(by_part.items()):
            if first:
                part[node] = p
                first = False
                continue
            with gm.graph.inserting_before(users[0]):
                copy = gm.graph.get_attr(node.target)
            copy.meta.update(node.meta)
            part[copy] = p
            for user in users:
                user.replace_input_with(node, copy)
    gm.graph.lint()
    gm.recompile()


def _stages_own_tensors(top: fx.GraphModule) -> None:
    """A parameter or buffer that split_module passed into a stage as an input (it does so for
    every get_attr of a tensor: dynamo's graph reads parameters that way) becomes the
    stage's own attribute, under the same FQN: the stage's ``parameters()`` are then the
    parameters it computes with, as for leaf-module calls."""
    from torch.fx.graph_module import _assign_attr

    for call in [n for n in top.graph.nodes if n.op == "call_module"]:
        sub: fx.GraphModule = top.get_submodule(call.target)
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        keep = []
        for arg, ph in zip(call.args, placeholders):
            value = None
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                value = top
                for part in arg.target.split("."):
                    value = getattr(value, part)
            if not isinstance(value, torch.Tensor):
                keep.append(arg)
                continue
            _assign_attr(value, sub, arg.target)
            with sub.graph.inserting_before(ph):
                owned = sub.graph.get_attr(arg.target)
            owned.meta.update(ph.meta)
            ph.replace_all_uses_with(owned)
            sub.graph.erase_node(ph)
        if len(keep) != len(call.args):
            call.args = tuple(keep)
            # get_attr nodes must follow the placeholders
            first = next((n for n in sub.graph.nodes if n.op != "placeholder"), None)
            for node in [n for n in sub.graph.nodes if n.op == "get_attr"]:
                if first is not None and node is not first:
                    first.prepend(node)
            sub.graph.lint()
            sub.recompile()
    for node in [n for n in top.graph.nodes if n.op == "get_attr" and not n.users]:
        top.graph.erase_node(node)
    top.graph.lint()
    top.recompile()


def split_stages(gm: fx.GraphModule) -> StagedProgram:
    part = _partition_ids(gm)
    _duplicate_shared_getattrs(gm, part)
    num_boundaries = max(part.values()) // 2 + (max(part.values()) % 2 == 1)
    if num_boundaries == 0:
        raise ValueError("no experts boundary in the graph: run insert_dispatch first")

    by_name = {n.name: n for n in gm.graph.nodes}

    def callback(node: fx.Node) -> int:
        return part[by_name[node.name]] if node.name in by_name else 0

    top = split_module(gm, gm, callback, keep_original_order=True, keep_original_node_name=True, tuple_return=True)
    _stages_own_tensors(top)

    stages: list[AttentionStage] = []
    boundaries: list[ExpertBoundary] = []
    inputs = [n.name for n in top.graph.nodes if n.op == "placeholder"]
    outputs: list[str] = []
    for node in top.graph.nodes:
        if node.op == "output":
            result = node.args[0]
            outputs = [a.name for a in (result if isinstance(result, (tuple, list)) else [result])]
        if node.op != "call_module":
            continue
        pid = int(node.target.rsplit("_", 1)[1])
        sub: fx.GraphModule = top.get_submodule(node.target)
        arg_names = [a.name for a in node.args]
        out_node = next(n for n in sub.graph.nodes if n.op == "output")
        n_out = len(out_node.args[0])
        out_names = [f"{node.name}_unused_{k}" for k in range(n_out)]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                # Name the top-level value after the node it carries: "rotary_emb", not "getitem_7".
                carried = out_node.args[0][user.args[1]]
                if isinstance(carried, fx.Node):
                    user._rename(carried.name)
                out_names[user.args[1]] = user.name
        if pid % 2 == 0:
            stages.append(AttentionStage(pid // 2, sub, arg_names, out_names))
        else:
            call = [n for n in sub.graph.nodes if n.op == "call_module"]
            if len(call) != 1:
                raise ValueError(f"boundary submodule {node.target} must hold exactly the experts call, got {len(call)}")
            placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
            pos = {p: i for i, p in enumerate(placeholders)}
            expand = [n for n in sub.graph.nodes if n.op == "call_function" and n.target is dispatch.expand]
            if len(expand) != 1 or not all(a in pos for a in expand[0].args):
                raise ValueError(f"boundary submodule {node.target} must start with one dispatch.expand of its inputs")
            xs, ids, ws = (arg_names[pos[a]] for a in expand[0].args)
            boundaries.append(
                ExpertBoundary(
                    pid // 2,
                    call[0].meta.get("fxdisag_experts_fqn", call[0].target),
                    xs, ids, ws,
                    out_names[0] if n_out else "",
                    sub,
                    call[0].meta.get("fxdisag_shared_fqn"),
                )
            )
    top.recompile()
    maybe_dump_graph("split", top)
    expected = list(range(num_boundaries + 1))
    if [s.index for s in stages] != expected:
        raise ValueError(f"split produced attention stages {[s.index for s in stages]}, expected {expected}")
    return StagedProgram(top, stages, boundaries, inputs, outputs)
