"""Local experts: an experts module holding only the experts one rank owns.

Contract: ``local_experts(experts, expert_ids)`` returns a module of the same class that
computes, for rows routed to *local* ids ``0..len(expert_ids)-1``, exactly what the
full module computes for the global ids ``expert_ids``. Its parameters are new tensors
(slices of the originals along the expert dimension), and ``num_experts``, when the
class keeps one, is set to the local count -- the transformers experts implementations
size their grouping by it (the same attribute their own expert parallelism sets).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["local_experts"]


def local_experts(experts: nn.Module, expert_ids: Sequence[int]) -> nn.Module:
    ids = torch.tensor(list(expert_ids), dtype=torch.long)
    params = dict(experts.named_parameters(recurse=False))
    num_experts = next(iter(params.values())).shape[0]
    if ids.numel() == 0:
        raise ValueError("a rank with no experts cannot run an experts module; check the plan's placement")
    if int(ids.max()) >= num_experts or int(ids.min()) < 0:
        raise ValueError(f"expert ids {list(expert_ids)} out of range for {num_experts} experts")
    # Copy the module without its parameters (they may be huge), then attach the slices.
    saved = experts._parameters
    experts._parameters = {}
    try:
        local = copy.deepcopy(experts, memo={})
    finally:
        experts._parameters = saved
    for name, p in params.items():
        sliced = p.detach()[ids.to(p.device)].clone()
        local.register_parameter(name, nn.Parameter(sliced, requires_grad=p.requires_grad))
    for name, buf in list(experts.named_buffers(recurse=False)):
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == num_experts:
            local.register_buffer(name, buf[ids.to(buf.device)].clone())
    if getattr(local, "num_experts", None) == num_experts:
        local.num_experts = ids.numel()
    local.fxdisag_expert_ids = tuple(int(i) for i in ids)
    return local

