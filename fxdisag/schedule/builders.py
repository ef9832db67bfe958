"""Schedule builders: the GPipe AF-Pipe schedule and the expert-parallel baseline's.

Contract: each builder returns a :class:`~fxdisag.schedule.actions.Schedule` that
:func:`~fxdisag.schedule.validate.validate` accepts; arguments it cannot build a
schedule for raise ``ValueError`` naming the argument.

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

Expert parallelism (:func:`ep_schedule`): every rank has both roles. Only the action list differs -- it is the usual EP
order, with no cross-micro-batch overlap:

    forward, for each micro-batch i, for each stage s:
        <D(s,i)  F(s,i)  >D(s,i)  <C(s,i)  EF(s,i)  >C(s,i)          # F(s+1,i) waits for C(s,i)
    backward, for each micro-batch i, for each stage s from the last:
        <GC(s-1,i)  <GD(s-1,i)  B(s,i)  >GC(s-1,i)  EB(s-1,i)  >GD(s-1,i)
    R

With ``overlap=True`` (DeepSeek's DualPipe and Megatron-LM's
``--overlap-moe-expert-parallel-comm`` do the same) micro-batches go in pairs (a, b; an
odd last one alone) and each stage's exchange of one hides behind the other's compute:

    forward, for each pair, for each stage s:
        <D(s,a) <D(s,b)  F(s,a) >D(s,a) <C(s,a)  F(s,b) >D(s,b) <C(s,b)   # a's dispatch flies during F(s,b)
        EF(s,a) >C(s,a)  EF(s,b) >C(s,b)                                  # a's combine flies during EF(s,b)
    backward, for each pair, for each stage s from the last:
        <GC(s-1,a) <GC(s-1,b) <GD(s-1,a) <GD(s-1,b)
        B(s,a) >GC(s-1,a)  B(s,b) >GC(s-1,b)  EB(s-1,a) >GD(s-1,a)  EB(s-1,b) >GD(s-1,b)
    R

Every exchange posts all of its receives before any send: gloo runs a pair half-duplex
when a send is posted first, and ``all_to_all_single`` reaches about half the link rate
(../shared/notes/cpu-cluster-emulation.md). EP is a baseline to measure against, so it
gets that care too.
"""

from __future__ import annotations

from collections.abc import Sequence

from fxdisag.schedule.actions import Action, ActionKind, Schedule

__all__ = ["af_pipe_schedule", "check_groups", "ep_schedule", "one_f_one_b_schedule"]


def check_groups(attention_ranks: Sequence[int], expert_ranks: Sequence[int], *, disjoint: bool = True) -> None:
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
    if both and disjoint:
        raise ValueError(f"attention_ranks and expert_ranks overlap on ranks {both}: "
                         "the two groups must be disjoint")


def af_pipe_schedule(attention_ranks: Sequence[int], expert_ranks: Sequence[int],
                     num_moe_layers: int, num_microbatches: int) -> Schedule:
    """The GPipe-style AF-Pipe schedule (see the module docstring for the order)."""
    check_groups(attention_ranks, expert_ranks)
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


def ep_schedule(ranks: Sequence[int], num_moe_layers: int, num_microbatches: int, overlap: bool = False) -> Schedule:
    """The EP action list of every rank (all ranks do the same; see the module docstring).

    ``overlap``: two micro-batches in flight, each one's all-to-all behind the other's compute."""
    ranks = tuple(sorted(ranks))
    J, m = num_moe_layers, num_microbatches
    if J < 1 or m < 1:
        raise ValueError(f"ep_schedule: need num_moe_layers >= 1 and num_microbatches >= 1, got {J}, {m}")
    K = ActionKind
    width = 2 if overlap else 1
    groups = [list(range(i, min(i + width, m))) for i in range(0, m, width)]
    acts: list[Action] = []
    for group in groups:
        for s in range(J + 1):
            if s == J:
                acts += [Action(K.F, s, i) for i in group]
                continue
            acts += [Action(K.RECV_D, s, i, ranks) for i in group]
            for i in group:
                acts += [Action(K.F, s, i), Action(K.SEND_D, s, i, ranks), Action(K.RECV_C, s, i, ranks)]
            for i in group:
                acts += [Action(K.EF, s, i), Action(K.SEND_C, s, i, ranks)]
    for group in groups:
        for s in reversed(range(J + 1)):
            if s > 0:
                acts += [Action(K.RECV_GC, s - 1, i, ranks) for i in group]
                acts += [Action(K.RECV_GD, s - 1, i, ranks) for i in group]
            for i in group:
                acts.append(Action(K.B, s, i))
                if s > 0:
                    acts.append(Action(K.SEND_GC, s - 1, i, ranks))
            if s > 0:
                for i in group:
                    acts += [Action(K.EB, s - 1, i), Action(K.SEND_GD, s - 1, i, ranks)]
    acts.append(Action(K.REDUCE, -1, -1, ranks))
    return Schedule(ranks, ranks, J, m, {r: list(acts) for r in ranks}, name="ep-overlap" if overlap else "ep")


