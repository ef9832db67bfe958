"""Schedules as data: action kinds (one table), actions, per-rank action lists.

Contract
--------
:data:`KINDS` is the only place that says what an action kind is: the role that runs
it (``"A"`` attention, ``"E"`` experts, ``"*"`` any), its direction (compute, send,
recv, collective), the message channel of a comm kind (a ``SEND_x`` matches a
``RECV_x``) and whether it belongs to the backward pass. Everything else -- the
validator, the grid, the simulator, the runtime's handler tables, the timeline --
reads these properties instead of listing kinds.

A :class:`Schedule` maps every rank to the ordered list of :class:`Action` s it runs in
one training step, and says where each rank's *forward phase* ends: the actions the
``forward`` call runs; the rest run in ``loss.backward()`` (:meth:`Schedule.phase`).

Model cut
---------
With J MoE layers there are J+1 attention stages (stage s runs everything between the
experts call of MoE layer s-1 and that of layer s; stage 0 starts at the inputs, stage
J ends with the loss) and J expert stages (layer j = the routed experts of MoE layer
j). A micro-batch i goes F(0,i) -> EF(0,i) -> F(1,i) -> ... -> F(J,i), then B(J,i) ->
EB(J-1,i) -> B(J-1,i) -> ... -> B(0,i).

Actions and notation (``str(action)``; this is what the grid shows)
-----------------------------------------------------------------
=============  ======================  ==========================================
kind           str                     meaning (``stage`` = s for F/B, j otherwise)
=============  ======================  ==========================================
F / B          ``F1.0`` / ``B1.0``     attention forward / backward of stage 1, mb 0
EF / EB        ``EF0.1`` / ``EB0.1``   expert forward / backward of MoE layer 0, mb 1
SEND_D/RECV_D  ``>D0.1`` / ``<D0.1``   dispatch (attention -> experts) of layer 0
SEND_C/RECV_C  ``>C0.1`` / ``<C0.1``   combine (experts -> attention) of layer 0
SEND_GC/RECV_GC ``>GC0.1``/``<GC0.1``  grad of the combine output (attention -> experts)
SEND_GD/RECV_GD ``>GD0.1``/``<GD0.1``  grad of dispatched rows + routing weights
                                       (experts -> attention)
REDUCE         ``R``                   end-of-step gradient all-reduce
=============  ======================  ==========================================

``peers`` holds the ranks on the other side of a comm action (a SEND's destinations, a
RECV's sources), in rank order, and is empty for compute. A comm kind of role A talks
to expert ranks, one of role E to attention ranks; a rank that has both roles (expert
parallelism) may be its own peer. For REDUCE, ``stage = microbatch = -1`` and ``peers``
is every rank of the groups the rank belongs to, itself included.

Runtime semantics (the runtime follows these; the grid and the simulator model them)
-------------------------------------------------------------------------------------
* A RECV *posts* a non-blocking receive (one per peer) and returns at once.
* A compute action waits for the data it consumes (:func:`consumes`), then runs.
* A SEND posts a non-blocking send (one per peer) of what a compute produced
  (:func:`produced_by`). Every peer gets a message, possibly with zero rows, so that
  matching is static.
* With NCCL, messages between an ordered pair (src, dst) match in FIFO order, so the
  sender's sends to dst and dst's receives from src come in the same order.
* REDUCE is a collective over ``peers``; every member reaches it once, last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Action",
    "ActionKind",
    "KINDS",
    "Key",
    "KindInfo",
    "Schedule",
    "consumes",
    "produced_by",
    "required_actions",
    "required_before",
]


@dataclass(frozen=True)
class KindInfo:
    role: str  # "A" (attention ranks), "E" (expert ranks) or "*" (every rank)
    direction: str  # "compute" | "send" | "recv" | "collective"
    channel: str | None  # "D" | "C" | "GC" | "GD" for comm kinds
    backward: bool  # part of the backward pass


class ActionKind(str, Enum):
    F = "F"
    B = "B"
    EF = "EF"
    EB = "EB"
    SEND_D = "SEND_D"
    RECV_D = "RECV_D"
    SEND_C = "SEND_C"
    RECV_C = "RECV_C"
    SEND_GC = "SEND_GC"
    RECV_GC = "RECV_GC"
    SEND_GD = "SEND_GD"
    RECV_GD = "RECV_GD"
    REDUCE = "REDUCE"

    @property
    def info(self) -> KindInfo:
        return KINDS[self]

    @property
    def role(self) -> str:
        return KINDS[self].role

    @property
    def is_compute(self) -> bool:
        return KINDS[self].direction == "compute"

    @property
    def is_send(self) -> bool:
        return KINDS[self].direction == "send"

    @property
    def is_recv(self) -> bool:
        return KINDS[self].direction == "recv"

    @property
    def is_comm(self) -> bool:
        return self.is_send or self.is_recv

    @property
    def is_backward(self) -> bool:
        return KINDS[self].backward

    @property
    def channel(self) -> str:
        """``"D" | "C" | "GC" | "GD"`` for comm kinds."""
        channel = KINDS[self].channel
        if channel is None:
            raise ValueError(f"{self.name} is not a comm action kind")
        return channel

    @staticmethod
    def comm(direction: str, channel: str) -> "ActionKind":
        """The SEND (``direction="send"``) or RECV kind of ``channel``."""
        return _COMM[(direction, channel)]


_K = ActionKind
KINDS: dict[ActionKind, KindInfo] = {
    _K.F: KindInfo("A", "compute", None, False),
    _K.B: KindInfo("A", "compute", None, True),
    _K.EF: KindInfo("E", "compute", None, False),
    _K.EB: KindInfo("E", "compute", None, True),
    _K.SEND_D: KindInfo("A", "send", "D", False),
    _K.RECV_D: KindInfo("E", "recv", "D", False),
    _K.SEND_C: KindInfo("E", "send", "C", False),
    _K.RECV_C: KindInfo("A", "recv", "C", False),
    _K.SEND_GC: KindInfo("A", "send", "GC", True),
    _K.RECV_GC: KindInfo("E", "recv", "GC", True),
    _K.SEND_GD: KindInfo("E", "send", "GD", True),
    _K.RECV_GD: KindInfo("A", "recv", "GD", True),
    _K.REDUCE: KindInfo("*", "collective", None, True),
}
_COMM = {(i.direction, i.channel): k for k, i in KINDS.items() if i.channel is not None}
CHANNELS: tuple[str, ...] = ("D", "C", "GC", "GD")

# (kind, stage, microbatch): identifies an action on one rank.
Key = tuple[ActionKind, int, int]


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    stage: int
    microbatch: int
    peers: tuple[int, ...] = ()

    @property
    def key(self) -> Key:
        return (self.kind, self.stage, self.microbatch)

    def __str__(self) -> str:
        k = self.kind
        if k is ActionKind.REDUCE:
            return "R"
        if k.is_compute:
            return f"{k.value}{self.stage}.{self.microbatch}"
        return f"{'>' if k.is_send else '<'}{k.channel}{self.stage}.{self.microbatch}"


def key_str(key: Key) -> str:
    return str(Action(*key))


@dataclass
class Schedule:
    """Every rank's action list for one step, and where its forward phase ends.

    ``forward_len[rank]`` is the number of leading actions of ``actions[rank]`` that the
    forward call runs; by default (None) the actions before the rank's first
    backward-kind action (GPipe). A schedule whose forward phase holds backward actions
    (1F1B-like) runs them with the loss gradient taken as 1 and rescales the step's
    gradients once the real one is known; its backward phase may then hold no other
    backward computation than REDUCE (:func:`fxdisag.schedule.validate.validate`).
    """

    attention_ranks: tuple[int, ...]
    expert_ranks: tuple[int, ...]
    num_moe_layers: int
    num_microbatches: int
    actions: dict[int, list[Action]] = field(default_factory=dict)
    forward_len: dict[int, int] | None = None
    name: str = "gpipe"

    def __post_init__(self) -> None:
        self.attention_ranks = tuple(self.attention_ranks)
        self.expert_ranks = tuple(self.expert_ranks)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.attention_ranks) | set(self.expert_ranks)))

    def roles(self, rank: int) -> frozenset[str]:
        """``{"A"}``, ``{"E"}`` or both (expert parallelism) for a rank of the schedule."""
        roles = frozenset(
            r for r, group in (("A", self.attention_ranks), ("E", self.expert_ranks)) if rank in group
        )
        if not roles:
            raise KeyError(f"rank {rank} is in neither attention_ranks nor expert_ranks")
        return roles

    def role(self, rank: int) -> str:
        """``"A"``, ``"E"``, or ``"AE"`` for a rank with both roles."""
        return "".join(sorted(self.roles(rank)))

    def phase(self, rank: int, phase: str) -> list[Action]:
        """The actions ``rank`` runs in ``phase`` (``"forward"`` or ``"backward"``)."""
        acts = self.actions[rank]
        n = self.forward_length(rank)
        if phase == "forward":
            return acts[:n]
        if phase == "backward":
            return acts[n:]
        raise ValueError(f"phase must be 'forward' or 'backward', got {phase!r}")

    def forward_length(self, rank: int) -> int:
        acts = self.actions[rank]
        if self.forward_len is not None and rank in self.forward_len:
            return self.forward_len[rank]
        return next((k for k, a in enumerate(acts) if a.kind.is_backward), len(acts))

    def defers_loss_grad(self, rank: int) -> bool:
        """Whether ``rank`` runs backward computation before the loss gradient is known."""
        return any(a.kind.is_backward and a.kind.is_compute for a in self.phase(rank, "forward"))

    def __str__(self) -> str:
        from fxdisag.schedule.grid import format_grid

        return format_grid(self)


# ---------------------------------------------------------------- dependencies


def consumes(action: Action, num_moe_layers: int) -> Key | None:
    """The key of the RECV whose data the compute ``action`` waits for, or None.

    F(s,i) <- RECV_C(s-1,i) for s > 0; B(s,i) <- RECV_GD(s,i) for s < J;
    EF(j,i) <- RECV_D(j,i); EB(j,i) <- RECV_GC(j,i).
    """
    k, s, i = action.kind, action.stage, action.microbatch
    if k is ActionKind.F:
        return (ActionKind.RECV_C, s - 1, i) if s > 0 else None
    if k is ActionKind.B:
        return (ActionKind.RECV_GD, s, i) if s < num_moe_layers else None
    if k is ActionKind.EF:
        return (ActionKind.RECV_D, s, i)
    if k is ActionKind.EB:
        return (ActionKind.RECV_GC, s, i)
    return None


def produced_by(action: Action) -> Key | None:
    """The key of the compute whose output the SEND ``action`` carries, or None."""
    k, j, i = action.kind, action.stage, action.microbatch
    return {
        ActionKind.SEND_D: (ActionKind.F, j, i),
        ActionKind.SEND_C: (ActionKind.EF, j, i),
        ActionKind.SEND_GC: (ActionKind.B, j + 1, i),
        ActionKind.SEND_GD: (ActionKind.EB, j, i),
    }.get(k)


def required_before(action: Action, num_moe_layers: int) -> list[Key]:
    """Keys of the actions that must come earlier on the same rank than ``action``.

    Data: a compute after the receive it consumes and after the compute whose
    activations or gradients it needs; a send after the compute it carries. Sizes: a
    receive whose row counts are known only from routing after the compute that routed
    them (``<C``, ``<GD`` after ``F``; ``<GC`` after ``EF``).

    (REDUCE has none here: the validator requires it to be the rank's last action.)
    """
    J = num_moe_layers
    k, s, i = action.kind, action.stage, action.microbatch
    before: list[Key] = []
    recv = consumes(action, J)
    if recv is not None:
        before.append(recv)
    if k is ActionKind.F and s > 0:
        before.append((ActionKind.F, s - 1, i))
    elif k is ActionKind.B:
        before.append((ActionKind.F, s, i))  # saved activations
        if s < J:
            before.append((ActionKind.B, s + 1, i))  # residual-stream gradient
    elif k is ActionKind.EB:
        before.append((ActionKind.EF, s, i))
    elif k.is_send:
        before.append(produced_by(action))  # type: ignore[arg-type]
    elif k in (ActionKind.RECV_C, ActionKind.RECV_GD):
        before.append((ActionKind.F, s, i))  # sizes its buffers from the rows F(s, i) dispatched
    elif k is ActionKind.RECV_GC:
        before.append((ActionKind.EF, s, i))  # sizes its buffers from the rows EF(s, i) received
    return before


def required_actions(roles: frozenset[str] | str, num_moe_layers: int, num_microbatches: int) -> set[Key]:
    """Every key a rank with ``roles`` (``{"A"}``, ``{"E"}`` or both) must run exactly once."""
    J, m = num_moe_layers, num_microbatches
    keys: set[Key] = {(ActionKind.REDUCE, -1, -1)}
    for kind, info in KINDS.items():
        if info.role not in roles:
            continue
        stages = J + 1 if kind in (ActionKind.F, ActionKind.B) else J
        keys |= {(kind, s, i) for s in range(stages) for i in range(m)}
    return keys
