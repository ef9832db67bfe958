"""insert_dispatch: make every routed-experts call an explicit pack -> experts -> combine.

Contract: ``insert_dispatch(gm, layout, owner, num_ranks) -> gm`` (in place, returned)

* rewrites each ``call_module(<experts>)(hidden, top_k_index, top_k_weights)`` into::

      xs, ws, ids, inv = fxdisag.runtime.dispatch.pack(hidden, top_k_index, top_k_weights, owner)
      ys  = call_module(<experts>)(xs, ids, ws)        # one row per (token, slot); K = 1
      out = fxdisag.runtime.dispatch.combine(ys, inv, K)

* the graph stays runnable in one process and computes the same values as before the
  pass (the experts module is called on the same rows, in groups of one slot);
* after it, the tensors that cross the attention/experts boundary are exactly the
  experts node's arguments (``xs, ids, ws``) and its result (``ys``); the runtime
  slices the buffers per expert rank with ``bincount(owner[ids])``;
* ``node.meta["fxdisag_boundary"] = j`` marks the experts node of MoE layer j; the new
  nodes keep the region tags (pack: ``router[l]``, combine: ``combine[l]``).

``owner[e]`` is the expert-rank slot (0..R-1) holding expert e; ``R`` the number of
expert ranks. The pass does not decide placement: the plan does.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch.fx as fx

from fxdisag.capture import RegionTag
from fxdisag.dump import maybe_dump_graph
from fxdisag.layout import ModelLayout
from fxdisag.runtime import dispatch

__all__ = ["insert_dispatch", "experts_nodes"]


def experts_nodes(gm: fx.GraphModule, layout: ModelLayout) -> list[fx.Node]:
    """The experts call nodes, in MoE-layer order; errors if one is missing or called twice."""
    by_fqn = {m.experts: m for m in layout.moe}
    found: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in by_fqn:
            if node.target in found:
                raise ValueError(f"experts module {node.target!r} is called twice; fxdisag splits once per MoE layer")
            found[node.target] = node
    missing = [m.experts for m in layout.moe if m.experts not in found]
    if missing:
        raise ValueError(f"experts modules {missing} are never called in the captured graph")
    return [found[m.experts] for m in layout.moe]


def _args3(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node]:
    module_args = list(node.args)
    names = ("hidden_states", "top_k_index", "top_k_weights")
    alt = ("hidden_states", "router_indices", "routing_weights")
    for i, (a, b) in enumerate(zip(names, alt)):
        if len(module_args) <= i:
            if a in node.kwargs:
                module_args.append(node.kwargs[a])
            elif b in node.kwargs:
                module_args.append(node.kwargs[b])
    if len(module_args) != 3 or not all(isinstance(a, fx.Node) for a in module_args):
        raise ValueError(
            f"experts call {node.format_node()} does not have the (hidden_states, top_k_index, "
            "top_k_weights) signature fxdisag splits on"
        )
    return module_args[0], module_args[1], module_args[2]


def insert_dispatch(gm: fx.GraphModule, layout: ModelLayout, owner: Sequence[int], num_ranks: int) -> fx.GraphModule:
    owner = tuple(int(o) for o in owner)
    if any(not 0 <= o < num_ranks for o in owner):
        raise ValueError(f"owner slots {owner} must lie in [0, {num_ranks})")
    graph = gm.graph
    for j, (node, moe) in enumerate(zip(experts_nodes(gm, layout), layout.moe)):
        if len(owner) != moe.num_experts:
            raise ValueError(f"placement gives {len(owner)} experts, MoE layer {moe.layer} has {moe.num_experts}")
        hidden, index, weights = _args3(node)
        router_tag = RegionTag("router", moe.layer, moe.block)
        with graph.inserting_before(node):
            packed = graph.create_node("call_function", dispatch.pack, (hidden, index, weights, owner), name=f"pack_{j}")
            packed.meta["fxdisag_region"] = router_tag
            parts = []
            for k, label in enumerate(("xs", "ws", "ids", "inv")):
                part = graph.create_node("call_function", operator.getitem, (packed, k), name=f"{label}_{j}")
                part.meta["fxdisag_region"] = router_tag
                parts.append(part)
            xs, ws, ids, inv = parts
            ys = graph.create_node("call_module", node.target, (xs, ids, ws), name=f"ys_{j}")
            ys.meta.update(node.meta)
            ys.meta["fxdisag_boundary"] = j
            ys.meta["fxdisag_experts_fqn"] = node.target
        with graph.inserting_after(ys):
            out = graph.create_node("call_function", dispatch.combine, (ys, inv, moe.top_k), name=f"combined_{j}")
            out.meta["fxdisag_region"] = RegionTag("combine", moe.layer, moe.block)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    maybe_dump_graph("dispatch_inserted", gm)
    return gm
