"""Chunked dispatch -> experts -> combine: measured step time at the solver's chunks against
unchunked, with timelines (issue #14).

What it guarantees: every step time is measured in this run; every prediction is the cost
model's (``fxdisag.planner.search.plan(chunks=...)``) on the profile of the model and the
cluster measured on the same ranks, calibrated by a real profiling step
(``fxdisag.planner.calibrate.probe``: it fits the expert action overhead, the fixed part of
an expert chunk; the link latency, the fixed part of a message, is
``ClusterSpec.measure()``'s). One ``torchrun`` job per rank count, on the model and batches
of ``bench_afpipe_vs_ep.py``:

* the split is the planner's (``runnable_plan`` with the calibration): 1A+1E at 2 ranks,
  2A+2E at 4 ranks, at m in ``--microbatches``;
* per m, the variants are chunks (forward, backward) = (1, 1), (2, 2), (4, 4) and the
  solver's pair (``solve_chunks``, exhaustive over {1, 2, 4, 8, 16}^2), each its own
  ``DisaggregatedModel``, timed round-robin after a warm-up;
* it reports each variant's median step (forward + ``loss.backward()``; slowest rank from a
  barrier), the prediction, and whether the losses agree (they compute the same thing);
* the timelines of the last step of (1, 1) and the solver's pair, one above the other, in
  ``benchmarks/timelines_chunks_<ranks>r_<rate>.png`` (the figures RESULTS.md shows: a run
  replaces them).

The link is emulated in-process (``FXDISAG_THROTTLE``, default 400mbit): no root needed.
The ranks share this machine's 2 cores: at 4 ranks each computes about 2x slower.

    python benchmarks/bench_chunks.py                    # 2 and 4 ranks, m in {1, 4}, 400mbit
    python benchmarks/bench_chunks.py --ranks 2 --rate 1gbit --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from timing import has_matplotlib, round_robin, stack_pngs  # noqa: E402

FIXED = ((1, 1), (2, 2), (4, 4))


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import fxdisag
    from bench_afpipe_vs_ep import GLOBAL_BATCH, SEQ_LEN, make_model, model_config
    from fxdisag.planner import ClusterSpec
    from fxdisag.planner.auto import runnable_plan
    from fxdisag.planner.calibrate import probe
    from fxdisag.planner.search import plan as search_plan
    from fxdisag.testing import throttle
    from fxdisag.testing.models import example_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    throttle.install_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = model_config()
    batches = [example_batch(cfg, GLOBAL_BATCH, SEQ_LEN, seed=s) for s in range(args.warmup + args.steps)]
    example = example_batch(cfg, 2, SEQ_LEN, seed=1)
    cluster = ClusterSpec.measure()
    captured = fxdisag.capture(make_model(cfg), example)
    prof = fxdisag.profile(captured, 1, SEQ_LEN, torch.float32, fused_attention=False)
    a_priori, _ = runnable_plan(prof, cluster, GLOBAL_BATCH, SEQ_LEN)
    cal = probe(captured, batches[0], prof, cluster, a_priori)
    chosen, _ = runnable_plan(prof, cluster, GLOBAL_BATCH, SEQ_LEN, calibration=cal)
    a = len(chosen.attention_ranks)
    variants = []  # (m, chunks, plan, solver's)
    for m in args.microbatches:
        size = GLOBAL_BATCH // a // m
        p_, c_ = cal.apply(prof, cluster, cal.microbatches_for(size))

        def pinned(chunks):
            return search_plan(p_, c_, GLOBAL_BATCH, seq_len=SEQ_LEN, num_attention=a, num_microbatches=m,
                               microbatch_size=size, pipeline_depth=1, schedule="gpipe", chunks=chunks,
                               baseline=False)

        solved = pinned(True)
        pair = tuple(solved.chunks[0]) if solved.chunks else (1, 1)
        pairs = list(FIXED) + ([pair] if pair not in FIXED else [])
        for c in pairs:
            variants.append({"m": m, "chunks": c, "solver": c == pair, "plan": solved if c == pair else pinned(c)})
    # every rank must run the same variants: the planner's inputs were measured per rank
    names = [None] * world
    dist.all_gather_object(names, [(v["m"], v["chunks"]) for v in variants])
    if any(n != names[0] for n in names):
        raise RuntimeError(f"ranks chose different variants (the measured cluster differs?): {names}")
    for v in variants:
        v["dmodel"] = fxdisag.disaggregate(make_model(cfg), example, v["plan"], trace=True)
        v["times"], v["losses"] = [], []

    def record(k: int, seconds: float, loss: float) -> None:
        variants[k]["times"].append(seconds)
        variants[k]["losses"].append(loss)

    round_robin([v["dmodel"] for v in variants], batches, args.warmup, args.steps, record)
    pngs = []
    rate = os.environ.get("FXDISAG_THROTTLE", "unlimited")
    for v in variants:
        if v["chunks"] == (1, 1) or v["solver"]:
            stem = Path(args.out) / f"timeline_{world}r_m{v['m']}_c{v['chunks'][0]}x{v['chunks'][1]}"
            png = str(stem) + ".png" if has_matplotlib() else None
            v["dmodel"].write_timeline(
                trace_json=str(stem) + ".json", png=png,
                title=f"{world} ranks, m={v['m']}, chunks {v['chunks'][0]} x {v['chunks'][1]}, {rate}: "
                      f"step {statistics.median(v['times']):.3f} s (median)")
            if png:
                pngs.append(png)
    if rank == 0:
        Path(args.out, f"chunks_{world}r.json").write_text(json.dumps({
            "world": world, "rate": rate, "split": f"{a}A+{world - a}E", "steps": args.steps,
            "cluster": cluster.describe(), "calibration": cal.describe(),
            "expert_action_overhead": cal.experts.overhead, "latency": cluster.inter_node_latency,
            "timelines": pngs,
            "variants": [{"m": v["m"], "chunks": list(v["chunks"]), "solver": v["solver"],
                          "median_step_s": statistics.median(v["times"]), "times": v["times"],
                          "predicted_s": v["plan"].step_time, "losses": v["losses"]} for v in variants]},
            indent=1))
    dist.barrier()
    dist.destroy_process_group()


def report(result: dict) -> list[str]:
    lines = [f"{result['world']} ranks ({result['split']}), link {result['rate']}, {result['steps']} steps (median); "
             f"expert action overhead (chunk's fixed part) {result['expert_action_overhead'] * 1e3:.2f} ms, "
             f"link latency {result['latency'] * 1e6:.0f} us",
             f"{'m':>3} {'chunks':>8} {'step ms':>9} {'vs 1x1':>7} {'pred ms':>9} {'err':>6}  solver"]
    base = {v["m"]: v["median_step_s"] for v in result["variants"] if v["chunks"] == [1, 1]}
    for v in result["variants"]:
        err = v["predicted_s"] / v["median_step_s"] - 1
        lines.append(f"{v['m']:>3} {v['chunks'][0]:>3} x {v['chunks'][1]:<2} {v['median_step_s'] * 1e3:>9.1f} "
                     f"{base[v['m']] / v['median_step_s']:>6.2f}x {v['predicted_s'] * 1e3:>9.1f} {err:>+6.0%}  "
                     f"{'<- solver' if v['solver'] else ''}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--microbatches", default="1,4")
    ap.add_argument("--rate", default="400mbit", help="emulated link rate (FXDISAG_THROTTLE), or 'unlimited'")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out_chunks"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.microbatches = [int(m) for m in str(args.microbatches).split(",")]
    if args.worker:
        worker(args)
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, ".gitignore").write_text("*\n")  # outputs stay out of the repo
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
    if args.rate != "unlimited":
        env["FXDISAG_THROTTLE"] = args.rate
    ok = True
    for world in (int(r) for r in args.ranks.split(",")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(29600 + world), str(Path(__file__).resolve()), "--worker", "--microbatches",
               ",".join(map(str, args.microbatches)), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--out", args.out]
        print(f"running {world} ranks ...", flush=True)
        subprocess.run(cmd, env=env, check=True, timeout=1800)
        result = json.loads(Path(args.out, f"chunks_{world}r.json").read_text())
        print("\n".join(report(result)))
        losses = [v["losses"] for v in result["variants"]]
        same = all(abs(x - y) <= 1e-5 for other in losses[1:] for x, y in zip(losses[0], other))
        ok &= same
        print(f"losses agree across variants (<= 1e-5): {same}")
        sheet = stack_pngs(result["timelines"], HERE / f"timelines_chunks_{world}r_{args.rate}.png")
        if sheet:
            print(f"timelines (1 x 1 and the solver's, per m), one above the other: {sheet}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
