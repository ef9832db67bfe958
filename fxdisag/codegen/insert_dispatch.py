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

``shared_slots`` (expert-rank slots; ``Plan.shared_expert_ranks``) moves every MoE layer's
shared experts to them as one more, always-selected expert: one slot t, id E (one past
the routed ids) on t; every slot 0..R-1, a copy on each, id E + t on slot t, a token's on
the slot of its first routed expert. The block must add them to the routed output,
optionally scaled by a per-token gate (DeepSeek-V3: ``out + shared(h)``; Qwen2-MoE:
``out + sigmoid(g(h)) * shared(h)``), with ``shared`` one call_module on the experts'
rows; then::

      index', weights' = fxdisag.runtime.dispatch.with_shared(index, weights, gate or None, E[, owner])
      ... pack(hidden, index', weights', owner + shared owners) ...      # as above
      y = call_module(fxdisag_shared_<j>)(x, e, w)   # runtime.experts.WithSharedExpert
      out = combine(...)                              # routed + gate * shared, per token

  the add and the shared call leave the graph (the gate's nodes move before the pack:
  they stay on the attention side), the experts node carries ``meta["fxdisag_shared_fqn"]``,
  and the values are the block's up to float rounding of the per-token sum. A block
  built otherwise raises ValueError naming it (keep its shared experts on the attention
  group: ``shared_slots=None``).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch.fx as fx

from fxdisag.capture import RegionTag, depends_on
from fxdisag.dump import maybe_dump_graph
from fxdisag.layout import ModelLayout
from fxdisag.runtime import dispatch
from fxdisag.runtime.experts import WithSharedExpert

__all__ = ["insert_dispatch", "experts_nodes", "movable_shared_experts"]


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


def insert_dispatch(gm: fx.GraphModule, layout: ModelLayout, owner: Sequence[int], num_ranks: int,
                    shared_slots: Sequence[int] | None = None) -> fx.GraphModule:
    owner = tuple(int(o) for o in owner)
    if any(not 0 <= o < num_ranks for o in owner):
        raise ValueError(f"owner slots {owner} must lie in [0, {num_ranks})")
    if shared_slots is not None:
        shared_slots = tuple(int(t) for t in shared_slots)
        if not (len(shared_slots) == 1 and 0 <= shared_slots[0] < num_ranks) and shared_slots != tuple(range(num_ranks)):
            raise ValueError(f"shared_slots={shared_slots} must be one slot in [0, {num_ranks}) or every slot")
        if not any(m.shared for m in layout.moe):
            raise ValueError(f"{layout.model_class} has no shared experts: there is nothing to place on an expert rank "
                             "(leave the plan's shared_expert_ranks empty)")
    graph = gm.graph
    for j, (node, moe) in enumerate(zip(experts_nodes(gm, layout), layout.moe)):
        if len(owner) != moe.num_experts:
            raise ValueError(f"placement gives {len(owner)} experts, MoE layer {moe.layer} has {moe.num_experts}")
        hidden, index, weights = _args3(node)
        layer_owner, target, shared_fqn = owner, node.target, None
        if shared_slots is not None and moe.shared:
            replicated = len(shared_slots) > 1
            index, weights, shared_fqn = _move_shared(gm, node, moe, hidden, index, weights, j,
                                                      owner if replicated else None)
            layer_owner = owner + shared_slots
            target = f"fxdisag_shared_{j}"
            gm.add_submodule(target, WithSharedExpert(gm.get_submodule(node.target), gm.get_submodule(shared_fqn),
                                                      moe.num_experts))
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
            xs, ws, ids, token, n = make(dispatch.pack, (hidden, index, weights, layer_owner), f"pack_{j}", router_tag,
                                         outputs=("xs", "ws", "ids", "token", "ntok"))
            x, e, w, row = make(dispatch.expand, (xs, ids, ws), f"expand_{j}", experts_tag, part=j,
                                outputs=("pair_x", "pair_id", "pair_w", "pair_row"))
            y = graph.create_node("call_module", target, (x, e, w), name=f"pairs_{j}")
            y.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")})  # shape changed
            y.meta["fxdisag_boundary"] = j
            y.meta["fxdisag_experts_fqn"] = node.target
            if shared_fqn is not None:
                y.meta["fxdisag_shared_fqn"] = shared_fqn
            ys = make(dispatch.reduce_rows, (y, row, xs), f"ys_{j}", experts_tag, part=j)
            out = make(dispatch.combine, (ys, token, n), f"combined_{j}", RegionTag("combine", moe.layer, moe.block))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    maybe_dump_graph("dispatch_inserted", gm)
    return gm


_VIEWS = {"view", "reshape", "flatten", "contiguous"}


def _is_view(node: fx.Node) -> bool:
    import torch

    return (node.op == "call_method" and node.target in _VIEWS) or (
        node.op == "call_function" and node.target in (torch.reshape, torch.flatten))


def _is_op(node: fx.Node, name: str) -> bool:
    import torch

    fns = {"add": (operator.add, operator.iadd, torch.add), "mul": (operator.mul, operator.imul, torch.mul)}[name]
    return (node.op == "call_function" and node.target in fns) or (
        node.op == "call_method" and node.target in (name, f"{name}_", f"__{name}__", f"__i{name}__"))


