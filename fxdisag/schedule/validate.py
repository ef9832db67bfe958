"""Schedule validation: accept exactly the schedules the runtime can run.

Contract: :func:`validate` accepts exactly the schedules that are complete, matched
(every message has one sender and one receiver), FIFO-consistent per ordered rank pair,
dependency-ordered on each rank, free of deadlock and phase-consistent, for any
rank -> roles map (attention, experts, or both as in expert parallelism), and otherwise
raises :class:`ScheduleError` with the grid, the failing cell marked ``!!``, and what is
wrong. The runtime and the simulator run the lists verbatim.
"""

from __future__ import annotations

from fxdisag.schedule.actions import (
    Action,
    ActionKind,
    Key,
    Schedule,
    chunk_key,
    consumes,
    key_str,
    num_chunks,
    required_before,
)
from fxdisag.schedule.builders import check_groups
from fxdisag.schedule.grid import format_grid, unit_run

__all__ = ["ScheduleError", "validate"]


class ScheduleError(ValueError):
    """A schedule is invalid; the message holds the grid with the failing cell marked."""


def _fail(schedule: Schedule, rank: int | None, index: int | None, what: str) -> ScheduleError:
    mark = None
    if rank is not None and rank in schedule.actions:
        run = unit_run(schedule)
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


def _msg(msg: tuple) -> str:
    """(channel, stage, micro-batch, chunk) as the arguments of the kind's name."""
    return f"{msg[1]}, {msg[2]}" + (f", chunk {msg[3]}" if msg[3] else "")


def _role_name(roles: frozenset[str]) -> str:
    return {frozenset("A"): "attention", frozenset("E"): "expert"}.get(roles, "attention+expert")


