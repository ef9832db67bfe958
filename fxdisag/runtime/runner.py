"""The step runner: one rank's action list, run phase by phase through handler tables.

Contract
--------
A :class:`StepRunner` runs ``schedule.actions[rank]`` for one training step:

* handler sets (attention, experts; both for expert parallelism) ``register`` a handler
  per action kind of their role; a kind registered twice, or an action with no handler,
  is an error naming the kind. Nothing patches an instance;
* ``start(batch)`` creates the step's :class:`StepState` (the only place one is made)
  and lets every handler set fill in its part;
* ``run("forward")`` / ``run("backward", loss_grad=g)`` run the two phases of the
  schedule (:meth:`~fxdisag.schedule.Schedule.phase`); ``REDUCE`` belongs to the runner
  (drain the mailbox, then finish every handler set's gradient sync);
* after the backward phase every registered parameter's ``.grad`` holds ``old + g *
  d(global loss)/d(param)``, summed over its group.

Schedules whose forward phase already runs backward computation (1F1B-like) cannot know
the loss gradient ``g`` then: they run backward with ``g = 1`` and multiply this step's
gradient contributions by ``g`` in the backward phase (skipped when ``g == 1``). Every
rank applies its own ``g``, so every rank must scale the loss the same way (as
``loss.backward()`` on the same global loss does). Under ``torch.no_grad()`` only the
forward-kind actions of the forward phase run (the validator checks that this
projection cannot deadlock).

Pseudo-code::

    state = runner.start(batch)            # new StepState; handler sets prepare it
    runner.run("forward")                  # loss shares land in state.losses
    ... all-reduce the loss, return it ...
    runner.run("backward", loss_grad=g)    # from loss.backward(); ends with REDUCE
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from fxdisag.runtime.faults import PeerError
from fxdisag.runtime.grads import GradSync
from fxdisag.runtime.mailbox import Mailbox, Receive
from fxdisag.runtime.timeline import Span
from fxdisag.schedule import Action, ActionKind, Schedule, format_grid, grid_step

__all__ = ["Handler", "HandlerSet", "StepRunner", "StepState"]


@dataclass
class StepState:
    """What one step keeps between its actions. Made by :meth:`StepRunner.start` only."""

    grad_enabled: bool
    # (channel, layer, mb, chunk) for D C GC GD; (channel, cut, mb) for H GH
    recvs: dict[tuple, list[Receive]] = field(default_factory=dict)
    # attention side
    env: list[dict[str, object]] = field(default_factory=list)  # per micro-batch: value by node name
    loss_scale: list[float] = field(default_factory=list)  # micro-batch's share of the global loss
    loss_grad: float = 1.0  # d(what backward is called on)/d(global loss); 1 until known
    leaves: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)  # (stage, mb)
    outs: dict[tuple[int, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    grads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per mb: grad by node name
    sent_counts: dict[tuple[int, int], list[int]] = field(default_factory=dict)  # rows per expert rank
    row_shape: tuple[int, torch.dtype, torch.dtype] | None = None  # hidden, row dtype, weight dtype
    losses: list[torch.Tensor] = field(default_factory=list)
    hop_sent: dict[tuple[int, int], list] = field(default_factory=dict)  # (cut, mb): grad layout of an H sent
    hop_grads: dict[tuple[int, int], list] = field(default_factory=dict)  # (cut, mb): grad layout of an H received
    # expert side
    capacity_rows: int = 0  # most rows one attention rank may dispatch in one message
    # (layer, mb, piece) -> (rows, weights, expert output, rows per attention peer): runtime/chunking.py
    saved: dict[tuple[int, int, int], tuple] = field(default_factory=dict)
    results: dict[tuple, object] = field(default_factory=dict)  # (channel, layer, mb, chunk) -> per-peer tensors


Handler = Callable[[StepState, Action], None]


class HandlerSet(Protocol):
    """What a role contributes to a runner: handlers, per-step preparation, gradient sync."""

    role: str  # "A" or "E"
    grad_sync: GradSync

    def handlers(self) -> Mapping[ActionKind, Handler]: ...

    def prepare(self, state: StepState, batch: Mapping[str, torch.Tensor]) -> None: ...


class StepRunner:
    def __init__(self, schedule: Schedule, rank: int, mailbox: Mailbox, trace: bool = False):
        self.schedule = schedule
        self.rank = rank
        self.mailbox = mailbox
        self.trace = trace
        self.spans: list[Span] = []  # wall-clock (time.time()) spans of the last step
        self._handlers: dict[ActionKind, Handler] = {}
        self._sets: list[HandlerSet] = []
        self._state: StepState | None = None
        self._deferred = schedule.defers_loss_grad(rank)

    # ---- setup
    def register(self, handler_set: HandlerSet) -> None:
        """Add a handler set; its kinds must be of its role and not registered yet."""
        if handler_set.role not in self.schedule.roles(self.rank):
            raise ValueError(f"rank {self.rank} has role {self.schedule.role(self.rank)} in the schedule; "
                             f"cannot register {type(handler_set).__name__} (role {handler_set.role})")
        for kind, fn in handler_set.handlers().items():
            if kind.role != handler_set.role:
                raise ValueError(f"{type(handler_set).__name__} registers {kind.name}, a kind of role {kind.role}")
            if kind in self._handlers or kind is ActionKind.REDUCE:
                raise ValueError(f"action kind {kind.name} already has a handler on rank {self.rank}")
            self._handlers[kind] = fn
        self._sets.append(handler_set)

    def check_complete(self) -> None:
        """Every action of the rank has a handler (call once all sets are registered)."""
        missing = sorted({a.kind.name for a in self.schedule.actions[self.rank]
                          if a.kind is not ActionKind.REDUCE and a.kind not in self._handlers})
        if missing:
            raise ValueError(f"rank {self.rank} ({self.schedule.role(self.rank)}) has no handler for "
                             f"action kinds {missing}; register the handler set of their role")

    # ---- one step
    @property
    def state(self) -> StepState:
        if self._state is None:
            raise RuntimeError("no step in progress: call StepRunner.start(batch) first")
        return self._state

    @property
    def in_step(self) -> bool:
        return self._state is not None

    def start(self, batch: Mapping[str, torch.Tensor]) -> StepState:
        state = StepState(grad_enabled=torch.is_grad_enabled())
        for s in self._sets:
            s.prepare(state, batch)
        self._state = state
        self.spans = []
        self.mailbox.reset_counters()
        if self._deferred and state.grad_enabled:
            for s in self._sets:
                s.grad_sync.begin()  # backward runs in the forward phase
        return state

    def local_loss(self) -> torch.Tensor:
        """This rank's share of the global loss (zero on ranks without the last stage)."""
        losses = self.state.losses
        return (torch.stack(losses).sum() if losses else torch.zeros(())).detach()

    def run(self, phase: str, loss_grad: float = 1.0) -> None:
        """Run the rank's actions of ``phase``; the backward phase ends the step."""
        state = self.state
        offset = 0 if phase == "forward" else self.schedule.forward_length(self.rank)
        actions = list(enumerate(self.schedule.phase(self.rank, phase), offset))
        if phase == "forward" and not state.grad_enabled:
            actions = [(n, a) for n, a in actions if not a.kind.is_backward]
        if phase == "backward":
            if not state.grad_enabled:
                raise RuntimeError("the step's forward ran under torch.no_grad(): there is no backward to run")
            if self._deferred:
                if loss_grad != 1.0:
                    for s in self._sets:
                        s.grad_sync.scale(loss_grad)
            else:
                state.loss_grad = loss_grad
                for s in self._sets:
                    s.grad_sync.begin()
        try:
            self._run_actions(state, actions)
        finally:
            if phase == "backward":
                self._state = None

    def finish_without_backward(self) -> None:
        """End a step whose forward ran under ``torch.no_grad()``: wait for the sends, drop state."""
        self.mailbox.drain()
        self._state = None

    def _run_actions(self, state: StepState, actions: list[tuple[int, Action]]) -> None:
        for index, action in actions:
            start = time.time()
            waited = self.mailbox.wait_seconds
            try:
                if action.kind is ActionKind.REDUCE:
                    self._reduce()
                else:
                    self._handlers[action.kind](state, action)
            except Exception as exc:
                raise self._error(index, action, exc) from exc
            if self.trace:
                self._record(action, start, time.time(), self.mailbox.wait_seconds - waited)

    def _reduce(self) -> None:
        self.mailbox.drain()
        for s in self._sets:
            s.grad_sync.finish()

    def _error(self, index: int, action: Action, exc: Exception) -> RuntimeError:
        step = grid_step(self.schedule, self.rank, index)
        mark = (step, self.rank) if step is not None else None
        if isinstance(exc, PeerError):  # a hung or lost peer: keep its type, name the action
            return exc.located(f" at action {index} ({action}), grid step {step} (marked !!)",
                               format_grid(self.schedule, mark=mark))
        return RuntimeError(
            f"rank {self.rank} failed at action {index} ({action}), grid step {step} (marked !!): "
            f"{type(exc).__name__}: {exc}\n" + format_grid(self.schedule, mark=mark)
        )

    def _record(self, action: Action, start: float, end: float, waited: float) -> None:
        kind = action.kind
        if kind.is_compute:
            if waited > 0:
                self.spans.append(Span(self.rank, action, start, start + waited, "recv-wait"))
            self.spans.append(Span(self.rank, action, min(start + waited, end), end, "compute"))
        elif kind.is_send:
            # The post, not the transfer: gloo moves the bytes in the background.
            self.spans.append(Span(self.rank, action, start, end, "send"))
        elif kind is ActionKind.REDUCE:
            self.spans.append(Span(self.rank, action, start, end, "reduce"))
