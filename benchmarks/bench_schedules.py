"""GPipe vs 1F1B on one AF-pipe split: step time, peak memory per rank, timelines.

What it guarantees: every figure is measured in this run. Each schedule runs in its own
``torchrun`` job (so a process's peak RSS belongs to one schedule), on the model of
``bench_afpipe_vs_ep.py`` with the same plan except ``schedule_kind``, on the same
global batches. Per schedule and rank it reports

* the median step (forward + ``loss.backward()``, optimizer excluded; slowest rank's
  wall time from a barrier) over ``--steps`` steps after ``--warmup``;
* the peak RSS of the rank's process (``getrusage``: model, optimizer state and the
  Python baseline included, which are the same for both schedules);
* the peak bytes of activations autograd held for backward (``saved_tensors_hooks``:
  every saved tensor that is not a parameter or a view of one, counted per storage);
* the loss of every step (the two schedules must agree: they compute the same thing);
* a Chrome trace (and a PNG with matplotlib) of the last step.

The link is emulated in-process (``FXDISAG_THROTTLE``, ``fxdisag.testing.throttle``;
``--rate unlimited`` for none): no root needed. Two ranks share this machine's 2 cores.

Usage::

    python benchmarks/bench_schedules.py                         # 1A+1E, m=8, 400mbit
    python benchmarks/bench_schedules.py --microbatches 4 --rate unlimited --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

SCHEDULES = ("gpipe", "1f1b")


class SavedActivations:
    """High-water mark of the bytes autograd saves for backward (parameters excluded)."""

    def __init__(self, params):
        import torch

        self._params = {p.untyped_storage().data_ptr() for p in params}
        self._live: dict[int, list] = {}  # storage ptr -> [bytes, refs]
        self.live = self.peak = 0
        self._torch = torch

    def _pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._params or storage.nbytes() == 0:
            return t
        entry = self._live.setdefault(ptr, [storage.nbytes(), 0])
        if entry[1] == 0:
            self.live += entry[0]
            self.peak = max(self.peak, self.live)
        entry[1] += 1
        return _Saved(t, ptr, self)

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._live[ptr]

    def hooks(self):
        return self._torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda s: s.tensor if isinstance(s, _Saved) else s)


class _Saved:
    def __init__(self, tensor, ptr, owner):
        self.tensor, self.ptr, self.owner = tensor, ptr, owner

    def __del__(self):
        self.owner._release(self.ptr)


def worker(schedule: str, m: int, steps: int, warmup: int, out: str) -> None:
    import resource

    import torch
    import torch.distributed as dist

    import fxdisag
    from bench_afpipe_vs_ep import GLOBAL_BATCH, MODEL, SEQ_LEN, make_model, model_config
    from fxdisag.testing.models import example_batch
    from fxdisag.testing.throttle import install_from_env

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    install_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = model_config()
    plan = fxdisag.Plan.manual(1, world - 1, MODEL["num_experts"], m, schedule_kind=schedule)
    batches = [example_batch(cfg, GLOBAL_BATCH, SEQ_LEN, seed=s) for s in range(warmup + steps)]
    dmodel = fxdisag.disaggregate(make_model(cfg), batches[0], plan, trace=True)
    meter = SavedActivations(dmodel.parameters())
    times, losses = [], []
    for k, batch in enumerate(batches):
        for p in dmodel.parameters():
            p.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        with meter.hooks():
            out_ = dmodel(**batch)
            out_.loss.backward()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if k >= warmup:
            times.append(elapsed.item())
            losses.append(float(out_.loss.detach()))
    stem = Path(out) / f"timeline_{schedule}_m{m}"
    png = None
    try:
        import matplotlib  # noqa: F401

        png = str(stem) + ".png"
    except ImportError:
        pass
    dmodel.write_timeline(trace_json=str(stem) + ".json", png=png)
    mine = {"rank": rank, "role": dmodel.role, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_saved_mb": meter.peak / 2**20}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out, f"{schedule}_m{m}.json").write_text(json.dumps(
            {"schedule": schedule, "m": m, "median_step_s": statistics.median(times), "times": times,
             "losses": losses, "ranks": gathered, "rate": os.environ.get("FXDISAG_THROTTLE", "unlimited")}, indent=1))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="1 attention rank + ranks-1 expert ranks")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--rate", default="400mbit", help="emulated link rate (FXDISAG_THROTTLE), or 'unlimited'")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out_schedules"))
    ap.add_argument("--worker", choices=SCHEDULES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.microbatches, args.steps, args.warmup, args.out)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.rate != "unlimited":
        env["FXDISAG_THROTTLE"] = args.rate
    results = []
    for schedule in SCHEDULES:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks),
               str(Path(__file__).resolve()), "--worker", schedule, "--microbatches", str(args.microbatches),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", args.out]
        print(f"running {schedule} ...", flush=True)
        subprocess.run(cmd, env=env, check=True, timeout=900)
        results.append(json.loads(Path(args.out, f"{schedule}_m{args.microbatches}.json").read_text()))
    print(f"\n1A+{args.ranks - 1}E, m={args.microbatches}, link {args.rate}, {args.steps} steps "
          f"(median), {os.cpu_count()} cores shared by {args.ranks} ranks")
    print(f"{'schedule':<8} {'step (s)':>9}  " + "  ".join(
        f"{'rank ' + str(r['rank']) + ' (' + r['role'] + ')':>26}" for r in results[0]["ranks"]))
    print(f"{'':<8} {'':>9}  " + "  ".join(f"{'RSS MB / saved act. MB':>26}" for _ in results[0]["ranks"]))
    for res in results:
        cells = "  ".join(f"{r['peak_rss_mb']:>14.0f} / {r['peak_saved_mb']:>9.1f}" for r in res["ranks"])
        print(f"{res['schedule']:<8} {res['median_step_s']:>9.3f}  {cells}")
    same = all(abs(a - b) <= 1e-5 for a, b in zip(results[0]["losses"], results[1]["losses"]))
    print(f"losses agree across schedules (<= 1e-5): {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