def _root(node: fx.Node) -> fx.Node:
    """The value a chain of views starts from."""
    while _is_view(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _shared_term(node: fx.Node, moe, hidden: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node, fx.Node | None]:
    """(view chain's end, add, added term, shared call, gate or None) of the block's
    ``routed + [gate *] shared(h)``; ValueError naming the block otherwise."""
    where = f"MoE layer {moe.layer} ({moe.block})"
    fix = "keep its shared experts on the attention group (Plan.shared_expert_ranks=[])"
    end = node
    while len(end.users) == 1 and _is_view(next(iter(end.users))):
        end = next(iter(end.users))
    add = next(iter(end.users)) if len(end.users) == 1 else None
    if add is None or not _is_op(add, "add") or len(add.args) != 2 or end not in add.args:
        raise ValueError(f"{where}: the routed experts' output is not added to the shared experts' (its uses: "
                         f"{[u.format_node() for u in end.users]}); {fix}")
    term = add.args[1] if add.args[0] is end else add.args[0]
    shared_names = set(moe.shared)

    def is_shared(n) -> bool:
        return isinstance(n, fx.Node) and n.op == "call_module" and n.target in shared_names

    gate = None
    if is_shared(term):
        call = term
    elif isinstance(term, fx.Node) and _is_op(term, "mul") and len(term.args) == 2 and \
            sum(is_shared(a) for a in term.args) == 1:
        call = next(a for a in term.args if is_shared(a))
        gate = next(a for a in term.args if a is not call)
        if not isinstance(gate, fx.Node):
            raise ValueError(f"{where}: the shared experts are scaled by a constant {gate!r}, not a per-token gate; {fix}")
    else:
        shown = term.format_node() if isinstance(term, fx.Node) else repr(term)
        raise ValueError(f"{where}: the term added to the routed output, {shown}, is not a shared-experts call "
                         f"(of {sorted(shared_names)}), optionally times a gate; {fix}")
    if len(call.args) != 1 or call.kwargs or len(call.users) != 1 or _root(call.args[0]) is not _root(hidden):
        raise ValueError(f"{where}: shared experts {call.target!r} must be called once, on the experts' own rows "
                         f"(got {call.format_node()}); {fix}")
    if gate is not None and depends_on(gate, node):
        raise ValueError(f"{where}: the shared experts' gate depends on the routed experts' output; {fix}")
    return end, add, term, call, gate


def movable_shared_experts(gm: fx.GraphModule, layout: ModelLayout) -> dict[int, str | ValueError]:
    """Per MoE layer index j with shared experts: the FQN of the shared-experts module
    ``insert_dispatch(shared_slots=...)`` moves to expert ranks, or the ValueError saying
    why it cannot (read-only: the graph is not changed)."""
    out: dict[int, str | ValueError] = {}
    for j, (node, moe) in enumerate(zip(experts_nodes(gm, layout), layout.moe)):
        if moe.shared:
            try:
                out[j] = _shared_term(node, moe, _args3(node)[0])[3].target
            except ValueError as exc:
                out[j] = exc
    return out


def _move_shared(gm: fx.GraphModule, node: fx.Node, moe, hidden: fx.Node, index: fx.Node, weights: fx.Node,
                 j: int, owner: tuple[int, ...] | None) -> tuple[fx.Node, fx.Node, str]:
    """Take layer j's shared experts out of the block's sum (module docstring): the augmented
    (index, weights) nodes, inserted before the experts node, and the shared module's FQN."""
    end, add, term, call, gate = _shared_term(node, moe, hidden)
    graph = gm.graph
    if gate is not None:
        _hoist(graph, gate, node)
    with graph.inserting_before(node):
        aug = graph.create_node("call_function", dispatch.with_shared, (index, weights, gate, moe.num_experts, owner),
                                name=f"with_shared_{j}")
        aug.meta["fxdisag_region"] = RegionTag("router", moe.layer, moe.block)
        index2 = graph.create_node("call_function", operator.getitem, (aug, 0), name=f"shared_index_{j}")
        weights2 = graph.create_node("call_function", operator.getitem, (aug, 1), name=f"shared_weights_{j}")
        for n in (index2, weights2):
            n.meta["fxdisag_region"] = aug.meta["fxdisag_region"]
    add.replace_all_uses_with(end)
    graph.erase_node(add)
    if term is not call:
        graph.erase_node(term)
    graph.erase_node(call)
    return index2, weights2, call.target


def _hoist(graph: fx.Graph, value: fx.Node, before: fx.Node) -> None:
    """Move ``value`` and what it needs that comes after ``before`` to just before it (the
    gate is computed where the dispatch is packed; it does not need ``before``: _shared_term)."""
    order = {n: k for k, n in enumerate(graph.nodes)}
    late: set[fx.Node] = set()
    stack = [value]
    while stack:
        n = stack.pop()
        if n in late or order[n] < order[before]:
            continue
        late.add(n)
        stack.extend(a for a in n.all_input_nodes)
    for n in sorted(late, key=order.get):
        before.prepend(n)
