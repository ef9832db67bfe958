"""insert_dispatch: make every routed-experts call an explicit pack -> experts -> combine.

Contract: ``insert_dispatch(gm, layout, owner, num_ranks) -> gm`` (in place, returned)

* rewrites each ``call_module(<experts>)(hidden, top_k_index, top_k_weights)`` into::

      xs, ws, ids, token, n = fxdisag.runtime.dispatch.pack(hidden, top_k_index, top_k_weights, owner)
      x, e, w, row = fxdisag.runtime.dispatch.expand(xs, ids, ws)     # } the expert side:
      y   = call_module(<experts>)(x, e, w)       # one call row per (token, slot); K = 1
      ys  = fxdisag.runtime.dispatch.reduce_rows(y, row, xs)          # } one row per (token, rank)
      out = fxdisag.runtime.dispatch.combine(ys, token, n)

  (``dispatch.py``: one row per (token, expert rank it reaches); ``ws``/``ids`` [R, K]
  with the slots of other ranks zeroed / -1);
* the graph stays runnable in one process and computes the same values as before the
  pass up to float rounding of the per-token sum (the experts module is called on the
  same (row, expert, weight) triples);
* after it, the tensors that cross the attention/experts boundary are exactly ``xs, ids,
  ws`` (in) and ``ys`` (out); the runtime slices the buffers per expert rank with
  ``bincount(owner[ids.amax(1)])``;
* ``node.meta["fxdisag_boundary"] = j`` marks the experts node of MoE layer j and
  ``meta["fxdisag_boundary_part"] = j`` the expand/reduce nodes around it (the expert
  side of the cut, ``split_stages``); the new nodes keep the region tags (pack:
  ``router[l]``, expand/reduce: ``experts[l]``, combine: ``combine[l]``).

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
        experts_tag = node.meta.get("fxdisag_region", RegionTag("experts", moe.layer, node.target))

        def make(fn, args, name, tag, part=None, outputs=()):
            made = graph.create_node("call_function", fn, args, name=name)
            made.meta["fxdisag_region"] = tag
            if part is not None:
                made.meta["fxdisag_boundary_part"] = part
            items = []
            for k, label in enumerate(outputs):
                item = graph.create_node("call_function", operator.getitem, (made, k), name=f"{label}_{j}")
                item.meta.update({k2: v for k2, v in made.meta.items() if k2.startswith("fxdisag")})
                items.append(item)
            return items or made

        with graph.inserting_before(node):
            xs, ws, ids, token, n = make(dispatch.pack, (hidden, index, weights, owner), f"pack_{j}", router_tag,
                                         outputs=("xs", "ws", "ids", "token", "ntok"))
            x, e, w, row = make(dispatch.expand, (xs, ids, ws), f"expand_{j}", experts_tag, part=j,
                                outputs=("pair_x", "pair_id", "pair_w", "pair_row"))
            y = graph.create_node("call_module", node.target, (x, e, w), name=f"pairs_{j}")
            y.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})  # shape changed
            y.meta["fxdisag_boundary"] = j
            y.meta["fxdisag_experts_fqn"] = node.target
            ys = make(dispatch.reduce_rows, (y, row, xs), f"ys_{j}", experts_tag, part=j)
            out = make(dispatch.combine, (ys, token, n), f"combined_{j}", RegionTag("combine", moe.layer, moe.block))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    maybe_dump_graph("dispatch_inserted", gm)
    return gm
