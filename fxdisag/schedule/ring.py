"""The multi-stage AF-Pipe schedule: layers dealt over p attention and p expert groups.

Contract: ``ring_schedule(stages, num_microbatches, kind, in_flight)`` returns a
:class:`~fxdisag.schedule.actions.Schedule` that
:func:`~fxdisag.schedule.validate.validate` accepts, for any :class:`Stages` (any depth
p, group sizes, number of MoE layers, layer assignment) and ``kind`` ``"gpipe"`` or
``"1f1b"``. A micro-batch travels one way around the ring -- attention group of stage
0 -> expert group of layer 0 -> attention group of stage 1 -> ... -> stage J -- and its
backward the other way; the attention side's live values cross each hop (H, GH).

Construction::

    chain(i) = F(0,i) EF(0,i) F(1,i) ... EF(J-1,i) F(J,i) B(J,i) EB(J-1,i) ... EB(0,i) B(0,i)
    event-driven list scheduling over the 2p groups (a group runs one unit at a time, a
    unit takes ``cost``: forward 1, backward 2 unless given, per kind or per stage with
    ``stage_costs``; a unit is ready when its predecessor in the chain is done):
        gpipe: every forward unit first (the forward call ends with the loss all-reduce),
               then every backward unit; a free group takes its oldest-ready unit
        1f1b:  at most ``in_flight`` micro-batches started and not finished (default 3p:
               enough to fill the ring, measured in tests/test_ring.py); a free group
               takes a ready backward unit first, then the oldest micro-batch
    each rank's list = its group's units in that order, each followed by its sends
        (F: >D then >H; EF: >C; B: >GC then >GH; EB: >GD)
    then receives are inserted, each as early as allowed: after the previous message
        from the same sender (per-pair FIFO), after the compute that sizes it on this
        rank, and (gpipe) backward receives only after the rank's forward phase
    then R with the rank's own group (its parameters' replicas)

The p = 1 schedules of :mod:`fxdisag.schedule.builders` stay what the runtime builds for
one group (same lists as before this module existed); this builder also accepts p = 1.
"""

from __future__ import annotations

from fxdisag.schedule.actions import Action, ActionKind, Key, Schedule, Stages, required_before

__all__ = ["UNIT_COST", "ring_schedule", "stage_costs"]

_K = ActionKind
_SENDS = {
    _K.F: (_K.SEND_D, _K.SEND_H),
    _K.EF: (_K.SEND_C,),
    _K.B: (_K.SEND_GC, _K.SEND_GH),
    _K.EB: (_K.SEND_GD,),
}


def _send_stage(send: ActionKind, compute_stage: int) -> int:
    """The stage index a send carries (B(s) sends GC/GH of cut s-1)."""
    return compute_stage - 1 if send in (_K.SEND_GC, _K.SEND_GH) else compute_stage


def _chain(J: int, i: int) -> list[Key]:
    fwd: list[Key] = []
    for s in range(J + 1):
        fwd.append((_K.F, s, i))
        if s < J:
            fwd.append((_K.EF, s, i))
    bwd: list[Key] = []
    for s in reversed(range(J + 1)):
        bwd.append((_K.B, s, i))
        if s > 0:
            bwd.append((_K.EB, s - 1, i))
    return fwd + bwd


# Relative unit durations the ordering assumes (a backward costs about twice its forward).
UNIT_COST: dict[ActionKind, float] = {_K.F: 1.0, _K.EF: 1.0, _K.B: 2.0, _K.EB: 2.0}


def stage_costs(costs: dict[str, float], num_moe_layers: int):
    """A ``cost`` function for :func:`ring_schedule` from per-stage durations: keys ``F``,
    ``B`` (an attention stage of a MoE layer), ``EF``, ``EB`` (an expert action), and
    optionally ``F0``/``B0`` (stage 0, with the embedding) and ``FJ``/``BJ`` (the head and
    loss stage), which default to ``F``/``B``."""
    missing = {"F", "B", "EF", "EB"} - set(costs)
    if missing:
        raise ValueError(f"stage_costs: missing {sorted(missing)} (need F, B, EF, EB; optional F0, B0, FJ, BJ)")
    J = num_moe_layers

    def duration(key: Key) -> float:
        kind, stage, _ = key
        name = kind.name
        if kind in (_K.F, _K.B):
            if stage == 0 and f"{name}0" in costs:
                return costs[f"{name}0"]
            if stage == J and f"{name}J" in costs:
                return costs[f"{name}J"]
        return costs[name]

    return duration


