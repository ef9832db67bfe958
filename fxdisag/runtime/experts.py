"""Local experts: the experts one rank computes, as a module taking local ids.

Contract: ``local_experts(experts, expert_ids)`` returns a module of the same class that
computes, for rows routed to *local* ids ``0..len(expert_ids)-1``, exactly what the
full module computes for the global ids ``expert_ids``. Its parameters are new tensors
(slices of the originals along the expert dimension), and ``num_experts``, when the
class keeps one, is set to the local count -- the transformers experts implementations
size their grouping by it (the same attribute their own expert parallelism sets).

``model_experts(experts, expert_ids)`` computes the same with the *full* module's own
parameters (local id i -> global id ``expert_ids[i]``): gradients land in the model's
parameters, in the rows of the rank's experts (zero elsewhere). The torch.compile front
door uses it, so the optimizer a user built on ``model.parameters()`` trains them.
``expert_tensors(module)`` lists (name, tensor, rows of the rank's experts) for either.

``WithSharedExpert(routed, shared, shared_id)`` is one MoE layer's experts call with its
shared experts as one more, always-selected expert (``Plan.shared_expert_ranks``): a
(row, expert, weight) triple with expert ``shared_id`` (or above) computes ``weight * shared(row)``,
every other the routed module; its ``fxdisag_expert_ids`` are the routed ones.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ModelExperts", "WithSharedExpert", "expert_tensors", "local_experts", "model_experts",
           "routed_experts"]


def _check_ids(ids: torch.Tensor, num_experts: int) -> None:
    if ids.numel() == 0:
        raise ValueError("a rank with no experts cannot run an experts module; check the plan's placement")
    if int(ids.max()) >= num_experts or int(ids.min()) < 0:
        raise ValueError(f"expert ids {ids.tolist()} out of range for {num_experts} experts")


def local_experts(experts: nn.Module, expert_ids: Sequence[int]) -> nn.Module:
    ids = torch.tensor(list(expert_ids), dtype=torch.long)
    params = dict(experts.named_parameters(recurse=False))
    num_experts = next(iter(params.values())).shape[0]
    _check_ids(ids, num_experts)
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



class ModelExperts(nn.Module):
    """The rank's experts, computed with the full experts module's parameters."""

    def __init__(self, experts: nn.Module, expert_ids: Sequence[int]):
        super().__init__()
        self.full = experts
        self.register_buffer("global_ids", torch.tensor(list(expert_ids), dtype=torch.long), persistent=False)
        self.fxdisag_expert_ids = tuple(int(i) for i in expert_ids)

    def forward(self, hidden: torch.Tensor, local_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.full(hidden, self.global_ids[local_ids], weights)


def model_experts(experts: nn.Module, expert_ids: Sequence[int]) -> ModelExperts:
    num_experts = next(experts.parameters()).shape[0]
    _check_ids(torch.tensor(list(expert_ids), dtype=torch.long), num_experts)
    return ModelExperts(experts, expert_ids)


class WithSharedExpert(nn.Module):
    """The routed experts and the shared experts of one MoE layer, as one experts call (module docstring).

    ``shared`` is the model's own shared-experts module (its parameters train in place);
    ``shared_id`` the id the dispatch gives it, one past the routed ids ``routed`` knows."""

    def __init__(self, routed: nn.Module, shared: nn.Module, shared_id: int):
        super().__init__()
        self.routed = routed
        self.shared = shared
        self.shared_id = int(shared_id)
        ids = getattr(routed, "fxdisag_expert_ids", None)
        if ids is not None:
            self.fxdisag_expert_ids = ids

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # one (row, expert, weight) triple per call row (K = 1: dispatch.expand); ids from
        # shared_id up are the shared experts (the single-process graph numbers their copies)
        is_shared = ids[:, 0] >= self.shared_id
        r_idx = (~is_shared).nonzero().squeeze(1)
        s_idx = is_shared.nonzero().squeeze(1)
        y_r = self.routed(hidden[r_idx], ids[r_idx], weights[r_idx])
        y_s = self.shared(hidden[s_idx])
        y_s = y_s * weights[s_idx].to(y_s.dtype)
        out = y_r.new_zeros((hidden.shape[0], y_r.shape[1]))
        return out.index_copy(0, r_idx, y_r).index_copy(0, s_idx, y_s.to(out.dtype))


def routed_experts(module: nn.Module) -> nn.Module:
    """The routed experts of an expert rank's module (itself, or a :class:`WithSharedExpert`'s)."""
    return module.routed if isinstance(module, WithSharedExpert) else module


def expert_tensors(module: nn.Module) -> list[tuple[str, nn.Parameter, slice | list[int]]]:
    module = routed_experts(module)
    if isinstance(module, ModelExperts):
        rows = list(module.fxdisag_expert_ids)
        return [(n, p, rows) for n, p in module.full.named_parameters(recurse=False)]
    return [(n, p, slice(None)) for n, p in module.named_parameters(recurse=False)]
