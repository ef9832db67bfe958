"""Gradient synchronisation at the end of a step (the REDUCE action).

Contract: between ``begin()`` (before the step's backward) and ``finish()`` (its REDUCE),
only *this step's* gradient contributions are summed over each group; gradients that were
already accumulated in ``.grad`` (gradient accumulation over several steps) are set aside
and added back unchanged, so every group member ends with ``old + sum_over_group(new)``.
``scale(g)`` multiplies this step's contributions by ``g`` before they are summed (a
schedule that runs backward before the loss gradient is known seeds it with 1).

* attention ranks: every attention parameter, summed over the attention group
  (data parallel);
* expert ranks: the rows of experts that several expert ranks hold (replicas), summed over
  each replica set -- one flat all-reduce per set, sets in a fixed order on every member.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fxdisag.runtime.faults import DEFAULT_TIMEOUT, wait_work

__all__ = ["GradSync", "RowGroup"]


@dataclass
class RowGroup:
    """Sum ``param.grad[rows]`` of ``params`` over ``group`` (all rows when ``rows`` is None)."""

    params: list[nn.Parameter]
    group: dist.ProcessGroup | None
    rows: list[int] | None = None
    timeout: float = DEFAULT_TIMEOUT  # seconds the all-reduce may wait for the group (disaggregate(timeout=))

    def all_reduce(self) -> None:
        grads = []
        for p in self.params:
            if p.grad is None:  # every member must reduce the same buffers
                p.grad = torch.zeros_like(p)
            grads.append(p.grad if self.rows is None else p.grad[self.rows])
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        ranks = dist.get_process_group_ranks(self.group) if self.group is not None else list(
            range(dist.get_world_size()))
        what = "the attention gradients' all-reduce did not complete" if self.rows is None else \
            f"the all-reduce of replicated experts' gradients (local experts {self.rows}) did not complete"
        wait_work(dist.all_reduce(flat, group=self.group, async_op=True), dist.get_rank(),
                  [r for r in ranks if r != dist.get_rank()], what, self.timeout)
        for p, reduced in zip(self.params, torch._utils._unflatten_dense_tensors(flat, grads)):
            if self.rows is None:
                p.grad.copy_(reduced)
            else:
                p.grad[self.rows] = reduced


class GradSync:
    def __init__(self, params: list[nn.Parameter], groups: list[RowGroup]):
        self.params = params
        self.groups = [g for g in groups if g.group is not None and dist.get_world_size(g.group) > 1]
        self._stash: list[torch.Tensor | None] | None = None

    def begin(self) -> None:
        self._stash = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    def scale(self, factor: float) -> None:
        """Multiply this step's gradient contributions (those since ``begin()``) by ``factor``."""
        if self._stash is None:
            raise RuntimeError("GradSync.scale() outside a step: call begin() first")
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(factor)

    def finish(self) -> None:
        for g in self.groups:
            g.all_reduce()
        if self._stash is not None:
            for p, old in zip(self.params, self._stash):
                if old is not None:
                    p.grad = old if p.grad is None else p.grad.add_(old)
            self._stash = None
