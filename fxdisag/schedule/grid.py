"""The unit-time grid of a schedule: what every rank does in each step.

Grid ("step") semantics
-----------------------
:func:`format_grid` executes the lists in a unit-time model: a compute action takes one
step, a post (SEND/RECV) takes none, a compute may run at step t only if every message
it consumes was sent at a step < t, REDUCE runs once all its peers have reached it.
A cell lists what the rank did in that step: its compute, then the posts that follow
it. Row ``stuck`` shows, if the model deadlocks, the action each blocked rank waits at.
"""

from __future__ import annotations

from dataclasses import dataclass

from fxdisag.schedule.actions import Action, ActionKind, Key, Schedule, consumes

__all__ = ["UnitRun", "format_grid", "grid_step", "unit_run"]


@dataclass
class UnitRun:
    """Result of executing a schedule in the unit-time model."""
    cells: dict[tuple[int, int], list[Action]]   # (step, rank) -> actions done in that step
    step_of: dict[tuple[int, int], int]          # (rank, index) -> step it ran in
    num_steps: int
    blocked: dict[int, int]                      # rank -> index of the action it is stuck at
    sent: dict[tuple[int, int, str, int, int, int], int]  # (src, dst, channel, j, i, chunk) -> step


def unit_run(schedule: Schedule) -> UnitRun:
    ranks = list(schedule.actions)
    lists = schedule.actions
    J = schedule.num_moe_layers
    hops = schedule.hops
    pc = {r: 0 for r in ranks}
    sent: dict[tuple[int, int, str, int, int, int], int] = {}    # (src, dst, ch, j, i, chunk) -> step
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
                sent.setdefault((r, dst, a.kind.channel, a.stage, a.microbatch, a.chunk), t)
        elif a.kind.is_recv:
            posted_recv[r].setdefault(a.key, a)

    def ready(r: int, a: Action, t: int) -> bool:
        for key in consumes(a, J, hops, schedule.chunks):
            recv = posted_recv[r].get(key)
            if recv is None:
                return False
            ch = key[0].channel
            if not all(sent.get((p, r, ch, recv.stage, recv.microbatch, recv.chunk), t) < t for p in recv.peers):
                return False
        return True

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
    return UnitRun(cells, step_of, t, blocked, sent)


def grid_step(schedule: Schedule, rank: int, index: int) -> int | None:
    """The grid row (unit-time step) in which ``schedule.actions[rank][index]`` runs."""
    return unit_run(schedule).step_of.get((rank, index))


def format_grid(schedule: Schedule, mark: tuple[int, int] | None = None) -> str:
    """Step x rank grid of the unit-time execution; ``mark=(step, rank)`` flags a cell ``!!``.

    Row ``stuck`` (step index ``num_steps``) appears only if the model deadlocks and
    shows the action each blocked rank waits at.
    """
    run = unit_run(schedule)
    ranks = list(schedule.actions)
    def role(r: int) -> str:
        try:
            return schedule.role(r)
        except KeyError:
            return "?"
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
    header = ["step"] + [f"{r}:{role(r)}" for r in ranks]
    body = [[label] + cells for label, cells in rows]
    widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]

    def line(row: list[str]) -> str:
        return (row[0].rjust(widths[0]) + " | "
                + " | ".join(x.ljust(w) for x, w in zip(row[1:], widths[1:]))).rstrip()

    return "\n".join([line(header)] + [line(row) for row in body])