def one_f_one_b_schedule(attention_ranks: Sequence[int], expert_ranks: Sequence[int],
                         num_moe_layers: int, num_microbatches: int, in_flight: int | None = None) -> Schedule:
    """A 1F1B-style AF-Pipe schedule: at most ``in_flight`` micro-batches between their first
    forward and their last backward, backward work first whenever it is ready.

    Activations in flight are bounded by ``in_flight`` (default 2, the depth of the
    attention -> experts ring), not by m. Backward runs inside the forward call (the
    loss gradient is taken as 1 and applied in ``loss.backward()``; see
    ``fxdisag/runtime/runner.py``), so both phases but REDUCE form the forward phase.

    Construction::

        attention order: list-schedule the units F(s,i), B(s,i) of one attention rank in a
            unit-time model of the ring (every compute 1 step, the experts serve messages
            in arrival order), picking a ready backward first, then the oldest ready
            forward; micro-batch i starts only while fewer than in_flight are in flight
        attention list:  after F(s,i): <C(s,i) >D(s,i) (s < J); after B(s,i): <GD(s-1,i)
            >GC(s-1,i) (s > 0); then R
        expert list:     computes in the order their inputs are sent; each followed by its
            send; receives posted in the attention ranks' send order (per-pair FIFO), each as
            soon as the micro-batch's previous expert action allows: <D(0,i) at once,
            <D(j,i) after >C(j-1,i), <GC(J-1,i) after >C(J-1,i), <GC(j,i) after >GD(j+1,i)
    """
    check_groups(attention_ranks, expert_ranks)
    J, m = num_moe_layers, num_microbatches
    if not isinstance(J, int) or J < 1:
        raise ValueError(f"num_moe_layers={J!r}: AF-Pipe needs at least one MoE layer")
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"num_microbatches={m!r}: need at least one micro-batch")
    w = 2 if in_flight is None else in_flight
    if not isinstance(w, int) or w < 1:
        raise ValueError(f"in_flight={in_flight!r}: need at least one micro-batch in flight")
    w = min(w, m)
    A, E = tuple(sorted(attention_ranks)), tuple(sorted(expert_ranks))
    K = ActionKind
    order = _one_f_one_b_order(J, m, w)

    attn: list[Action] = []
    sent: list[tuple[ActionKind, int, int]] = []  # what the attention ranks send, in order
    for kind, s, i in order:
        attn.append(Action(kind, s, i))
        if kind is K.F and s < J:
            attn += [Action(K.RECV_C, s, i, E), Action(K.SEND_D, s, i, E)]
            sent.append((K.RECV_D, s, i))
        elif kind is K.B and s > 0:
            attn += [Action(K.RECV_GD, s - 1, i, E), Action(K.SEND_GC, s - 1, i, E)]
            sent.append((K.RECV_GC, s - 1, i))
    attn.append(Action(K.REDUCE, -1, -1, A))

    # The expert computes in the order its inputs are sent.
    computes = [(K.EF if k is K.RECV_D else K.EB, j, i) for k, j, i in sent]
    done: set[tuple[ActionKind, int, int]] = set()  # expert sends placed so far
    expert: list[Action] = []
    posted = 0

    def allowed(key: tuple[ActionKind, int, int]) -> bool:
        k, j, i = key
        if k is K.RECV_D:
            return j == 0 or (K.SEND_C, j - 1, i) in done
        if j == J - 1:
            return (K.SEND_C, j, i) in done
        return (K.SEND_GD, j + 1, i) in done

    def post() -> None:
        nonlocal posted
        while posted < len(sent) and allowed(sent[posted]):
            k, j, i = sent[posted]
            expert.append(Action(k, j, i, A))
            posted += 1

    post()
    for kind, j, i in computes:
        expert.append(Action(kind, j, i))
        send = K.SEND_C if kind is K.EF else K.SEND_GD
        expert.append(Action(send, j, i, A))
        done.add((send, j, i))
        post()
    expert.append(Action(K.REDUCE, -1, -1, E))

    actions = {r: list(attn) for r in A}
    actions.update({r: list(expert) for r in E})
    forward_len = {r: len(acts) - 1 for r, acts in actions.items()}
    return Schedule(tuple(attention_ranks), tuple(expert_ranks), J, m, dict(sorted(actions.items())),
                    forward_len=forward_len, name="1f1b")


def _one_f_one_b_order(J: int, m: int, w: int) -> list[tuple[ActionKind, int, int]]:
    """The attention rank's compute order (see :func:`one_f_one_b_schedule`)."""
    K = ActionKind
    # Per micro-batch, its attention units in order; an expert hop sits between two units
    # unless the first is F(J) (B(J) follows at once).
    units = [[(K.F, s, i) for s in range(J + 1)] + [(K.B, s, i) for s in reversed(range(J + 1))] for i in range(m)]
    nxt = [0] * m            # index of each micro-batch's next unit
    ready_at = [0] * m       # when that unit's input is there
    started = finished = 0
    expert_free = 0          # the experts serve hops in arrival order, one step each
    order: list[tuple[ActionKind, int, int]] = []
    t = 0
    while finished < m:
        candidates = [i for i in range(started) if nxt[i] < len(units[i]) and ready_at[i] <= t]
        if started < m and started - finished < w:
            candidates.append(started)
        if not candidates:
            t = min(ready_at[i] for i in range(started) if nxt[i] < len(units[i]))
            continue
        i = min(candidates, key=lambda i: (0 if nxt[i] > J else 1, i))  # backward first, then oldest
        if i == started:
            started += 1
        kind, s, _ = units[i][nxt[i]]
        order.append(units[i][nxt[i]])
        nxt[i] += 1
        t += 1
        if nxt[i] == len(units[i]):
            finished += 1
        elif (kind is K.F and s < J) or (kind is K.B and s > 0):  # a hop through the experts
            expert_free = max(expert_free, t) + 1
            ready_at[i] = expert_free
        else:
            ready_at[i] = t
    return order
