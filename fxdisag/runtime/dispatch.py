"""Compute-only steps around the token exchange (Megatron-Core dispatcher style).

Contract: one row per (token, destination expert rank)::

    xs, ws, ids, token, n = pack(hidden[N,H], top_k_index[N,K], top_k_weights[N,K], owner=(r_0..r_{E-1}))
    # one row per (token, expert rank holding >= 1 of its top_k experts), grouped by rank
    # (rank slot order, tokens ascending inside a rank's block):
    #   xs    [R, H]  token rows                        (differentiable w.r.t. hidden)
    #   ws    [R, K]  the token's routing weights, 0 in slots routed to another rank
    #                 (differentiable w.r.t. top_k_weights)
    #   ids   [R, K]  the slots' expert ids, -1 in slots routed to another rank
    #   token [R]     the token of each row
    #   n     [N, 0]  no data: its shape carries the token count to the combine (which
    #                 may run on another group, p > 1) without a shape baked into the graph
    ys = expert_rows(experts, xs, ids, ws)        # [R, H]: sum over the row's valid slots of
                                                  # w * expert(x), on the rank holding them
    out = combine(ys, token, n)                   # [N, H] == experts(hidden, top_k_index, top_k_weights)

A token whose top_k experts sit on r distinct ranks crosses the link as r rows (not K),
forward and backward: the expert rank applies the routing weights and sums the token's
expert outputs before the combine, and the gradient of a dispatched row comes back summed
over the rank's experts (autograd of the row gather in :func:`expert_rows`), with the
weights' gradients beside it (``ws``'s gradient, 0 in foreign slots).

``pack``, ``expert_rows`` and ``combine`` do no communication; the exchange between pack
and expert_rows (and back) is the only part that differs between one process and the
disaggregated runtime. The same :func:`expert_rows` runs in the single-process graph
(``insert_dispatch``: :func:`expand` -> experts module -> :func:`reduce_rows`) and on
expert ranks, with local expert ids there.

Numerics: the expert module sees exactly the (row, expert, weight) triples it saw before
(one slot per call row, ``K = 1``); the sum of a token's K weighted outputs is regrouped
(per rank, then over ranks, with ``index_add``), so results equal the experts call up to
float rounding of that sum. On CUDA ``index_add_`` accumulates with atomics: not bitwise
deterministic unless ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["pack", "expand", "reduce_rows", "expert_rows", "combine", "row_ranks", "tokens_reaching",
           "with_shared", "ROUTE_SAMPLE"]

# Tokens per MoE layer whose routed experts an attention rank keeps when asked to sample
# (``DisaggregatedModel.sample_routes``: the balancer, the planner's profiling step).
ROUTE_SAMPLE = 2048


def pack(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    owner: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, top_k = top_k_index.shape
    owner_of = _owner_table(owner, top_k_index.device)
    slot_rank = owner_of[top_k_index]  # [N, K]
    present = torch.zeros(num_tokens, max(owner) + 1, dtype=torch.bool, device=hidden.device)
    present.scatter_(1, slot_rank, True)
    # nonzero of the transpose: rows ordered by rank, tokens ascending within a rank.
    rank, token = present.t().nonzero(as_tuple=True)
    token = token.clone()  # its own storage (nonzero returns views of one buffer): it may cross a pipeline hop
    mine = slot_rank[token] == rank.unsqueeze(1)  # [R, K]: the row's slots on its rank
    xs = hidden[token]
    ws = torch.where(mine, top_k_weights[token], torch.zeros((), dtype=top_k_weights.dtype, device=hidden.device))
    ids = torch.where(mine, top_k_index[token], torch.full((), -1, dtype=top_k_index.dtype, device=hidden.device))
    return xs, ws, ids, token, hidden.new_empty((num_tokens, 0))


def with_shared(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate: torch.Tensor | None,
                shared_id: int, owner: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing with the shared experts as one more slot every token selects: index
    [N, K+1], weights [N, K+1] (last slot the per-token ``gate``, any shape with N
    elements, in the weights' dtype; 1 without a gate). The last slot's id is
    ``shared_id`` (one host), or with ``owner`` (rank slot per routed expert: a copy on
    every expert rank) ``shared_id + owner[first routed expert]``, the copy on the rank the
    token's row reaches anyway."""
    n = top_k_index.shape[0]
    if owner is None:
        last = top_k_index.new_full((n, 1), shared_id)
    else:
        last = shared_id + _owner_table(owner, top_k_index.device)[top_k_index[:, :1]].to(top_k_index.dtype)
    index = torch.cat([top_k_index, last], dim=1)
    g = top_k_weights.new_ones((n, 1)) if gate is None else gate.reshape(n, 1).to(top_k_weights.dtype)
    return index, torch.cat([top_k_weights, g], dim=1)


def row_ranks(ids: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """The expert-rank slot of every row of ``pack`` (its valid slots all share one)."""
    return owner[ids.amax(dim=1)]


def tokens_reaching(ids: torch.Tensor, owner: torch.Tensor, ranks) -> list[int]:
    """For each of ``ranks``, how many tokens of ``ids`` ([tokens, top_k] expert ids, -1:
    none) have at least one expert on it under ``owner`` (rank per expert): the message rows
    each rank gets, one per (token, rank), as :func:`pack` makes them."""
    on = owner[ids.clamp(min=0)]
    valid = ids >= 0
    return [int(((on == r) & valid).any(1).sum()) for r in ranks]


def expand(xs: torch.Tensor, ids: torch.Tensor, ws: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, slot) pairs of the valid slots, row-major: (x per pair, id [P,1], weight [P,1], row)."""
    row, slot = (ids >= 0).nonzero(as_tuple=True)
    return xs[row], ids[row, slot].unsqueeze(1), ws[row, slot].unsqueeze(1), row


def reduce_rows(y_pairs: torch.Tensor, row: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Sum the pairs' weighted expert outputs per row: [R, H]."""
    out = y_pairs.new_zeros((xs.shape[0], y_pairs.shape[1]))
    return out.index_add(0, row, y_pairs)


def expert_rows(experts: nn.Module, xs: torch.Tensor, ids: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """What an expert rank computes for its rows (``ids``: ids the module knows, -1 elsewhere)."""
    x, e, w, row = expand(xs, ids, ws)
    return reduce_rows(experts(x, e, w), row, xs)


_OWNER_TABLES: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _owner_table(owner: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Built once per (placement, device): pack runs per layer and micro-batch, and on a GPU a
    # fresh torch.tensor() would be a host-to-device copy each time.
    key = (owner, device)
    table = _OWNER_TABLES.get(key)
    if table is None:
        table = _OWNER_TABLES[key] = torch.tensor(owner, dtype=torch.long, device=device)
    return table


def combine(ys: torch.Tensor, token: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Sum each token's rows (one per expert rank it reached), in rank order: [N, H]."""
    return ys.new_zeros((n.shape[0], ys.shape[1])).index_add(0, token, ys)
