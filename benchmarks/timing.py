"""What the multi-variant benchmarks share: timing steps under torchrun and stacking timelines.

* ``timed_step(dmodel, batch) -> (seconds, loss)``: gradients cleared, a barrier, forward +
  ``loss.backward()``, the slowest rank's wall time (all-reduce MAX). Collective.
* ``round_robin(models, batches, warmup, steps, record)``: each model warms up on
  ``batches[:warmup]``, then ``steps`` rounds on the next batches, each round starting one
  model later, so the host's drift hits every model alike; ``record(k, seconds, loss)``
  per timed step of model k. Collective.
* ``has_matplotlib()``; ``stack_pngs(paths, target)``: one PNG of the existing ``paths``,
  one above the other (None without PIL or without any).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = ["has_matplotlib", "round_robin", "stack_pngs", "timed_step"]


def timed_step(dmodel, batch) -> tuple[float, float]:
    import torch
    import torch.distributed as dist

    for p in dmodel.parameters():
        p.grad = None
    dist.barrier()
    t0 = time.perf_counter()
    out = dmodel(**batch)
    out.loss.backward()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item(), float(out.loss.detach())


def round_robin(models: Sequence, batches: Sequence, warmup: int, steps: int,
                record: Callable[[int, float, float], None]) -> None:
    for dmodel in models:
        for k in range(warmup):
            timed_step(dmodel, batches[k])
    n = len(models)
    for s in range(steps):
        for k in [(s + i) % n for i in range(n)]:
            record(k, *timed_step(models[k], batches[warmup + s]))


def has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def stack_pngs(paths: Sequence[str | Path], target: str | Path) -> str | None:
    try:
        from PIL import Image
    except ImportError:
        return None
    images = [Image.open(p).convert("RGB") for p in paths if Path(p).exists()]
    if not images:
        return None
    sheet = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), "white")
    y = 0
    for image in images:
        sheet.paste(image, (0, y))
        y += image.height
    sheet.save(target)
    return str(target)
