"""solve_chunks: how many chunks each MoE layer's dispatch -> experts -> combine runs in.

Contract
--------
``solve_chunks(step_of, grid=CHUNK_GRID) -> ChunkChoice`` picks the (forward r, backward
r') pair, each from ``grid``, with the fewest predicted step seconds, where
``step_of((r, r'))`` is the cost model's step with every MoE layer in those chunks
(``cost_afpipe.afpipe_step(chunks=...)``: CHUNKED_SEGMENT in the round trip, one expert
action overhead per chunk in the expert device's busy time). It is exhaustive over
``grid x grid``, so exact for the cost model on that grid; a near tie (``tie``, relative)
goes to the fewest chunks (fewer actions: the per-action overhead is the term the
profiling step fits least surely). ``len(grid)**2`` step evaluations, independent of the
layer count (the cost model's layers are alike, so one pair serves every layer:
``Plan.chunks`` repeats it per layer).

The order of a layer's tasks is not searched: the chunks of one micro-batch are equal in
size, and in a flow shop of identical jobs every order takes as long (CHUNKED_SEGMENT);
``schedule.chunk_schedule`` puts them in chunk order, each expert chunk's send right
after its compute.

Pseudo-code::

    for r in grid, r' in grid: t[r, r'] = step_of((r, r'))
    best = min t; among (r, r') with t <= best * (1 + tie): fewest r + r', then fastest
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["CHUNK_GRID", "CHUNK_TIE", "ChunkChoice", "solve_chunks"]

CHUNK_GRID: tuple[int, ...] = (1, 2, 4, 8, 16)
# The tie ``plan(chunks=True)`` solves with. Measured (benchmarks/RESULTS.md, bench_chunks.py,
# two runs): the calibrated model prices a pair of many chunks 10-21% low (each chunk's
# attention-side send/receive actions are not in CHUNKED_SEGMENT), and it picked 8 x 4,
# 16 x 8, 8 x 8 where 4 x 4 measured 6-9% faster; within 10% the fewest chunks win.
CHUNK_TIE = 0.10


@dataclass(frozen=True)
class ChunkChoice:
    chunks: tuple[int, int]  # (forward, backward) chunks per MoE layer
    step: float  # predicted step at that choice (s)
    unchunked: float  # predicted step at (1, 1) (s)
    table: dict[tuple[int, int], float] = field(repr=False, default_factory=dict)

    def describe(self) -> str:
        f, b = self.chunks
        if (f, b) == (1, 1):
            best = min((k for k in self.table if k != (1, 1)), key=self.table.get, default=None)
            why = (f"; the best chunked, {best[0]} x {best[1]}, predicts {self.table[best]:.4g} s" if best else "")
            return f"dispatch -> experts -> combine unchunked: {self.step:.4g} s{why}"
        return (f"dispatch -> experts -> combine in {f} chunk(s) forward, {b} backward: {self.step:.4g} s "
                f"predicted, {self.unchunked:.4g} s unchunked ({self.unchunked / self.step:.3f}x)")


def solve_chunks(step_of: Callable[[tuple[int, int]], float], grid: Sequence[int] = CHUNK_GRID,
                 tie: float = 0.0) -> ChunkChoice:
    """The chunk pair with the fewest predicted seconds (module docstring)."""
    if not grid or any(not isinstance(r, int) or r < 1 for r in grid):
        raise ValueError(f"solve_chunks: grid={list(grid)!r} must hold chunk counts >= 1")
    table = {(f, b): step_of((f, b)) for f in grid for b in grid}
    fastest = min(table.values())
    near = [k for k, t in table.items() if t <= fastest * (1 + tie)]
    best = min(near, key=lambda k: (k[0] + k[1], table[k]))
    unchunked = table[(1, 1)] if (1, 1) in table else step_of((1, 1))
    return ChunkChoice(best, table[best], unchunked, table)
