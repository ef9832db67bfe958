"""Routing tables: from a plan's placement to what each rank needs at run time.

Contract: ``Routing.from_plan(plan, num_experts)`` gives

* ``held[r]``      -- the experts expert rank ``r`` holds, ascending (its local ids are the
                      positions in this list);
* ``owner_slot(a)``-- for attention rank ``a``, per expert, the slot (index into
                      ``expert_ranks``) of the replica ``a`` sends that expert's rows to
                      (``plan.expert_owner(a)``);
* ``local_id(a)``  -- per expert, its local id on that replica;
* ``replica_sets`` -- each set of >= 2 expert ranks that share experts, with the shared
                      experts: their gradients are summed over the set after backward.

Every rank computes the same tables from the same plan, so no table is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fxdisag.planner.plan import Plan

__all__ = ["Routing", "SlotRouting"]


@dataclass
class Routing:
    attention_ranks: list[int]
    expert_ranks: list[int]
    placement: list[list[int]]
    owners: dict[int, list[int]]  # attention rank -> expert rank per expert

    @classmethod
    def from_plan(cls, plan: "Plan", num_experts: int) -> "Routing":
        placement = [list(p) for p in plan.expert_placement]
        if len(placement) != num_experts:
            raise ValueError(f"plan places {len(placement)} experts; the model has {num_experts} per MoE layer")
        experts = list(plan.expert_ranks)
        for e, ranks in enumerate(placement):
            if not ranks:
                raise ValueError(f"plan places expert {e} on no rank")
            stray = [r for r in ranks if r not in experts]
            if stray:
                raise ValueError(f"plan places expert {e} on ranks {stray}, which are not expert ranks {experts}")
        owners = {}
        for a in plan.attention_ranks:
            owner = list(plan.expert_owner(a))
            for e, r in enumerate(owner):
                if r not in placement[e]:
                    raise ValueError(f"plan routes expert {e} of attention rank {a} to rank {r}, which does not hold it")
            owners[a] = owner
        return cls(list(plan.attention_ranks), experts, placement, owners)

    def held(self, rank: int) -> list[int]:
        return [e for e, ranks in enumerate(self.placement) if rank in ranks]

    def owner_slot(self, attention_rank: int) -> list[int]:
        return [self.expert_ranks.index(r) for r in self.owners[attention_rank]]

    def local_id(self, attention_rank: int) -> list[int]:
        return [self.held(r).index(e) for e, r in enumerate(self.owners[attention_rank])]

    @property
    def replica_sets(self) -> list[tuple[tuple[int, ...], list[int]]]:
        """(ranks, experts) for every group of >= 2 ranks sharing experts, in a fixed order."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for e, ranks in enumerate(self.placement):
            if len(ranks) > 1:
                groups.setdefault(tuple(sorted(ranks)), []).append(e)
        return sorted(groups.items())


@dataclass
class SlotRouting:
    """One rank's view of a group's routing (pipeline depth p > 1): the rank behaves as the
    rank ``ref`` of the same slot in the group the tables were made for, whose slot
    pattern every group shares. Replica sets are named with ``rank`` in place of ``ref``."""

    base: Routing
    rank: int
    ref: int

    def _as_ref(self, r: int) -> int:
        return self.ref if r == self.rank else r

    def held(self, rank: int) -> list[int]:
        return self.base.held(self._as_ref(rank))

    def owner_slot(self, attention_rank: int) -> list[int]:
        return self.base.owner_slot(self._as_ref(attention_rank))

    def local_id(self, attention_rank: int) -> list[int]:
        return self.base.local_id(self._as_ref(attention_rank))

    @property
    def replica_sets(self) -> list[tuple[tuple[int, ...], list[int]]]:
        return [(self.rename(ranks), experts) for ranks, experts in self.base.replica_sets]

    def rename(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(self.rank if r == self.ref else r for r in ranks))
