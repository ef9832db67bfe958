"""Compute-only steps around the token exchange (Megatron-Core dispatcher style).

Contract::

    xs, ws, ids, inv = pack(hidden[N,H], top_k_index[N,K], top_k_weights[N,K], owner=(r_0..r_{E-1}))
    # one row per (token, slot) pair, grouped by the expert rank that owns the chosen expert:
    #   xs [N*K, H]   token rows       (differentiable w.r.t. hidden)
    #   ws [N*K, 1]   routing weights  (differentiable w.r.t. top_k_weights)
    #   ids[N*K, 1]   global expert id (rows per expert rank = bincount(owner[ids]))
    #   inv [N*K]     inverse permutation back to (token, slot) order
    ys = experts(xs, ids, ws)                          # anywhere: one process or many
    out = combine(ys, inv, top_k=K)                    # [N, H] == experts(hidden, top_k_index, top_k_weights)

``pack`` and ``combine`` do no communication; the exchange in between is the only part
that differs between one process (the experts module called in place) and the
disaggregated runtime (rows sent to expert ranks and back). Overlap is therefore a
scheduling decision, not a rewrite of these functions.

``combine`` sums the K slots of a token in slot order, as the transformers experts
implementations do (``view(N, K, H).sum(1)``), so results match them.
"""

from __future__ import annotations

import torch

__all__ = ["pack", "combine"]


def pack(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    owner: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    owner_of = _owner_table(owner, expert_ids.device)
    rank_slot = owner_of[expert_ids]
    # Stable sort keeps (token, slot) order inside each rank's block: deterministic buffers.
    perm = torch.sort(rank_slot, stable=True).indices
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    token_of_pair = perm // top_k
    xs = hidden[token_of_pair]
    ws = top_k_weights.reshape(-1)[perm].unsqueeze(1)
    ids = expert_ids[perm].unsqueeze(1)
    return xs, ws, ids, inv


_OWNER_TABLES: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _owner_table(owner: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Built once per (placement, device): pack runs per layer and micro-batch, and on a GPU a
    # fresh torch.tensor() would be a host-to-device copy each time.
    key = (owner, device)
    table = _OWNER_TABLES.get(key)
    if table is None:
        table = _OWNER_TABLES[key] = torch.tensor(owner, dtype=torch.long, device=device)
    return table


def combine(ys: torch.Tensor, inv: torch.Tensor, top_k: int) -> torch.Tensor:
    pairs, hidden = ys.shape
    return ys[inv].view(pairs // top_k, top_k, hidden).sum(dim=1)

