"""Timelines of one training step: the :class:`Span` record and two renderers.

Contract
--------
* :class:`Span` is the one record of "rank r did action a from t0 to t1" used by the
  simulator (``simulate.py``) and by the runtime when it records real runs. Times are
  seconds from the start of the step.
* :func:`chrome_trace` writes Chrome trace-event JSON (chrome://tracing, Perfetto):
  one process per rank (``pid`` = rank, named ``rank r``), thread 0 = the rank's serial
  work (compute, recv-wait, reduce), thread 1 = its NIC egress (send). Each span is one
  complete event (``"ph": "X"``) named ``str(action)``, ``ts``/``dur`` in microseconds.
* :func:`gantt_png` draws the same spans as a PNG Gantt chart with matplotlib (the
  optional extra ``fxdisag[plot]``); without matplotlib it raises ImportError saying so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

from fxdisag.schedule import Action

SPAN_KINDS = ("compute", "send", "recv-wait", "reduce")


@dataclass(frozen=True)
class Span:
    """Rank ``rank`` spent [start, end) seconds on ``action``.

    kind: ``"compute"`` (F/B/EF/EB), ``"send"`` (one message on the NIC, to ``peer``),
    ``"recv-wait"`` (idle until the data ``action`` consumes arrived),
    ``"reduce"`` (REDUCE, from reaching it to its end, barrier wait included).
    """
    rank: int
    action: Action
    start: float
    end: float
    kind: str
    peer: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SPAN_KINDS:
            raise ValueError(f"Span.kind={self.kind!r}; must be one of {SPAN_KINDS}")
        if self.end < self.start:
            raise ValueError(f"Span of `{self.action}` on rank {self.rank} ends "
                             f"({self.end}) before it starts ({self.start})")

    @property
    def duration(self) -> float:
        return self.end - self.start


_THREAD = {"compute": 0, "recv-wait": 0, "reduce": 0, "send": 1}
_COLOR = {"compute": "#4C72B0", "send": "#DD8452", "recv-wait": "#C8C8C8", "reduce": "#55A868"}


def chrome_trace(spans: Iterable[Span], path: str | os.PathLike) -> None:
    """Write ``spans`` as Chrome trace-event JSON to ``path`` (see module docstring)."""
    spans = list(spans)
    events: list[dict] = []
    for r in sorted({s.rank for s in spans}):
        events.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0,
                       "args": {"name": f"rank {r}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0,
                       "args": {"sort_index": r}})
        events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 0,
                       "args": {"name": "work"}})
        events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": 1,
                       "args": {"name": "send"}})
    for s in spans:
        args = {"kind": s.kind, "stage": s.action.stage, "microbatch": s.action.microbatch}
        if s.peer is not None:
            args["peer"] = s.peer
        events.append({"ph": "X", "name": str(s.action), "cat": s.kind, "pid": s.rank,
                       "tid": _THREAD[s.kind], "ts": s.start * 1e6,
                       "dur": (s.end - s.start) * 1e6, "args": args})
    with open(path, "w") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, f)


def gantt_png(spans: Iterable[Span], path: str | os.PathLike,
              title: str = "fxdisag step timeline") -> None:
    """Draw ``spans`` as a Gantt chart (one row per rank, sends as a thin strip above it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # headless: never needs a display
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError("gantt_png needs matplotlib: `pip install matplotlib` or "
                          "`pip install fxdisag[plot]`") from e
    spans = list(spans)
    ranks = sorted({s.rank for s in spans})
    row = {r: n for n, r in enumerate(ranks)}
    end = max((s.end for s in spans), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(12, 0.7 * len(ranks) + 1.5))
    for s in spans:
        y = row[s.rank]
        if s.kind == "send":
            y0, h = y - 0.4, 0.22  # the NIC bar is a thin strip above the work bar
        else:
            y0, h = y - 0.15, 0.55
        ax.broken_barh([(s.start, s.end - s.start)], (y0, h), facecolors=_COLOR[s.kind],
                       edgecolor="white", linewidth=0.4)
        if s.kind == "compute" and (s.end - s.start) > 0.035 * end:
            ax.text((s.start + s.end) / 2, y0 + h / 2, str(s.action), ha="center",
                    va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlim(0, end)
    ax.set_xlabel("time (s)")
    ax.set_title(title)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in _COLOR.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, ncol=4,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
