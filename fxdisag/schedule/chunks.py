"""chunk_schedule: split each MoE layer's dispatch -> expert compute -> combine into chunks.

Contract
--------
``chunk_schedule(schedule, chunks) -> Schedule`` returns ``schedule`` with
``chunks`` (MoE layer j -> (forward r, backward r')) applied, and nothing else changed:

* every action of a chunked kind (``CHUNKED_FORWARD``: ``>D <D EF >C <C``;
  ``CHUNKED_BACKWARD``: ``>GC <GC EB >GD <GD``) of layer j becomes its r (or r') chunks,
  in chunk order, where it stood;
* an expert compute directly followed by its send (``EF >C``, ``EB >GD``, what every
  builder emits) becomes r pairs ``EF c, >C c``: chunk c's combine leaves while chunk c+1
  computes, and chunk c+1's dispatch is on the wire while chunk c computes;
* every other action stays where it was. Receives are still posted before the sends
  they answer, and a pair's messages go in chunk order on both sides (per-pair FIFO).

So the expanded schedule is valid whenever ``schedule`` is (``validate`` checks it; the
tests run it over the builders). What a chunk holds is the runtime's business
(``runtime/chunking.py``): chunk c of a message is a block of its rows.

Pseudo-code::

    for each rank, for each action a (layer j, r chunks of a's direction):
        a is EF/EB and the next action is its send -> (a chunk c, send chunk c) for c < r
        a is chunked                             -> a chunk c for c < r
        else                                     -> a
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from fxdisag.schedule.actions import Action, ActionKind, Schedule, num_chunks

__all__ = ["chunk_schedule"]


def chunk_schedule(schedule: Schedule, chunks: Mapping[int, tuple[int, int]]) -> Schedule:
    """``schedule`` with MoE layer j's chunked actions split into ``chunks[j]`` = (forward,
    backward) chunks (module docstring). Layers not in ``chunks`` stay unchunked."""
    if schedule.chunks and any(max(c) > 1 for c in schedule.chunks.values()):
        raise ValueError(f"schedule {schedule.name!r} is chunked already ({schedule.chunks})")
    K = ActionKind
    probe = dataclasses.replace(schedule, actions={}, chunks=dict(chunks))  # checks the counts
    table = probe.chunks
    send_of = {K.EF: K.SEND_C, K.EB: K.SEND_GD}
    actions: dict[int, list[Action]] = {}
    for rank, acts in schedule.actions.items():
        out: list[Action] = []
        n = 0
        while n < len(acts):
            a = acts[n]
            r = num_chunks(table, a.kind, a.stage)
            nxt = acts[n + 1] if n + 1 < len(acts) else None
            if r > 1 and a.kind in send_of and nxt is not None and nxt.kind is send_of[a.kind] \
                    and (nxt.stage, nxt.microbatch) == (a.stage, a.microbatch):
                for c in range(r):
                    out += [dataclasses.replace(a, chunk=c), dataclasses.replace(nxt, chunk=c)]
                n += 2
                continue
            out += [dataclasses.replace(a, chunk=c) for c in range(r)] if r > 1 else [a]
            n += 1
        actions[rank] = out
    forward_len = None
    if schedule.forward_len is not None:  # the forward phase keeps the same actions, now chunked
        forward_len = {}
        for rank, acts in schedule.actions.items():
            if rank in schedule.forward_len:
                head = acts[: schedule.forward_len[rank]]
                forward_len[rank] = sum(num_chunks(table, a.kind, a.stage) for a in head)
    return dataclasses.replace(schedule, actions=actions, forward_len=forward_len, chunks=table)