def validate(schedule: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` is runnable (see module docstring).

    Checks, in order: groups and rank lists; each rank executes exactly the actions its
    role needs (once each) with exactly the peers its stage names (:meth:`Schedule.peers`,
    so a micro-batch returns from the ranks it went to); same-rank dependency order; every SEND has
    a matching RECV and vice versa; FIFO order per ordered pair; phase
    lengths; no deadlock; the forward phases complete on their own.

    Phases: the forward phase of every rank ends before REDUCE and completes on its own
    (it never waits for a message sent in a backward phase); a rank that runs backward
    computation in its forward phase has only REDUCE left for its backward phase.
    """
    S = schedule
    J, m = S.num_moe_layers, S.num_microbatches
    try:
        check_groups(S.attention_ranks, S.expert_ranks, disjoint=False)
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
    hops = S.hops

    # (a) well-formed actions; exactly the required set, once each.
    index: dict[int, dict[Key, int]] = {}
    need_of: dict[int, set[Key]] = {}
    for r, acts in S.actions.items():
        roles = S.roles(r)
        what = _role_name(roles)
        own = set(S.reduce_peers(r))
        seen: dict[Key, int] = {}
        for n, a in enumerate(acts):
            if not isinstance(a, Action) or not isinstance(a.kind, ActionKind):
                raise _fail(S, r, n, f"{a!r} is not an Action")
            if a.kind.role != "*" and a.kind.role not in roles:
                raise _fail(S, r, n, f"{a.kind.name} does not belong on an {what} rank")
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
            if not 0 <= a.chunk < num_chunks(S.chunks, a.kind, a.stage):
                raise _fail(S, r, n, f"chunk {a.chunk} out of range: {a.kind.name} of layer {a.stage} has "
                            f"{num_chunks(S.chunks, a.kind, a.stage)} chunk(s) (Schedule.chunks)")
            if a.kind.is_compute and a.peers:
                raise _fail(S, r, n, f"compute action has peers {a.peers}; must be empty")
            if a.kind.is_comm:
                want = S.peers(r, a.kind, a.stage)
                if tuple(sorted(set(a.peers))) != want or len(a.peers) != len(want):
                    raise _fail(S, r, n, f"peers {a.peers} must be {want}: the ranks of the group that "
                                f"stage {a.stage} puts on the other side of {a.kind.name}")
        need = S.required_keys(r)
        stray = sorted(set(seen) - need, key=lambda k: (k[1], k[2], k[0].value, k[3:]))
        if stray:
            raise _fail(S, r, seen[stray[0]], f"`{key_str(stray[0])}` is not this rank's: its group runs "
                        "other stages")
        lacking = sorted(need - set(seen), key=lambda k: (k[1], k[2], k[0].value, k[3:]))
        if lacking:
            names = ", ".join(key_str(k) for k in lacking[:8])
            more = f" (+{len(lacking) - 8} more)" if len(lacking) > 8 else ""
            raise _fail(S, r, None, f"missing actions {names}{more}; every "
                        f"{what} rank needs each once")
        index[r] = seen
        need_of[r] = need

    # (b) same-rank dependency order.
    for r, acts in S.actions.items():
        for n, a in enumerate(acts):
            if a.kind is ActionKind.REDUCE and n != len(acts) - 1:
                raise _fail(S, r, n, "REDUCE must be the rank's last action (gradients are "
                            "complete only after every backward)")
            for key in required_before(a, J, hops, need_of[r], S.chunks):
                if index[r][key] > n:
                    why = ("consumes its data" if key[0].is_recv else
                           "produces its data" if a.kind.is_send else "must run first")
                    raise _fail(S, r, n, f"`{a}` comes before `{key_str(key)}` "
                                f"(action #{index[r][key]}), which {why}")

    # (d) matching, (e) FIFO per ordered pair.
    out: dict[tuple[int, int], list[tuple[Key, int]]] = {}
    inc: dict[tuple[int, int], list[tuple[Key, int]]] = {}
    for r, acts in S.actions.items():
        for n, a in enumerate(acts):
            for p in a.peers if a.kind.is_comm else ():
                msg = (a.kind.channel, a.stage, a.microbatch, a.chunk)
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
                            f"matching {ActionKind.comm('recv', msg[0]).name}({_msg(msg)}) from rank {src}")
        for msg, n in recvs:
            if msg not in send_set:
                raise _fail(S, dst, n, f"receives from rank {src}, but rank {src} posts no "
                            f"matching {ActionKind.comm('send', msg[0]).name}({_msg(msg)}) to rank {dst}")
        for q, ((ms, ns), (mr, nr)) in enumerate(zip(sends, recvs)):
            if ms != mr:
                raise _fail(S, dst, nr, f"FIFO order broken on {src} -> {dst}: message #{q} "
                            f"is `{key_str(chunk_key(ActionKind.comm('send', ms[0]), *ms[1:]))}` on rank {src} "
                            f"(action #{ns}) but `{key_str(chunk_key(ActionKind.comm('recv', mr[0]), *mr[1:]))}` "
                            f"on rank {dst}; both sides must issue them in the same order")

    # (f) phases: the forward call runs every rank's forward phase to its end (the loss is
    # all-reduced there), then loss.backward() runs the backward phases.
    for r, acts in S.actions.items():
        n_fwd = S.forward_length(r)
        if not 0 <= n_fwd < len(acts):
            raise _fail(S, r, None, f"forward phase of {n_fwd} actions: must end before REDUCE "
                        f"(0 <= forward_len < {len(acts)})")
        if S.defers_loss_grad(r):
            late = [n for n, a in enumerate(acts[n_fwd:], n_fwd) if a.kind is not ActionKind.REDUCE]
            if late:
                raise _fail(S, r, late[0], f"`{acts[late[0]]}` is in the backward phase, but the "
                            "forward phase already runs backward computation (with the loss "
                            "gradient deferred): then the backward phase may hold only REDUCE")
        elif any(a.kind.is_compute and a.kind.is_backward for a in acts[:n_fwd]):  # pragma: no cover
            raise AssertionError("defers_loss_grad disagrees with the forward phase")
    # (g) deadlock.
    run = unit_run(S)
    if run.blocked:
        waits = []
        for r, n in sorted(run.blocked.items()):
            a = S.actions[r][n]
            if a.kind is ActionKind.REDUCE:
                waits.append(f"rank {r} waits at `R` for its group")
            for key in consumes(a, J, hops, S.chunks):
                ch = key[0].channel
                recv = S.actions[r][index[r][key]]
                senders = [p for p in recv.peers
                           if (p, r, ch, recv.stage, recv.microbatch, recv.chunk) not in run.sent]
                if senders:
                    waits.append(f"rank {r} waits at `{a}` for {key_str(key)[1:]} from "
                                 f"rank(s) {senders}")
        first = min(run.blocked)
        raise _fail(S, first, run.blocked[first], "deadlock: no rank can progress; "
                    + "; ".join(waits))

    # (h) the forward call returns on its own (checked after (g): a schedule that
    # deadlocks anyway is reported as a deadlock).
    forward_only = Schedule(S.attention_ranks, S.expert_ranks, J, m,
                            {r: S.phase(r, "forward") for r in S.actions}, stages=S.stages, chunks=S.chunks)
    stuck = unit_run(forward_only).blocked
    if stuck:
        r = min(stuck)
        raise _fail(S, r, stuck[r], f"`{S.actions[r][stuck[r]]}` waits in the forward phase for a "
                    "message that is sent only in a backward phase (after the forward call returns)")

    # (i) under torch.no_grad() a forward phase runs only its forward-kind actions.
    if any(S.defers_loss_grad(r) for r in S.actions):
        kept = {r: [n for n, a in enumerate(S.phase(r, "forward")) if not a.kind.is_backward] for r in S.actions}
        projected = Schedule(S.attention_ranks, S.expert_ranks, J, m,
                             {r: [S.actions[r][n] for n in kept[r]] for r in S.actions}, stages=S.stages,
                             chunks=S.chunks)
        stuck = unit_run(projected).blocked
        if stuck:
            r = min(stuck)
            n = kept[r][stuck[r]]
            raise _fail(S, r, n, f"`{S.actions[r][n]}` deadlocks a forward under torch.no_grad(), which runs "
                        "only the forward-kind actions of the forward phase")
