"""The expert-parallel (EP) baseline: every rank runs attention *and* some experts.

Contract: on W ranks, each rank holds the attention layers (data parallel, its own
1/W of the batch) and E/W experts of every MoE layer; every MoE layer's dispatch and
combine are all-to-all exchanges among all W ranks, forward and backward. The result
(loss, every gradient) equals one process computing the whole batch, exactly as the
AF-pipe runtime does, so the two modes can be compared on the same model, ranks,
global batch and micro-batches.

It reuses the AF-pipe machinery: the same split program, an ``AttentionWorker`` and an
``ExpertWorker`` in one process sharing one ``Mailbox`` (rows a rank routes to its own
experts are handed over in memory). Only the action list differs -- it is the usual EP
order, with no cross-micro-batch overlap:

    forward, for each micro-batch i, for each stage s:
        <D(s,i)  F(s,i)  >D(s,i)  <C(s,i)  EF(s,i)  >C(s,i)          # F(s+1,i) waits for C(s,i)
    backward, for each micro-batch i, for each stage s from the last:
        <GC(s-1,i)  <GD(s-1,i)  B(s,i)  >GC(s-1,i)  EB(s-1,i)  >GD(s-1,i)
    R

Every exchange posts all of its receives before any send: gloo runs a pair half-duplex
when a send is posted first, and ``all_to_all_single`` reaches about half the link rate
(../shared/notes/cpu-cluster-emulation.md). EP is a baseline to measure against, so it
gets that care too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fxdisag.runtime.executor import AttentionWorker, ExpertWorker
from fxdisag.runtime.schedule import Action, ActionKind, Schedule

__all__ = ["EPPlan", "ep_schedule", "EPWorker", "ATTENTION_KINDS", "EXPERT_KINDS"]

ATTENTION_KINDS = {ActionKind.F, ActionKind.B, ActionKind.SEND_D, ActionKind.RECV_C, ActionKind.SEND_GC, ActionKind.RECV_GD}
EXPERT_KINDS = {ActionKind.EF, ActionKind.EB, ActionKind.RECV_D, ActionKind.SEND_C, ActionKind.RECV_GC, ActionKind.SEND_GD}


@dataclass
class EPPlan:
    """Expert parallelism over ``world`` ranks: experts in contiguous blocks, ``m`` micro-batches."""

    world: int
    num_experts: int
    num_microbatches: int

    @property
    def attention_ranks(self) -> list[int]:
        return list(range(self.world))

    @property
    def expert_ranks(self) -> list[int]:
        return list(range(self.world))

    @property
    def expert_placement(self) -> list[list[int]]:
        return [[e * self.world // self.num_experts] for e in range(self.num_experts)]

    def __str__(self) -> str:
        per = ", ".join(
            f"rank {r}: experts {[e for e, (o,) in enumerate(self.expert_placement) if o == r]}" for r in range(self.world)
        )
        return f"EP baseline: {self.world} ranks (attention on all), {self.num_microbatches} micro-batches; {per}"


def ep_schedule(ranks: Sequence[int], num_moe_layers: int, num_microbatches: int) -> Schedule:
    """The EP action list of every rank (all ranks do the same; see the module docstring)."""
    ranks = tuple(sorted(ranks))
    J, m = num_moe_layers, num_microbatches
    if J < 1 or m < 1:
        raise ValueError(f"ep_schedule: need num_moe_layers >= 1 and num_microbatches >= 1, got {J}, {m}")
    K = ActionKind
    acts: list[Action] = []
    for i in range(m):
        for s in range(J + 1):
            if s < J:
                acts.append(Action(K.RECV_D, s, i, ranks))
            acts.append(Action(K.F, s, i))
            if s < J:
                acts += [
                    Action(K.SEND_D, s, i, ranks),
                    Action(K.RECV_C, s, i, ranks),
                    Action(K.EF, s, i),
                    Action(K.SEND_C, s, i, ranks),
                ]
    for i in range(m):
        for s in reversed(range(J + 1)):
            if s > 0:
                acts += [Action(K.RECV_GC, s - 1, i, ranks), Action(K.RECV_GD, s - 1, i, ranks)]
            acts.append(Action(K.B, s, i))
            if s > 0:
                acts += [Action(K.SEND_GC, s - 1, i, ranks), Action(K.EB, s - 1, i), Action(K.SEND_GD, s - 1, i, ranks)]
    acts.append(Action(K.REDUCE, -1, -1, ranks))
    return Schedule(ranks, ranks, J, m, {r: list(acts) for r in ranks})


class EPWorker:
    """One EP rank: an attention worker and an expert worker sharing a mailbox."""

    def __init__(self, attention: AttentionWorker, experts: ExpertWorker):
        self.attention = attention
        self.experts = experts
        experts.mailbox = attention.mailbox
        self.rank = attention.rank
        self.schedule = attention.schedule
        self.mailbox = attention.mailbox
        self.trace_enabled = attention.trace_enabled
        self.actions: list[Action] = []
        self.action_offset = 0
        attention.execute = self._route  # the attention worker drives the loop
        self._attention_execute = AttentionWorker.execute.__get__(attention)

    @property
    def spans(self):
        return self.attention.spans

    @property
    def loss_scale(self):
        return self.attention.loss_scale

    @loss_scale.setter
    def loss_scale(self, value):
        self.attention.loss_scale = value

    def _route(self, action: Action) -> None:
        if action.kind in EXPERT_KINDS:
            self.experts.execute(action)
        elif action.kind is ActionKind.REDUCE:
            self._attention_execute(action)  # drains the shared mailbox, all-reduces attention grads
            self.experts.grad_sync.finish()  # no replicas in EP: only restores set-aside grads
        else:
            self._attention_execute(action)

    def step(self, batch):
        self.experts.recvs, self.experts.saved, self.experts.counts, self.experts.results = {}, {}, {}, {}
        self.attention.actions, self.attention.action_offset = self.actions, self.action_offset
        return self.attention.step(batch)

    def _run_actions(self) -> None:
        self.attention.actions, self.attention.action_offset = self.actions, self.action_offset
        self.attention._run_actions()

    def clear(self) -> None:
        self.attention.clear()

    def begin_backward(self) -> None:
        self.attention.begin_backward()
        self.experts.begin_backward()
