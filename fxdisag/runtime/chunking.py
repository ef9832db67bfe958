"""Which rows a chunk holds: the row geometry of a chunked layer's messages (both sides agree).

Contract
--------
A layer with ``forward`` chunks in the forward pass and ``backward`` chunks in the backward
pass (``Schedule.chunks``) cuts every dispatch message of ``n`` rows (one attention rank
-> one expert rank) the same way on both sides, from ``n`` alone:

* ``L = lcm(forward, backward)`` *pieces*: forward chunk c is ``split(n, forward)[c]`` (``schedule.actions.even_blocks``),
  and each forward chunk splits evenly into ``L / forward`` consecutive pieces;
* backward chunk b is pieces ``b*L/backward .. (b+1)*L/backward - 1``, consecutive rows.

The expert side computes each piece as its own autograd graph, so a backward chunk runs
the backward of exactly its rows, whatever the two counts are; with ``forward ==
backward`` a piece is a chunk, and with one chunk each way a piece is the message. A
piece's rows inside a forward chunk of ``k`` rows are ``split(k, L / forward)``, so the
expert side needs only the chunk's own row count (its message header).

>>> g = RowChunks.of(10, 2, 3)   # L = 6: forward chunks of 5, pieces of 2,2,1 and 2,2,1
>>> [len(r) for r in g.forward], [len(r) for r in g.pieces], [len(r) for r in g.backward]
([5, 5], [2, 2, 1, 2, 2, 1], [4, 3, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxdisag.schedule.actions import even_blocks as split  # the one even split of the project

__all__ = ["RowChunks", "split"]


@dataclass(frozen=True)
class RowChunks:
    forward: tuple[range, ...]
    pieces: tuple[range, ...]
    backward: tuple[range, ...]

    @staticmethod
    def pieces_per(forward: int, backward: int) -> tuple[int, int]:
        """(pieces per forward chunk, pieces per backward chunk)."""
        L = math.lcm(forward, backward)
        return L // forward, L // backward

    @classmethod
    def of(cls, n: int, forward: int, backward: int) -> "RowChunks":
        """The geometry of a message of ``n`` rows (module docstring)."""
        per_f, per_b = cls.pieces_per(forward, backward)
        fwd = split(n, forward)
        pieces = [range(blk.start + r.start, blk.start + r.stop) for blk in fwd for r in split(len(blk), per_f)]
        bwd = [range(pieces[b * per_b].start, pieces[(b + 1) * per_b - 1].stop) for b in range(backward)]
        return cls(tuple(fwd), tuple(pieces), tuple(bwd))
