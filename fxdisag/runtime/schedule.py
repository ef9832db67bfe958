"""AF-Pipe schedules as data: per-rank action lists, their validator and their grid.

Contract
--------
A :class:`Schedule` maps every rank to the ordered list of :class:`Action` s it executes
in one training step. :func:`af_pipe_schedule` builds the GPipe-style AF-Pipe schedule;
:func:`validate` accepts exactly the schedules that are complete, matched (every
message has one sender and one receiver), FIFO-consistent per ordered rank pair,
dependency-ordered on each rank and free of deadlock, and otherwise raises
:class:`ScheduleError` with the grid, the failing cell marked ``!!``, and what is wrong.
The runtime executor and the simulator (``simulate.py``) execute the lists verbatim.

Model cut
---------
With J MoE layers there are J+1 attention stages (stage s runs everything between
the experts call of MoE layer s-1 and that of layer s; stage 0 starts at the inputs,
stage J ends with the loss) and J expert stages (layer j = the routed experts of MoE
layer j). Attention ranks are data-parallel replicas; expert ranks each hold some
experts. A micro-batch i goes F(0,i) -> EF(0,i) -> F(1,i) -> ... -> F(J,i), then
B(J,i) -> EB(J-1,i) -> B(J-1,i) -> ... -> B(0,i).

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

``>`` is a send, ``<`` a receive. ``peers`` holds the ranks on the other side of a comm
action (a SEND's destinations, a RECV's sources), in rank order, and is empty for
compute. For REDUCE, ``stage = microbatch = -1`` and ``peers`` is the rank's whole group
(attention ranks, or expert ranks, itself included); the executor reduces expert
gradients only among the replicas the Plan's ``expert_placement`` names, a subgroup.

Runtime semantics (the executor follows these; the simulator models them)
--------------------------------------------------------------------------
* A RECV *posts* a non-blocking receive (one per peer) and returns at once.
* A compute action waits for the data it consumes, then runs:
  F(s,i) consumes RECV_C(s-1,i); EF(j,i) consumes RECV_D(j,i);
  EB(j,i) consumes RECV_GC(j,i); B(s,i) consumes RECV_GD(s,i)  (see :func:`consumes`).
* A SEND posts a non-blocking send (one per peer) of what the preceding compute
  produced: SEND_D(j,i) <- F(j,i), SEND_C(j,i) <- EF(j,i), SEND_GC(j,i) <- B(j+1,i),
  SEND_GD(j,i) <- EB(j,i). Every peer gets a message, possibly with zero rows, so
  that matching is static.
* Receives are posted before the matching sends where the order allows: gloo runs a
  pair half-duplex when the send is posted first.
* With NCCL, messages between an ordered pair (src, dst) match in FIFO order, so the
  sender's sends to dst and dst's receives from src come in the same order
  (:func:`validate` checks this).
* REDUCE is a collective over ``peers``; every member reaches it once, last.

Grid ("step") semantics
-----------------------
:func:`format_grid` executes the lists in a unit-time model: a compute action takes one
step, a post (SEND/RECV) takes none, a compute may run at step t only if every message
it consumes was sent at a step < t, REDUCE runs once all its peers have reached it.
A cell lists what the rank did in that step: its compute, then the posts that follow
it. Row ``stuck`` shows, if the model deadlocks, the action each blocked rank waits at.

Pseudo-code of :func:`af_pipe_schedule` (GPipe order: all forwards, then all backwards)::

    attention rank:                          expert rank:
      for s in 0..J:                           <D(0, i) for all i
        for i: F(s,i)                          for j in 0..J-1:
               if s < J: <C(s,i) >D(s,i)         for i: EF(j,i) >C(j,i); if j < J-1: <D(j+1,i)
      for s in J..0:                           <GC(J-1, i) for all i
        for i: B(s,i)                          for j in J-1..0:
               if s > 0: <GD(s-1,i) >GC(s-1,i)   for i: EB(j,i) >GD(j,i); if j > 0: <GC(j-1,i)
      R                                        R

Each receive is posted before the send it answers (the attention rank posts <C(s,i)
before >D(s,i)), and the expert rank posts the next layer's <D as soon as it has sent the
combine of the same micro-batch: gloo moves a message only once its receive is posted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class ScheduleError(ValueError):
    """A schedule is invalid; the message holds the grid with the failing cell marked."""


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
    def is_compute(self) -> bool:
        return self in _COMPUTE

    @property
    def is_send(self) -> bool:
        return self.value.startswith("SEND_")

    @property
    def is_recv(self) -> bool:
        return self.value.startswith("RECV_")

    @property
    def is_comm(self) -> bool:
        return self.is_send or self.is_recv

    @property
    def channel(self) -> str:
        """``"D" | "C" | "GC" | "GD"`` for comm kinds (a SEND_x matches a RECV_x)."""
        if not self.is_comm:
            raise ValueError(f"{self.name} is not a comm action kind")
        return self.value.split("_", 1)[1]


_COMPUTE = frozenset({ActionKind.F, ActionKind.B, ActionKind.EF, ActionKind.EB})
_SEND = {"D": ActionKind.SEND_D, "C": ActionKind.SEND_C, "GC": ActionKind.SEND_GC,
         "GD": ActionKind.SEND_GD}
_RECV = {"D": ActionKind.RECV_D, "C": ActionKind.RECV_C, "GC": ActionKind.RECV_GC,
         "GD": ActionKind.RECV_GD}
_ATTENTION_KINDS = frozenset({ActionKind.F, ActionKind.B, ActionKind.SEND_D, ActionKind.RECV_C,
                              ActionKind.SEND_GC, ActionKind.RECV_GD, ActionKind.REDUCE})
_EXPERT_KINDS = frozenset({ActionKind.EF, ActionKind.EB, ActionKind.RECV_D, ActionKind.SEND_C,
                           ActionKind.RECV_GC, ActionKind.SEND_GD, ActionKind.REDUCE})

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


def _key_str(key: Key) -> str:
    return str(Action(*key))


@dataclass
class Schedule:
    attention_ranks: tuple[int, ...]
    expert_ranks: tuple[int, ...]
    num_moe_layers: int
    num_microbatches: int
    actions: dict[int, list[Action]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attention_ranks = tuple(self.attention_ranks)
        self.expert_ranks = tuple(self.expert_ranks)

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(self.attention_ranks + self.expert_ranks))

    def role(self, rank: int) -> str:
        """``"A"`` for an attention rank, ``"E"`` for an expert rank."""
        if rank in self.attention_ranks:
            return "A"
        if rank in self.expert_ranks:
            return "E"
        raise KeyError(f"rank {rank} is in neither attention_ranks nor expert_ranks")

    def __str__(self) -> str:
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

    (REDUCE has none here: :func:`validate` requires it to be the rank's last action.)
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
    return before


def required_actions(role: str, num_moe_layers: int, num_microbatches: int) -> set[Key]:
    """Every key a rank of ``role`` ("A" or "E") must execute exactly once."""
    J, m = num_moe_layers, num_microbatches
    if role == "A":
        keys = {(ActionKind.F, s, i) for s in range(J + 1) for i in range(m)}
        keys |= {(ActionKind.B, s, i) for s in range(J + 1) for i in range(m)}
        kinds = (ActionKind.SEND_D, ActionKind.RECV_C, ActionKind.SEND_GC, ActionKind.RECV_GD)
    else:
        keys = {(ActionKind.EF, j, i) for j in range(J) for i in range(m)}
        keys |= {(ActionKind.EB, j, i) for j in range(J) for i in range(m)}
        kinds = (ActionKind.RECV_D, ActionKind.SEND_C, ActionKind.RECV_GC, ActionKind.SEND_GD)
    keys |= {(k, j, i) for k in kinds for j in range(J) for i in range(m)}
    keys.add((ActionKind.REDUCE, -1, -1))
    return keys


# ---------------------------------------------------------------- builder


def _check_groups(attention_ranks: Sequence[int], expert_ranks: Sequence[int]) -> None:
    if len(attention_ranks) == 0:
        raise ValueError("attention_ranks is empty: give at least one attention rank")
    if len(expert_ranks) == 0:
        raise ValueError("expert_ranks is empty: give at least one expert rank")
    for name, group in (("attention_ranks", attention_ranks), ("expert_ranks", expert_ranks)):
        if len(set(group)) != len(group):
            raise ValueError(f"{name}={list(group)} lists a rank twice")
        if any((not isinstance(r, int)) or r < 0 for r in group):
            raise ValueError(f"{name}={list(group)} must hold non-negative int ranks")
    both = sorted(set(attention_ranks) & set(expert_ranks))
    if both:
        raise ValueError(f"attention_ranks and expert_ranks overlap on ranks {both}: "
                         "the two groups must be disjoint")


def af_pipe_schedule(attention_ranks: Sequence[int], expert_ranks: Sequence[int],
                     num_moe_layers: int, num_microbatches: int) -> Schedule:
    """The GPipe-style AF-Pipe schedule (see the module docstring for the order)."""
    _check_groups(attention_ranks, expert_ranks)
    J, m = num_moe_layers, num_microbatches
    if not isinstance(J, int) or J < 1:
        raise ValueError(f"num_moe_layers={J!r}: AF-Pipe needs at least one MoE layer "
                         "(a dense model has no experts to disaggregate)")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"num_microbatches={m!r}: need at least one micro-batch")
    A, E = tuple(sorted(attention_ranks)), tuple(sorted(expert_ranks))
    K = ActionKind

    # Every receive is posted before the send it answers, and as early as the per-pair
    # FIFO order allows: gloo moves a message only once its receive is posted, and runs a
    # pair half-duplex when a send is posted first.
    attn: list[Action] = []
    for s in range(J + 1):
        for i in range(m):
            attn.append(Action(K.F, s, i))
            if s < J:
                attn += [Action(K.RECV_C, s, i, E), Action(K.SEND_D, s, i, E)]
    for s in reversed(range(J + 1)):
        for i in range(m):
            attn.append(Action(K.B, s, i))
            if s > 0:
                attn += [Action(K.RECV_GD, s - 1, i, E), Action(K.SEND_GC, s - 1, i, E)]
    attn.append(Action(K.REDUCE, -1, -1, A))

    expert: list[Action] = [Action(K.RECV_D, 0, i, A) for i in range(m)]
    for j in range(J):
        for i in range(m):
            expert += [Action(K.EF, j, i), Action(K.SEND_C, j, i, A)]
            if j + 1 < J:
                expert.append(Action(K.RECV_D, j + 1, i, A))
    expert += [Action(K.RECV_GC, J - 1, i, A) for i in range(m)]
    for j in reversed(range(J)):
        for i in range(m):
            expert += [Action(K.EB, j, i), Action(K.SEND_GD, j, i, A)]
            if j > 0:
                expert.append(Action(K.RECV_GC, j - 1, i, A))
    expert.append(Action(K.REDUCE, -1, -1, E))

    actions = {r: list(attn) for r in A}
    actions.update({r: list(expert) for r in E})
    return Schedule(tuple(attention_ranks), tuple(expert_ranks), J, m,
                    dict(sorted(actions.items())))


# ---------------------------------------------------------------- unit-time model


@dataclass
class _UnitRun:
    """Result of executing a schedule in the unit-time model."""
    cells: dict[tuple[int, int], list[Action]]   # (step, rank) -> actions done in that step
    step_of: dict[tuple[int, int], int]          # (rank, index) -> step it ran in
    num_steps: int
    blocked: dict[int, int]                      # rank -> index of the action it is stuck at
    sent: dict[tuple[int, int, str, int, int], int]  # (src, dst, channel, j, i) -> step


def _unit_run(schedule: Schedule) -> _UnitRun:
    ranks = list(schedule.actions)
    lists = schedule.actions
    J = schedule.num_moe_layers
    pc = {r: 0 for r in ranks}
    sent: dict[tuple[int, int, str, int, int], int] = {}    # (src, dst, ch, j, i) -> step
    posted_recv: dict[int, dict[Key, Action]] = {r: {} for r in ranks}
    cells: dict[tuple[int, int], list[Action]] = {}
    step_of: dict[tuple[int, int], int] = {}

    def at(r: int) -> Action | None:
        return lists[r][pc[r]] if pc[r] < len(lists[r]) else None

    def run(r: int, t: int) -> None:
        a = lists[r][pc[r]]
        cells.setdefault((t, r), []).append(a)
        step_of[(r, pc[r])] = t
        pc[r] += 1
        if a.kind.is_send:
            for dst in a.peers:
                sent.setdefault((r, dst, a.kind.channel, a.stage, a.microbatch), t)
        elif a.kind.is_recv:
            posted_recv[r].setdefault(a.key, a)

    def ready(r: int, a: Action, t: int) -> bool:
        key = consumes(a, J)
        if key is None:
            return True
        recv = posted_recv[r].get(key)
        if recv is None:
            return False
        ch = key[0].channel
        return all(sent.get((p, r, ch, key[1], key[2]), t) < t for p in recv.peers)

    def reduce_ok(a: Action) -> bool:
        for q in a.peers:
            b = at(q) if q in pc else None
            reached = b is not None and b.kind is ActionKind.REDUCE
            done = q in pc and any(x.kind is ActionKind.REDUCE for x in lists[q][:pc[q]])
            if not (reached or done):
                return False
        return True

    t = 0
    while any(at(r) is not None for r in ranks):
        progressed = False
        for r in ranks:
            a = at(r)
            if a is not None and a.kind.is_compute and ready(r, a, t):
                run(r, t)
                progressed = True
        changed = True
        while changed:  # posts and collectives take no time; REDUCE needs every peer there
            changed = False
            for r in ranks:
                while (a := at(r)) is not None and not a.kind.is_compute:
                    if a.kind is ActionKind.REDUCE and not reduce_ok(a):
                        break
                    run(r, t)
                    changed = progressed = True
        if not progressed:
            break
        t += 1
    blocked = {r: pc[r] for r in ranks if at(r) is not None}
    return _UnitRun(cells, step_of, t, blocked, sent)


def grid_step(schedule: Schedule, rank: int, index: int) -> int | None:
    """The grid row (unit-time step) in which ``schedule.actions[rank][index]`` runs."""
    return _unit_run(schedule).step_of.get((rank, index))


def format_grid(schedule: Schedule, mark: tuple[int, int] | None = None) -> str:
    """Step x rank grid of the unit-time execution; ``mark=(step, rank)`` flags a cell ``!!``.

    Row ``stuck`` (step index ``num_steps``) appears only if the model deadlocks and
    shows the action each blocked rank waits at.
    """
    run = _unit_run(schedule)
    ranks = list(schedule.actions)
    role = {r: ("A" if r in schedule.attention_ranks else
                "E" if r in schedule.expert_ranks else "?") for r in ranks}
    rows: list[tuple[str, list[str]]] = []
    for t in range(run.num_steps):
        rows.append((str(t), [" ".join(map(str, run.cells.get((t, r), []))) for r in ranks]))
    if run.blocked:
        rows.append(("stuck", [f"wait {schedule.actions[r][run.blocked[r]]}"
                               if r in run.blocked else "" for r in ranks]))
    if mark is not None:
        t, r = mark
        if 0 <= t < len(rows) and r in ranks:
            c = ranks.index(r)
            rows[t][1][c] = "!!" + rows[t][1][c]
    header = ["step"] + [f"{r}:{role[r]}" for r in ranks]
    body = [[label] + cells for label, cells in rows]
    widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]

    def line(row: list[str]) -> str:
        return (row[0].rjust(widths[0]) + " | "
                + " | ".join(x.ljust(w) for x, w in zip(row[1:], widths[1:]))).rstrip()

    return "\n".join([line(header)] + [line(row) for row in body])


# ---------------------------------------------------------------- validation


def _fail(schedule: Schedule, rank: int | None, index: int | None, what: str) -> ScheduleError:
    mark = None
    if rank is not None and rank in schedule.actions:
        run = _unit_run(schedule)
        if index is not None and (rank, index) in run.step_of:
            mark = (run.step_of[(rank, index)], rank)
        elif rank in run.blocked:
            mark = (run.num_steps, rank)
    where = ""
    if rank is not None:
        where = f"rank {rank}"
        if index is not None and rank in schedule.actions and index < len(schedule.actions[rank]):
            where += f" action #{index} `{schedule.actions[rank][index]}`"
        where += ": "
    try:
        grid = format_grid(schedule, mark)
    except Exception as e:  # noqa: BLE001 - the grid is a diagnostic aid, the error is `what`
        grid = f"(grid unavailable: {e})"
    return ScheduleError(f"invalid schedule: {where}{what}\n{grid}")


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` is runnable (see module docstring).

    Checks, in order: groups and rank lists; each rank executes exactly the actions its
    role needs (once each) with well-formed peers; same-rank dependency order; the
    round trip of every micro-batch returns from the ranks it went to; every SEND has
    a matching RECV and vice versa; FIFO order per ordered pair; no deadlock.
    """
    S = schedule
    J, m = S.num_moe_layers, S.num_microbatches
    try:
        _check_groups(S.attention_ranks, S.expert_ranks)
    except ValueError as e:
        raise ScheduleError(f"invalid schedule: {e}") from None
    if J < 1:
        raise ScheduleError(f"invalid schedule: num_moe_layers={J}, need >= 1")
    if m < 1:
        raise ScheduleError(f"invalid schedule: num_microbatches={m}, need >= 1")
    A, E = set(S.attention_ranks), set(S.expert_ranks)
    missing = sorted((A | E) - set(S.actions))
    extra = sorted(set(S.actions) - (A | E))
    if missing or extra:
        raise ScheduleError(f"invalid schedule: actions has no list for ranks {missing} / "
                            f"lists for ranks {extra} that are in neither group")
    group = {r: ("A", A, E) for r in A} | {r: ("E", E, A) for r in E}

    # (a) well-formed actions; exactly the required set, once each.
    index: dict[int, dict[Key, int]] = {}
    for r, acts in S.actions.items():
        role, own, other = group[r]
        allowed = _ATTENTION_KINDS if role == "A" else _EXPERT_KINDS
        seen: dict[Key, int] = {}
        for n, a in enumerate(acts):
            if not isinstance(a, Action) or not isinstance(a.kind, ActionKind):
                raise _fail(S, r, n, f"{a!r} is not an Action")
            if a.kind not in allowed:
                raise _fail(S, r, n, f"{a.kind.name} does not belong on an "
                            f"{'attention' if role == 'A' else 'expert'} rank")
            if a.key in seen:
                raise _fail(S, r, n, f"`{a}` appears twice (first as action #{seen[a.key]})")
            seen[a.key] = n
            if a.kind is ActionKind.REDUCE:
                if set(a.peers) != own or len(a.peers) != len(own):
                    raise _fail(S, r, n, f"REDUCE peers {a.peers} must be the rank's whole "
                                f"group {tuple(sorted(own))}")
                continue
            hi = J + 1 if a.kind in (ActionKind.F, ActionKind.B) else J
            if not (0 <= a.stage < hi and 0 <= a.microbatch < m):
                raise _fail(S, r, n, f"stage {a.stage} / micro-batch {a.microbatch} out of "
                            f"range (stage < {hi}, micro-batch < {m})")
            if a.kind.is_compute and a.peers:
                raise _fail(S, r, n, f"compute action has peers {a.peers}; must be empty")
            if a.kind.is_comm:
                if not a.peers or len(set(a.peers)) != len(a.peers) or not set(a.peers) <= other:
                    raise _fail(S, r, n, f"peers {a.peers} must be distinct ranks of the "
                                f"other group {tuple(sorted(other))}, at least one")
        need = required_actions(role, J, m)
        lacking = sorted(need - set(seen), key=lambda k: (k[1], k[2], k[0].value))
        if lacking:
            names = ", ".join(_key_str(k) for k in lacking[:8])
            more = f" (+{len(lacking) - 8} more)" if len(lacking) > 8 else ""
            raise _fail(S, r, None, f"missing actions {names}{more}; every "
                        f"{'attention' if role == 'A' else 'expert'} rank needs each once")
        index[r] = seen

    # (b) same-rank dependency order.
    for r, acts in S.actions.items():
        for n, a in enumerate(acts):
            if a.kind is ActionKind.REDUCE and n != len(acts) - 1:
                raise _fail(S, r, n, "REDUCE must be the rank's last action (gradients are "
                            "complete only after every backward)")
            for key in required_before(a, J):
                if index[r][key] > n:
                    why = ("consumes its data" if key[0].is_recv else
                           "produces its data" if a.kind.is_send else "must run first")
                    raise _fail(S, r, n, f"`{a}` comes before `{_key_str(key)}` "
                                f"(action #{index[r][key]}), which {why}")

    # (c) round trip: a micro-batch's rows come back from (and its grads go to) the
    # ranks it was dispatched to.
    pairs = ((ActionKind.SEND_D, ActionKind.RECV_C), (ActionKind.RECV_C, ActionKind.SEND_GC),
             (ActionKind.SEND_GC, ActionKind.RECV_GD), (ActionKind.RECV_D, ActionKind.SEND_C),
             (ActionKind.SEND_C, ActionKind.RECV_GC), (ActionKind.RECV_GC, ActionKind.SEND_GD))
    for r, acts in S.actions.items():
        for first, second in pairs:
            if (first, 0, 0) not in index[r]:
                continue
            for j in range(J):
                for i in range(m):
                    a, b = acts[index[r][(first, j, i)]], acts[index[r][(second, j, i)]]
                    if set(a.peers) != set(b.peers):
                        raise _fail(S, r, index[r][b.key], f"`{b}` has peers {b.peers} but "
                                    f"`{a}` has {a.peers}; a micro-batch must return from "
                                    "the ranks it went to")

    # (d) matching, (e) FIFO per ordered pair.
    out: dict[tuple[int, int], list[tuple[Key, int]]] = {}
    inc: dict[tuple[int, int], list[tuple[Key, int]]] = {}
    for r, acts in S.actions.items():
        for n, a in enumerate(acts):
            for p in a.peers if a.kind.is_comm else ():
                msg = (a.kind.channel, a.stage, a.microbatch)
                if a.kind.is_send:
                    out.setdefault((r, p), []).append((msg, n))  # type: ignore[arg-type]
                else:
                    inc.setdefault((p, r), []).append((msg, n))  # type: ignore[arg-type]
    for (src, dst) in sorted(set(out) | set(inc)):
        sends, recvs = out.get((src, dst), []), inc.get((src, dst), [])
        send_set, recv_set = {k for k, _ in sends}, {k for k, _ in recvs}
        for msg, n in sends:
            if msg not in recv_set:
                raise _fail(S, src, n, f"sends to rank {dst}, but rank {dst} posts no "
                            f"matching {_RECV[msg[0]].name}({msg[1]}, {msg[2]}) from rank {src}")
        for msg, n in recvs:
            if msg not in send_set:
                raise _fail(S, dst, n, f"receives from rank {src}, but rank {src} posts no "
                            f"matching {_SEND[msg[0]].name}({msg[1]}, {msg[2]}) to rank {dst}")
        for q, ((ms, ns), (mr, nr)) in enumerate(zip(sends, recvs)):
            if ms != mr:
                raise _fail(S, dst, nr, f"FIFO order broken on {src} -> {dst}: message #{q} "
                            f"is `{_key_str((_SEND[ms[0]], ms[1], ms[2]))}` on rank {src} "
                            f"(action #{ns}) but `{_key_str((_RECV[mr[0]], mr[1], mr[2]))}` "
                            f"on rank {dst}; both sides must issue them in the same order")

    # (f) deadlock.
    run = _unit_run(S)
    if run.blocked:
        waits = []
        for r, n in sorted(run.blocked.items()):
            a = S.actions[r][n]
            key = consumes(a, J)
            if a.kind is ActionKind.REDUCE:
                waits.append(f"rank {r} waits at `R` for its group")
            elif key is not None:
                ch = key[0].channel
                senders = [p for p in S.actions[r][index[r][key]].peers
                           if (p, r, ch, key[1], key[2]) not in run.sent]
                waits.append(f"rank {r} waits at `{a}` for {ch}{key[1]}.{key[2]} from "
                             f"rank(s) {senders}")
        first = min(run.blocked)
        raise _fail(S, first, run.blocked[first], "deadlock: no rank can progress; "
                    + "; ".join(waits))