def _group_orders(stages: Stages, m: int, kind: str, w: int, cost) -> dict[tuple[str, int], list[Key]]:
    """Each group's compute order: event-driven list scheduling of the chains."""
    J = len(stages.layer_group)
    duration = cost if callable(cost) else (lambda key: cost[key[0]])

    def resource(key: Key) -> tuple[str, int]:
        k, s, _ = key
        return ("A", stages.stage_group[s]) if k in (_K.F, _K.B) else ("E", stages.layer_group[s])

    chains = [_chain(J, i) for i in range(m)]
    n_fwd, n_all = 2 * J + 1, len(chains[0])
    nxt, ready_at = [0] * m, [0.0] * m
    free_at: dict[tuple[str, int], float] = {}
    orders: dict[tuple[str, int], list[Key]] = {}
    t = 0.0
    phases = [(0, n_fwd), (n_fwd, n_all)] if kind == "gpipe" else [(0, n_all)]
    for lo, hi in phases:
        if lo > 0:  # gpipe: the backward starts once every forward is done (the loss all-reduce)
            t = max(ready_at)
            ready_at = [t] * m
        started = m if kind == "gpipe" else 0
        while any(n < hi for n in nxt):
            finished = sum(1 for i in range(m) if nxt[i] == hi and ready_at[i] <= t)
            ran = False
            # the oldest-ready unit first (gpipe); a backward unit, then the oldest (1f1b)
            waiting = [i for i in range(m) if nxt[i] < hi and ready_at[i] <= t
                       and (i < started or (i == started and started - finished < w))]
            if kind == "1f1b":
                waiting.sort(key=lambda i: (0 if nxt[i] >= n_fwd else 1, i))
            else:
                waiting.sort(key=lambda i: (ready_at[i], i))
            for i in waiting:
                key = chains[i][nxt[i]]
                res = resource(key)
                if free_at.get(res, 0.0) > t:
                    continue
                if i == started:
                    started += 1
                done = t + duration(key)
                free_at[res] = done
                orders.setdefault(res, []).append(key)
                nxt[i] += 1
                ready_at[i] = done
                ran = True
            if not ran:
                later = [x for x in list(free_at.values()) + ready_at if x > t]
                t = min(later)
    return orders


def ring_schedule(stages: Stages, num_microbatches: int, kind: str = "gpipe",
                  in_flight: int | None = None, cost=None) -> Schedule:
    """The AF-Pipe schedule over ``stages`` (see the module docstring). ``cost``: the unit
    durations the ordering assumes, a ``{ActionKind: seconds}`` for F, EF, B, EB or a
    function of the unit's key ``(kind, stage, microbatch)`` (:func:`stage_costs`);
    default :data:`UNIT_COST`."""
    J, m = len(stages.layer_group), num_microbatches
    if J < 1:
        raise ValueError(f"num_moe_layers={J}: AF-Pipe needs at least one MoE layer")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"num_microbatches={m!r}: need at least one micro-batch")
    if kind not in ("gpipe", "1f1b"):
        raise ValueError(f"kind={kind!r}: ring_schedule builds 'gpipe' or '1f1b'")
    w = 3 * stages.depth if in_flight is None else in_flight
    if not isinstance(w, int) or w < 1:
        raise ValueError(f"in_flight={in_flight!r}: need at least one micro-batch in flight")
    attention = tuple(r for g in stages.attention_groups for r in g)
    experts = tuple(r for g in stages.expert_groups for r in g)
    if set(attention) & set(experts):
        raise ValueError(f"attention and expert groups overlap on {sorted(set(attention) & set(experts))}")
    orders = _group_orders(stages, m, kind, w, UNIT_COST if cost is None else cost)
    shell = Schedule(attention, experts, J, m, {}, stages=stages)
    hops = stages.hops

    # 1. computes and their sends, per rank.
    lists: dict[int, list[Action]] = {}
    for role, groups in (("A", stages.attention_groups), ("E", stages.expert_groups)):
        for g, ranks in enumerate(groups):
            for r in ranks:
                need = shell.required_keys(r)
                acts: list[Action] = []
                for k, s, i in orders.get((role, g), []):
                    acts.append(Action(k, s, i))
                    for send in _SENDS[k]:
                        key = (send, _send_stage(send, s), i)
                        if key in need:
                            acts.append(Action(send, key[1], i, shell.peers(r, send, key[1])))
                lists[r] = acts

    # 2. each sender's messages to each receiver, in send order.
    queues: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    for r, acts in lists.items():
        for a in acts:
            if a.kind.is_send:
                for p in a.peers:
                    queues.setdefault((r, p), []).append((a.kind.channel, a.stage, a.microbatch))

    # 3. receives, as early as allowed.
    actions: dict[int, list[Action]] = {}
    for r, acts in lists.items():
        need = shell.required_keys(r)
        recvs = {key: Action(key[0], key[1], key[2], shell.peers(r, key[0], key[1]))
                 for key in sorted(need, key=lambda k: (k[2], k[1], k[0].value)) if key[0].is_recv}
        heads = {p: 0 for p in {p for a in recvs.values() for p in a.peers}}
        last_forward = max((n for n, a in enumerate(acts) if not a.kind.is_backward), default=-1)
        out: list[Action] = []
        placed: set[Key] = set()

        def post(position: int) -> None:
            progress = True
            while progress:
                progress = False
                for key, a in list(recvs.items()):
                    msg = (key[0].channel, key[1], key[2])
                    if any(queues.get((p, r), [])[heads[p]:heads[p] + 1] != [msg] for p in a.peers):
                        continue
                    if kind == "gpipe" and key[0].is_backward and position < last_forward:
                        continue
                    if any(b not in placed for b in required_before(a, J, hops, need)):
                        continue
                    out.append(a)
                    placed.add(key)
                    del recvs[key]
                    for p in a.peers:
                        heads[p] += 1
                    progress = True

        post(-1)
        for n, a in enumerate(acts):
            out.append(a)
            placed.add(a.key)
            post(n)
        if recvs:  # pragma: no cover - a builder bug; validate() would also reject it
            raise AssertionError(f"ring_schedule: rank {r} could not place receives {sorted(map(str, recvs.values()))}")
        out.append(Action(_K.REDUCE, -1, -1, shell.reduce_peers(r)))
        actions[r] = out
    forward_len = {r: len(a) - 1 for r, a in actions.items()} if kind == "1f1b" else None
    return Schedule(attention, experts, J, m, dict(sorted(actions.items())), forward_len=forward_len,
                    name=f"{kind}-p{stages.depth}", stages=stages)
