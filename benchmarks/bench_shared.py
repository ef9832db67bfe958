"""Shared experts on the attention group, on one expert rank or a copy on every expert rank:
measured step time of the three placements against the cost model's predictions and its
choice (issue #14).

What it guarantees: every step time is measured in this run; every prediction is the cost
model's (``fxdisag.planner.search.plan(shared_experts=...)``) on the profile of the model
and the cluster measured on the same ranks, calibrated by a real profiling step
(``fxdisag.planner.calibrate.probe``). One ``torchrun`` job per rank count, on a
Qwen2-MoE model sized like ``bench_afpipe_vs_ep.py``'s (2 decoder layers, hidden 256, 8
experts of width 256, top-2) with a sigmoid-gated shared expert of width ``--shared-width``
(Qwen2-MoE's own ratio: 4 routed widths), global batch 16 x 128 tokens, fp32:

* the split (attention : expert ranks) of each configuration in ``--splits`` (per rank
  count), m = ``--microbatches``;
* per split, the three placements, each its own ``DisaggregatedModel``, timed round-robin
  after a warm-up: ``attention`` (``shared_expert_ranks=[]``), ``expert`` (the rank
  ``search.shared_host_for`` picks: the fewest experts, the last among equals) and
  ``replicated`` (every expert rank, each token's with its first routed expert);
* it reports each one's median step (forward + ``loss.backward()``, slowest rank from a
  barrier), the prediction, the planner's choice (``shared_experts="auto"``) and whether
  the losses agree (they compute the same thing), and the bytes the attention ranks sent.

The link is emulated in-process (``FXDISAG_THROTTLE``, default 400mbit): no root needed.

    python benchmarks/bench_shared.py                       # 2 ranks 1:1, 4 ranks 2:2 and 1:3, 400mbit
    python benchmarks/bench_shared.py --rate 1gbit --steps 3
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

from timing import round_robin  # noqa: E402

SEQ_LEN, GLOBAL_BATCH = 128, 16
SPLITS = {2: ["1:1"], 4: ["2:2", "1:3"]}


def model_config(shared_width: int):
    from fxdisag.testing.models import tiny_config

    cfg = tiny_config("qwen2_moe", num_layers=2)
    for key, value in dict(hidden_size=256, num_attention_heads=4, head_dim=64, num_key_value_heads=2,
                           moe_intermediate_size=256, shared_expert_intermediate_size=shared_width, num_experts=8,
                           num_experts_per_tok=2, vocab_size=128, intermediate_size=512).items():
        setattr(cfg, key, value)
    return cfg


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import fxdisag
    from bench_afpipe_vs_ep import make_model
    from fxdisag.planner import ClusterSpec
    from fxdisag.planner.calibrate import probe
    from fxdisag.planner.search import plan as search_plan
    from fxdisag.testing import throttle
    from fxdisag.testing.models import example_batch

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    throttle.install_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = model_config(args.shared_width)
    batches = [example_batch(cfg, GLOBAL_BATCH, SEQ_LEN, seed=s) for s in range(args.warmup + args.steps)]
    example = example_batch(cfg, 2, SEQ_LEN, seed=1)
    cluster = ClusterSpec.measure()
    captured = fxdisag.capture(make_model(cfg), example)
    prof = fxdisag.profile(captured, 1, SEQ_LEN, torch.float32, fused_attention=False)
    m = args.microbatches
    variants = []
    info = []
    for split in SPLITS[world]:
        a = int(split.split(":")[0])
        size = GLOBAL_BATCH // a // m

        def pinned(where, p_=prof, c_=cluster):
            return search_plan(p_, c_, GLOBAL_BATCH, seq_len=SEQ_LEN, num_attention=a, num_microbatches=m,
                               microbatch_size=size, pipeline_depth=1, schedule="gpipe", shared_experts=where,
                               baseline=False)

        # the profiling step of this split's plan, as plan="auto" calibrates (collective)
        cal = probe(captured, batches[0], prof, cluster, pinned("attention"))
        p_, c_ = cal.apply(prof, cluster, cal.microbatches_for(size))
        auto = pinned("auto", p_, c_)
        for where in ("attention", "expert", "replicated"):
            variants.append({"split": split, "where": where, "plan": pinned(where, p_, c_)})
        chosen = auto.shared_expert_ranks
        info.append({"split": split, "auto": "attention" if not chosen else "expert" if len(chosen) == 1
                     else "replicated",
                     "note": next((n for n in auto.notes if n.startswith("shared experts:")), ""),
                     "calibration": cal.describe()})
    for v in variants:
        v["dmodel"] = fxdisag.disaggregate(make_model(cfg), example, v["plan"], trace=True)
        v["times"], v["losses"], v["sent"] = [], [], []

    def record(k: int, seconds: float, loss: float) -> None:
        v = variants[k]
        v["times"].append(seconds)
        v["losses"].append(loss)
        v["sent"].append(sum(v["dmodel"].step_sent_bytes().values()))

    round_robin([v["dmodel"] for v in variants], batches, args.warmup, args.steps, record)
    sent = []
    for v in variants:
        mine = statistics.median(v["sent"]) if v["dmodel"].has_attention else 0.0
        every = [None] * world
        dist.all_gather_object(every, mine)
        sent.append(sum(every))
    if rank == 0:
        Path(args.out, f"shared_{world}r.json").write_text(json.dumps({
            "world": world, "rate": os.environ.get("FXDISAG_THROTTLE", "unlimited"), "steps": args.steps, "m": m,
            "cluster": cluster.describe(), "splits": info, "shared_width": args.shared_width,
            "variants": [{"split": v["split"], "where": v["where"], "hosts": v["plan"].shared_expert_ranks,
                          "median_step_s": statistics.median(v["times"]), "times": v["times"],
                          "predicted_s": v["plan"].step_time, "losses": v["losses"], "attention_sent": s_}
                         for v, s_ in zip(variants, sent)]}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def report(result: dict) -> list[str]:
    lines = [f"{result['world']} ranks, link {result['rate']}, m={result['m']}, {result['steps']} steps (median), "
             f"shared expert width {result['shared_width']}",
             f"{'split A:E':>9} {'shared on':>10} {'step ms':>9} {'pred ms':>9} {'err':>6} {'attn sent MB':>13}"]
    for v in result["variants"]:
        where = v["where"] + (f" {v['hosts'][0]}" if v["where"] == "expert" else "")
        err = v["predicted_s"] / v["median_step_s"] - 1
        lines.append(f"{v['split']:>9} {where:>10} {v['median_step_s'] * 1e3:>9.1f} {v['predicted_s'] * 1e3:>9.1f} "
                     f"{err:>+6.0%} {v['attention_sent'] / 1e6:>13.2f}")
    for s in result["splits"]:
        measured = {v["where"]: v["median_step_s"] for v in result["variants"] if v["split"] == s["split"]}
        best = min(measured, key=measured.get)
        lines.append(f"  {s['split']}: planner chose {s['auto']}, measured fastest: {best} (vs attention: expert "
                     f"{measured['attention'] / measured['expert']:.2f}x, replicated "
                     f"{measured['attention'] / measured['replicated']:.2f}x)")
        lines.append(f"    {s['note']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--shared-width", type=int, default=1024)
    ap.add_argument("--rate", default="400mbit", help="emulated link rate (FXDISAG_THROTTLE), or 'unlimited'")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "out_shared"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
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
               str(29620 + world), str(Path(__file__).resolve()), "--worker", "--microbatches",
               str(args.microbatches), "--shared-width", str(args.shared_width), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--out", args.out]
        print(f"running {world} ranks ...", flush=True)
        subprocess.run(cmd, env=env, check=True, timeout=1800)
        result = json.loads(Path(args.out, f"shared_{world}r.json").read_text())
        print("\n".join(report(result)))
        for split in {v["split"] for v in result["variants"]}:
            a, *others = (v["losses"] for v in result["variants"] if v["split"] == split)
            same = all(abs(x - y) <= 1e-5 for b in others for x, y in zip(a, b))
            ok &= same
            print(f"{split}: losses agree across placements (<= 1e-5): {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
