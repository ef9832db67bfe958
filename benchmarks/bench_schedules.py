"""Schedules and pipeline depths, each on its own ranks: step time, parameter bytes and
peak memory per rank, timelines.

What it guarantees: every figure is measured in this run, except the predicted parameter
bytes (the planner's ``rank_parameter_bytes`` on a profile of the model). Each
configuration runs in its own ``torchrun`` job (so a process's peak RSS belongs to one
configuration), on the model of ``bench_afpipe_vs_ep.py``, on the same global batches:

* ``--ranks 2``: GPipe and 1F1B on 1A+1E, m = ``--microbatches``; and ``1f1b-ring``:
  the multi-stage builder's 1F1B (``ring_schedule``, 3 micro-batches in flight) at p = 1,
  passed as ``schedule=``;
* ``--ranks 4``: p = 1 (2A+2E, GPipe), p = 2 (one 1A+1E group per layer, GPipe and
  1F1B) and EP on 4 ranks (m = 2).

Per configuration and rank it reports

* the median step (forward + ``loss.backward()``, optimizer excluded; slowest rank's
  wall time from a barrier) over ``--steps`` steps after ``--warmup``;
* the parameter bytes the rank holds, and the planner's prediction;
* the peak RSS of the rank's process (``getrusage``: model, optimizer state and the
  Python baseline included);
* the peak bytes of activations autograd held for backward (``saved_tensors_hooks``:
  every saved tensor that is not a parameter or a view of one, counted per storage), and
  the planner's prediction (``rank_activation_bytes`` on an eager-attention profile; AF-pipe
  plans, not the hand-passed ring schedule);
* the loss of every step (all configurations must agree: they compute the same thing);
* a Chrome trace (and a PNG with matplotlib) of the last step.

The link is emulated in-process (``FXDISAG_THROTTLE``, ``fxdisag.testing.throttle``;
``--rate unlimited`` for none; it paces point-to-point sends, not the gradient
all-reduce): no root needed. The ranks share this machine's 2 cores: at 4 ranks each
computes about 2x slower than at 2.

Usage::

    python benchmarks/bench_schedules.py                         # 1A+1E, m=8, 400mbit
    python benchmarks/bench_schedules.py --ranks 4               # p=1 vs p=2 vs EP
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

from timing import has_matplotlib, stack_pngs  # noqa: E402

SCHEDULES = ("gpipe", "1f1b")
EP_MICROBATCHES = 2


def configurations(ranks: int, m: int) -> list[str]:
    if ranks == 2:
        return ["gpipe-1a1e", "1f1b-1a1e", "1f1b-ring-1a1e"]
    if ranks == 4:
        return ["gpipe-p1-2a2e", "gpipe-p2-1a1e", "1f1b-p2-1a1e", "ep4"]
    raise SystemExit(f"bench_schedules.py: --ranks {ranks}: choose 2 or 4")


def make_plan(name: str, world: int, m: int, in_flight: int | None = None):
    import fxdisag
    from bench_afpipe_vs_ep import MODEL

    E = MODEL["num_experts"]
    if name == "ep4":
        return fxdisag.Plan.expert_parallel(world, E, EP_MICROBATCHES)
    kind = name.split("-")[0]
    if "-p2-" in name:
        return fxdisag.Plan.manual(1, 1, E, m, schedule_kind=kind, pipeline_depth=2, in_flight=in_flight)
    a = 2 if "2a2e" in name else 1
    return fxdisag.Plan.manual(a, world - a, E, m, schedule_kind=kind, in_flight=in_flight)


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


def worker(config: str, m: int, steps: int, warmup: int, out: str, in_flight: int | None = None) -> None:
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
    plan = make_plan(config, world, m, in_flight)
    batches = [example_batch(cfg, GLOBAL_BATCH, SEQ_LEN, seed=s) for s in range(warmup + steps)]
    schedule = None
    if "-ring-" in config:
        from fxdisag.schedule import Stages, ring_schedule

        stages = Stages.single(plan.attention_ranks, plan.expert_ranks, MODEL["num_layers"])
        schedule = ring_schedule(stages, m, "1f1b", in_flight)
    dmodel = fxdisag.disaggregate(make_model(cfg), batches[0], plan, trace=True, schedule=schedule)
    from fxdisag.planner.memory import rank_activation_bytes, rank_parameter_bytes

    # eager CPU attention keeps its S x S probabilities: profile without the fused-attention discount
    prof = fxdisag.profile(fxdisag.capture(make_model(cfg), batches[0]), 1, SEQ_LEN, torch.float32,
                           fused_attention=False)
    predicted = rank_parameter_bytes(prof, dmodel.plan)[rank]
    predicted_saved = None
    if dmodel.plan.kind == "afpipe" and schedule is None:
        predicted_saved = rank_activation_bytes(prof, dmodel.plan, GLOBAL_BATCH)[rank]
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
    stem = Path(out) / f"timeline_{config}_m{m}"
    png = str(stem) + ".png" if has_matplotlib() else None
    dmodel.write_timeline(trace_json=str(stem) + ".json", png=png,
                          title=f"{config}, m={m}, {os.environ.get('FXDISAG_THROTTLE', 'unlimited')}: "
                                f"step {statistics.median(times):.3f} s (median)")
    held = sum(p.numel() * p.element_size() for p in dmodel.parameters())
    mine = {"rank": rank, "role": dmodel.role, "param_mb": held / 2**20, "predicted_param_mb": predicted / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_saved_mb": meter.peak / 2**20,
            "predicted_saved_mb": None if predicted_saved is None else predicted_saved / 2**20}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(out, f"{config}_m{m}.json").write_text(json.dumps(
            {"config": config, "m": EP_MICROBATCHES if config == "ep4" else m, "median_step_s": statistics.median(times), "times": times,
             "losses": losses, "ranks": gathered, "rate": os.environ.get("FXDISAG_THROTTLE", "unlimited")}, indent=1))
    dist.destroy_process_group()


def _mb(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def stack_timelines(out: str, configs: list[str], m: int, name: str) -> str | None:
    """One PNG with every configuration's timeline, one above the other (same time scale
    is not forced: each panel is its own step), or None without PIL or a panel."""
    paths = [Path(out, f"timeline_{c}_m{m}.png") for c in configs]
    if not all(p.exists() for p in paths):
        return None
    return stack_pngs(paths, Path(out, name))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="2: GPipe vs 1F1B on 1A+1E; 4: p=1 vs p=2 vs EP")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--rate", default="400mbit", help="emulated link rate (FXDISAG_THROTTLE), or 'unlimited'")
    ap.add_argument("--in-flight", type=int, default=None,
                    help="1f1b: micro-batches in flight (default: the plan's, 2 at p = 1; ring_schedule's 3p)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out_schedules"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.microbatches, args.steps, args.warmup, args.out, args.in_flight)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, ".gitignore").write_text("*\n")  # outputs stay out of the repo
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if args.rate != "unlimited":
        env["FXDISAG_THROTTLE"] = args.rate
    results = []
    for config in configurations(args.ranks, args.microbatches):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks),
               str(Path(__file__).resolve()), "--worker", config, "--microbatches", str(args.microbatches),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", args.out]
        cmd += ["--in-flight", str(args.in_flight)] if args.in_flight else []
        print(f"running {config} ...", flush=True)
        subprocess.run(cmd, env=env, check=True, timeout=900)
        results.append(json.loads(Path(args.out, f"{config}_m{args.microbatches}.json").read_text()))
    print(f"\n{args.ranks} ranks, m={args.microbatches} (EP: m={EP_MICROBATCHES}), 1f1b in flight "
          f"{args.in_flight or 'default'}, link {args.rate}, {args.steps} "
          f"steps (median), {os.cpu_count()} cores shared by {args.ranks} ranks")
    print(f"{'configuration':<14} {'step (s)':>9}  " + "  ".join(f"{'rank ' + str(r):>40}" for r in range(args.ranks)))
    print(f"{'':<14} {'':>9}  " + "  ".join(f"{'role params/pred MB RSS / act/pred MB':>40}" for _ in range(args.ranks)))
    for res in results:
        cells = "  ".join(f"{r['role']:>4} {r['param_mb']:>5.2f}/{r['predicted_param_mb']:<5.2f} {r['peak_rss_mb']:>6.0f} / "
                          f"{r['peak_saved_mb']:>5.1f}/{_mb(r.get('predicted_saved_mb')):<5}" for r in res["ranks"])
        print(f"{res['config']:<14} {res['median_step_s']:>9.3f}  {cells}")
    base = results[0]["losses"]
    same = all(abs(a - b) <= 1e-5 for res in results[1:] for a, b in zip(base, res["losses"]))
    exact = all(abs(r["param_mb"] - r["predicted_param_mb"]) < 1e-9 for res in results for r in res["ranks"])
    stacked = stack_timelines(args.out, configurations(args.ranks, args.microbatches), args.microbatches,
                              f"timelines_{args.ranks}r_{args.rate}.png")
    if stacked:
        print(f"timelines, one above the other: {stacked}")
    print(f"losses agree across configurations (<= 1e-5): {same}")
    print(f"parameter bytes held == predicted on every rank: {exact}")
    return 0 if same and exact else 1


if __name__ == "__main__":
    sys.exit(main())
