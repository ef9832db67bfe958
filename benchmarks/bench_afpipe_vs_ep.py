"""AF-pipe against the baselines users run, on an emulated bandwidth-limited cluster, in one run.

What it guarantees: every number it prints or writes was measured (or predicted from
measurements) in this run. For each (ranks, link rate) it starts one job whose ranks
build *every* variant -- AF-pipe at the planner's split and micro-batch count m, AF-pipe
at the same split with m in {1, 2, 4}, EP with m in {1, 2, 4}, overlapped EP with m in
{2, 4} (``Plan.expert_parallel(overlap=True)``), DDP and FSDP2 on the whole HF model
(``benchmarks/peers.py``) -- on the same model, weights and global batch, warm each up,
then time them interleaved (the order rotates every round), so load from other
processes hits all modes alike. ``--repeats`` runs the whole sweep again (default 3)
and reports the spread of the speedups across repeats.

Step = forward + ``loss.backward()`` (which runs the pipeline's backward half and the
end-of-step gradient all-reduce). The optimizer step is *excluded* (gradients are reset
between steps, outside the timed region). Time of a step = the slowest rank's wall time
from a barrier to the end of its backward; the median of ``--steps`` steps is reported.

Per variant it also reports
* bytes crossing each NIC per step (counted at the runtime's mailbox, plus the ring
  gradient all-reduce), and the roofline lower bound = slowest of attention compute,
  expert compute (from the step's compute spans) and busiest NIC direction at the
  measured link bandwidth; efficiency = bound / median step;
* the partitioner's predicted step, a priori (profile FLOPs at the measured matmul rate
  and link bandwidth, ``ClusterSpec.measure()`` on the same ranks), *profiled* (the
  compute terms fitted to a real profiling step before any variant runs,
  ``fxdisag.planner.calibrate.probe``, as ``plan="auto"`` does: the planner's choice is
  made with these) and stage-calibrated after the fact (compute measured in the same run;
  see ``afpipe_analysis.py``), with relative errors; the accuracy table counts the
  configurations whose profiled prediction is within 10% in every repeat, and whether
  the planner chose the same in every repeat;
* a Chrome trace and a PNG timeline of the median step of the AF-pipe planner variant
  and of the fastest variant of every other mode, under ``--out``.

Emulation (``--emulation``):
* ``netns`` (default; needs root: CAP_NET_ADMIN + CAP_SYS_ADMIN): one network namespace
  per rank, veths into a bridge, ``tc tbf`` at the rate on both ends (benchmarks/netns.py);
* ``throttle``: ``torchrun`` on loopback with ``FXDISAG_THROTTLE=<rate>``, the
  in-process link throttle (paces point-to-point sends only: the gradient all-reduce is
  not throttled, and receiver-side contention is not modelled).
Without root, ``netns`` stops and says to use ``--emulation throttle``: no silent fallback.

Usage::

    sudo python benchmarks/bench_afpipe_vs_ep.py --ranks 2,4 --rates 400mbit,1gbit   # the issue's run (~15 min), writes RESULTS.md
    python benchmarks/bench_afpipe_vs_ep.py --emulation throttle  # without root
    python benchmarks/bench_afpipe_vs_ep.py --ranks 2 --rates 400mbit --steps 3 --repeats 1 --no-results   # quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

# The benchmark model: Qwen3-MoE from tiny_config, resized so that a step takes ~0.5-1.5 s
# on this machine and the routed rows' traffic matters at 400 Mbit (see MODEL_NOTE).
MODEL = dict(family="qwen3_moe", num_layers=2, hidden_size=256, num_attention_heads=4, head_dim=64,
             num_key_value_heads=2, moe_intermediate_size=256, num_experts=8, num_experts_per_tok=2,
             vocab_size=128)
SEQ_LEN = 128
GLOBAL_BATCH = 16  # sequences per step: splits evenly over 1, 2, 4 attention ranks x m in {1, 2, 4}
SWEEP_M = (1, 2, 4)
PEERS = ("ddp", "fsdp2")  # what a user of the HF model runs without fxdisag (benchmarks/peers.py)
BASELINES = ("ep", "ep-overlap") + PEERS
MODEL_NOTE = (
    "Qwen3-MoE (`tiny_config('qwen3_moe')` resized): 2 decoder layers, hidden 256, 4 heads x 64 "
    "(2 KV heads), 8 experts of width 256, top-2, vocab 128; 3.6M parameters (3.1M in experts); "
    f"sequence {SEQ_LEN}, global batch {GLOBAL_BATCH} sequences ({GLOBAL_BATCH * SEQ_LEN} tokens), fp32, "
    "one torch thread per rank. Why: per token and MoE layer the expert side costs about as many "
    "FLOPs as the attention side (2 x 3 x 256 x 256 x top-2 vs 4 x 256 x 256 projections + "
    "attention), and a token's routed rows cross the link as 2 x 256 x 4 B per direction and "
    "layer, so at 400 Mbit the transfers take about as long as either compute: the regime "
    "AF-pipe is built for. Small vocab: the LM head would otherwise dominate the attention side."
)


# ---------------------------------------------------------------------------- worker


def model_config():
    from fxdisag.testing.models import tiny_config

    cfg = tiny_config(MODEL["family"], num_layers=MODEL["num_layers"])
    for key, value in MODEL.items():
        if key not in ("family", "num_layers"):
            setattr(cfg, key, value)
    return cfg


def make_model(cfg, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    return model


@dataclasses.dataclass
class Variant:
    """One configuration timed in the run."""

    name: str  # e.g. "afpipe 1A+1E m=4 (planner)"
    mode: str  # "afpipe" | "ep" | "ep-overlap" | "ddp" | "fsdp2" (MODES)
    m: int
    attention_ranks: list[int]
    expert_ranks: list[int]
    plan: Any
    planner: bool = False  # the planner's own choice of split and m
    dmodel: Any = None
    times: list[float] = dataclasses.field(default_factory=list)
    records: list[dict] = dataclasses.field(default_factory=list)  # per measured step (rank 0)
    losses: list[float] = dataclasses.field(default_factory=list)


def choose_plan(prof, cluster, global_batch: int, world: int, cal=None) -> tuple[Any, Any, list[str]]:
    """The planner's choice among plans this runtime runs (what ``plan="auto"`` picks).

    Returns (chosen plan, the unrestricted planner's plan, notes on rejected (A, m)).
    """
    import fxdisag
    from fxdisag.planner.auto import runnable_plan

    # unrestricted (any m, accumulation rounds): the profiling step's least-squares fit
    free = fxdisag.plan(*(cal.apply(prof, cluster) if cal else (prof, cluster)), global_batch, seq_len=SEQ_LEN)
    chosen, notes = runnable_plan(prof, cluster, global_batch, SEQ_LEN, calibration=cal)
    return chosen, free, notes


def build_variants(prof, cluster, world: int, cal=None) -> tuple[list[Variant], dict]:
    import fxdisag
    from fxdisag.planner.plan import Plan

    chosen, free, notes = choose_plan(prof, cluster, GLOBAL_BATCH, world, cal)
    A = len(chosen.attention_ranks)
    per_attention = GLOBAL_BATCH // A
    af = [Variant(f"afpipe {A}A+{world - A}E m={chosen.num_microbatches}", "afpipe", chosen.num_microbatches,
                  chosen.attention_ranks, chosen.expert_ranks, chosen, planner=True)]
    for m in SWEEP_M:
        if m == chosen.num_microbatches or per_attention % m:
            continue
        p = fxdisag.plan(prof, cluster, GLOBAL_BATCH, seq_len=SEQ_LEN, num_attention=A,
                         num_microbatches=m, microbatch_size=per_attention // m)
        af.append(Variant(f"afpipe {A}A+{world - A}E m={m}", "afpipe", m, p.attention_ranks, p.expert_ranks, p))
    ranks = list(range(world))
    ep = [Variant(f"ep {world} ranks m={m}", "ep", m, ranks, ranks, Plan.expert_parallel(world, MODEL["num_experts"], m))
          for m in SWEEP_M if (GLOBAL_BATCH // world) % m == 0]
    ep_overlap = [Variant(f"ep-overlap {world} ranks m={m}", "ep-overlap", m, ranks, ranks,
                          Plan.expert_parallel(world, MODEL["num_experts"], m, overlap=True))
                  for m in SWEEP_M if m % 2 == 0 and (GLOBAL_BATCH // world) % m == 0]
    peers = [Variant(kind, kind, 1, ranks, ranks, None) for kind in PEERS]
    variants = []
    for i in range(max(len(af), len(ep), len(ep_overlap), len(peers))):  # interleave the modes
        variants += af[i : i + 1] + ep[i : i + 1] + ep_overlap[i : i + 1] + peers[i : i + 1]
    info = {
        "planner_free": {"attention": len(free.attention_ranks), "experts": len(free.expert_ranks),
                         "m": free.num_microbatches, "microbatch_size": free.microbatch_size,
                         "rounds": free.grad_accumulation, "step": free.step_time},
        "planner_notes": notes,
        "plan_text": str(chosen),
    }
    return variants, info


def timed_step(v: Variant, batch, rank: int, record: bool) -> None:
    import torch
    import torch.distributed as dist

    for p in v.dmodel.parameters():
        p.grad = None
    dist.barrier()
    t0 = time.perf_counter()
    out = v.dmodel(**batch)
    out.loss.backward()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    if not record:
        return
    v.times.append(elapsed.item())
    v.losses.append(float(out.loss.detach()))
    spans = v.dmodel.step_spans()  # collective
    sent: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(sent, {(rank, peer): n for peer, n in v.dmodel.step_sent_bytes().items() if peer != rank})
    if rank == 0:
        merged = {k: n for d in sent for k, n in d.items()}
        v.records.append({"seconds": elapsed.item(), "spans": spans, "sent": merged})


def run_worker(out_json: str, out_dir: str, steps: int, warmup: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    import fxdisag
    import peers as peer_models
    from fxdisag.testing.models import example_batch
    from fxdisag.planner import ClusterSpec
    from fxdisag.planner.workload import Workload
    from fxdisag.testing import throttle

    rank, world = dist.get_rank(), dist.get_world_size()
    throttle.install_from_env()  # --emulation throttle: before the link measurement below
    t_start = time.perf_counter()
    cfg = model_config()
    batch = example_batch(cfg, GLOBAL_BATCH, SEQ_LEN, seed=0)
    example = example_batch(cfg, 2, SEQ_LEN, seed=1)
    # Online profiling on these ranks: matmul FLOP/s, copy bandwidth, ring link bandwidth/latency.
    cluster = ClusterSpec.measure()
    captured = fxdisag.capture(make_model(cfg), example)
    prof = fxdisag.profile(captured, 1, SEQ_LEN, torch.float32, fused_attention=False)
    # What plan="auto" does: the a priori choice's split runs a real profiling step, and the
    # planner chooses again with the calibrated compute terms (fxdisag.planner.calibrate).
    from fxdisag.planner.auto import runnable_plan
    from fxdisag.planner.calibrate import probe

    a_priori, _ = runnable_plan(prof, cluster, GLOBAL_BATCH, SEQ_LEN)
    cal = probe(captured, batch, prof, cluster, a_priori)
    variants, info = build_variants(prof, cluster, world, cal)
    info["a_priori_choice"] = {"attention": len(a_priori.attention_ranks), "m": a_priori.num_microbatches,
                               "step": a_priori.step_time}
    info["calibration"] = {"attention_overhead": cal.attention.overhead, "attention_k": cal.attention.k,
                           "experts_overhead": cal.experts.overhead, "experts_k": cal.experts.k,
                           "microbatches": list(cal.microbatches), "seconds": cal.seconds, "plan": cal.plan,
                           # per side, rank -> per probe (compute actions, modelled s, compute s, busy s)
                           "points": {"attention": cal.attention.points, "experts": cal.experts.points}}
    names: list[Any] = [None] * world
    dist.all_gather_object(names, [v.name for v in variants])
    if any(n != names[0] for n in names):
        raise RuntimeError(f"ranks chose different variants (the measured cluster differs?): {names}")
    for v in variants:
        if v.mode in PEERS:
            v.dmodel = peer_models.build_peer(v.mode, make_model(cfg))
        else:
            v.dmodel = fxdisag.disaggregate(make_model(cfg), example, v.plan, trace=True)
    for v in variants:
        for _ in range(warmup):
            timed_step(v, batch, rank, record=False)
    for rep in range(steps):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            timed_step(v, batch, rank, record=True)
    # the peers' roofline: the whole model's forward + backward on one rank's shard, no communication
    peer_compute = peer_models.shard_compute_seconds(make_model(cfg), batch)
    # parameter bytes the REDUCE all-reduces among attention ranks (same on every attention rank)
    attn_bytes = {}
    for v in variants:
        attn_bytes[v.name] = sum(p.numel() * p.element_size() for p in v.dmodel.attention_parameters())
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, attn_bytes)
    if rank == 0:
        attention_bytes = {v.name: max(g[v.name] for g in gathered) for v in variants}
        work = Workload.from_profile(prof, SEQ_LEN)
        def profiled(seqs_per_mb: float):  # the profiling step's fit around this micro-batch size
            p_, c_ = cal.apply(prof, cluster, cal.microbatches_for(seqs_per_mb))
            return Workload.from_profile(p_, SEQ_LEN), c_

        result = summarise(variants, cluster, work, attention_bytes, world, out_dir, profiled, peer_compute)
        result.update(info)
        result["cluster"] = cluster.to_dict()
        result["emulation"] = os.environ.get("FXDISAG_EMULATION", "none")
        result["worker_seconds"] = time.perf_counter() - t_start
        Path(out_json).write_text(json.dumps(result, indent=1, default=str))
    dist.barrier()
    dist.destroy_process_group()


def summarise(variants: list[Variant], cluster, work, attention_bytes: dict, world: int, out_dir: str,
              profiled, peer_compute: float) -> dict:
    """Per variant: measured step, bytes, bound, and three predictions: a priori (``work`` on
    the measured ``cluster``), profiled (``profiled(seqs per micro-batch)`` = the (work,
    cluster) the profiling step's fit gives there, what the planner chose with) and
    calibrated after the fact."""
    import peers as peer_models
    from afpipe_analysis import compute_busy, layout_of, nic_bytes, predict_afpipe, predict_ep, roofline_bound

    from fxdisag.runtime.timeline import chrome_trace, gantt_png

    bandwidth = cluster.nic_bandwidth
    rows = []
    best = {mode: min((v for v in variants if v.mode == mode), key=lambda v: statistics.median(v.times))
            for mode in ("afpipe",) + BASELINES if any(v.mode == mode for v in variants)}
    for v in variants:
        median = statistics.median(v.times)
        ranks = sorted(set(v.attention_ranks) | set(v.expert_ranks))
        colocated = v.mode != "afpipe"
        per_step = []
        for rec in v.records:
            busy = compute_busy(rec["spans"], ranks)
            egress, ingress = nic_bytes(rec["sent"], ranks, [(v.attention_ranks, attention_bytes[v.name])])
            bound = (peer_models.roofline(peer_compute, rec["sent"], ranks, bandwidth) if v.mode in PEERS
                     else roofline_bound(busy, egress, ingress, bandwidth, colocated=colocated))
            per_step.append((rec, busy, egress, ingress, bound))
        # the step whose time is the median (upper median for an even count) stands for the variant
        rec, busy, egress, ingress, bound = sorted(per_step, key=lambda x: x[0]["seconds"])[len(per_step) // 2]
        attention = statistics.median(b.attention for *_, b in per_step)
        experts = statistics.median(b.experts for *_, b in per_step)
        if v.mode in ("ep", "ep-overlap"):
            work_p, cluster_p = profiled(GLOBAL_BATCH // world / v.m)
            pred = predict_ep(work, cluster, world, GLOBAL_BATCH // world, v.m, attention, experts,
                              overlap=v.mode == "ep-overlap")
            pred_profiled = predict_ep(work_p, cluster_p, world, GLOBAL_BATCH // world, v.m,
                                       overlap=v.mode == "ep-overlap").a_priori
        elif v.mode == "afpipe":
            layout = layout_of(v.plan, cluster, work.num_experts)
            seqs = GLOBAL_BATCH // len(v.attention_ranks) // v.m
            work_p, cluster_p = profiled(seqs)
            pred = predict_afpipe(work, cluster, layout, seqs, v.m, attention, experts)
            pred_profiled = predict_afpipe(work_p, cluster_p, layout, seqs, v.m).a_priori
        else:  # the peers are not modelled by the planner
            pred = pred_profiled = None
        bounds = [b.bound for *_, b in per_step]
        row = {
            "name": v.name, "mode": v.mode, "m": v.m, "planner": v.planner,
            "attention_ranks": v.attention_ranks, "expert_ranks": v.expert_ranks,
            "times": v.times, "median": median, "min": min(v.times), "max": max(v.times),
            "loss": v.losses[0], "loss_spread": max(v.losses) - min(v.losses),
            "bound": statistics.median(bounds), "limiter": bound.limiter,
            "attention_compute": attention, "expert_compute": experts,
            "compute_per_rank": statistics.median(b.compute_per_rank for *_, b in per_step),
            "transfer": statistics.median(b.transfer for *_, b in per_step),
            # peers: compute = the whole model on one shard without communication (peers.roofline)
            "efficiency": statistics.median(bounds) / median,
            "max_egress": max(egress.values()), "max_ingress": max(ingress.values()),
            "egress": egress, "ingress": ingress, "sent": {f"{a}->{b}": n for (a, b), n in rec["sent"].items()},
            "busy": busy, "allreduce_bytes": attention_bytes[v.name],
            "pred_a_priori": pred and pred.a_priori, "pred_calibrated": pred and pred.calibrated,
            "pred_profiled": pred_profiled,
            "k_attention": pred and pred.k_attention, "k_experts": pred and pred.k_experts,
        }
        for kind in ("a_priori", "profiled", "calibrated"):
            p = row[f"pred_{kind}"]
            row[f"err_{kind}"] = None if p is None else (p - median) / median
        if v.planner or (v.mode != "afpipe" and v is best.get(v.mode)):
            stem = f"{v.mode}_{world}r_{_rate_tag()}"
            chrome_trace(rec["spans"], os.path.join(out_dir, stem + ".json"))
            title = (f"{v.name}, {os.environ.get('FXDISAG_EMULATION', 'no emulation')}: "
                     f"median step {rec['seconds']:.3f} s")
            gantt_png(rec["spans"], os.path.join(out_dir, stem + ".png"), title=title)
            row["timeline"] = stem
        rows.append(row)
    af_plan = next(r for r in rows if r["planner"])
    speedups = {mode: statistics.median(best[mode].times) / af_plan["median"] for mode in BASELINES if mode in best}
    return {"world": world, "variants": rows, "speedup": speedups["ep"], "speedups": speedups,
            "best": {mode: v.name for mode, v in best.items()},
            "afpipe_best": best["afpipe"].name}


def _rate_tag() -> str:
    m = re.search(r"rate=(\S+)", os.environ.get("FXDISAG_EMULATION", ""))
    return m.group(1) if m else "unlimited"


# ---------------------------------------------------------------------------- driver


def launch(emulation: str, world: int, rate: str, steps: int, warmup: int, out_dir: Path, timeout: float) -> dict:
    out_json = out_dir / f"result_{world}r_{rate}.json"
    out_json.unlink(missing_ok=True)
    worker = [str(Path(__file__).resolve()), "--worker", "--out-json", str(out_json), "--out", str(out_dir),
              "--steps", str(steps), "--warmup", str(warmup)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
    env.pop("FXDISAG_THROTTLE", None)
    if emulation == "netns":
        import netns

        os.environ.update(OMP_NUM_THREADS="1", PYTHONPATH=env["PYTHONPATH"])
        os.environ.pop("FXDISAG_THROTTLE", None)
        code = netns.run_in_namespaces(worker, nproc=world, rate=rate, timeout=timeout)
    else:
        env.update(GLOO_SOCKET_IFNAME="lo", FXDISAG_EMULATION=f"throttle rate={rate}")
        if rate != "unlimited":
            env["FXDISAG_THROTTLE"] = rate
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *worker]
        try:
            code = subprocess.run(cmd, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    if code != 0 or not out_json.exists():
        raise RuntimeError(f"bench_afpipe_vs_ep: {emulation} ranks={world} rate={rate} failed (exit {code}); "
                           "see the ranks' output above")
    return json.loads(out_json.read_text())


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.0f}%"


def _mb(x: float) -> str:
    return f"{x / 1e6:.1f}"


def _cfg(r: dict) -> str:
    n = len(r["attention_ranks"])
    if r["mode"] == "ep":
        return f"EP {n} ranks, m={r['m']}"
    if r["mode"] == "ep-overlap":
        return f"EP overlapped {n} ranks, m={r['m']}"
    if r["mode"] in PEERS:
        return {"ddp": "DDP", "fsdp2": "FSDP2"}[r["mode"]] + f" {n} ranks"
    return f"{n}A+{len(r['expert_ranks'])}E, m={r['m']}" + (" (planner)" if r["planner"] else "")


def _best(run: dict, mode: str) -> dict | None:
    name = run["best"].get(mode)
    return None if name is None else next(r for r in run["variants"] if r["name"] == name)


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def render(repeats: list[list[dict]], meta: dict) -> str:
    """The generated part of RESULTS.md (``repeats``: the whole sweep, run several times)."""
    runs = repeats[-1]
    lines = [
        f"Run {meta['date']} on {meta['machine']}; emulation: **{meta['emulation']}**; "
        f"total {meta['minutes']:.1f} min for {len(repeats)} repeat(s) of the sweep; load average before/after: "
        f"{meta['load_before']} / {meta['load_after']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Model: {MODEL_NOTE}",
        "",
        "Step = forward + `loss.backward()` (pipeline backward and gradient all-reduce included), optimizer "
        f"step excluded. Median of {meta['steps']} steps after {meta['warmup']} warm-up steps per variant, "
        "all variants of a row timed interleaved in one job. speedup = baseline step / AF-pipe step "
        "(> 1: AF-pipe faster). AF-pipe = the planner's choice (split and m) on the measured cluster; "
        "EP = the fastest m in {1, 2, 4}; EP overlapped = the fastest m in {2, 4} (micro-batch pairs, each one's "
        "all-to-all behind the other's compute); DDP and FSDP2 = the whole HF model on every rank "
        "(`benchmarks/peers.py`).",
        "",
        "### Headline: AF-pipe (planner's choice) against each baseline",
        "",
        "| repeat | ranks | link | AF-pipe config | AF-pipe ms | EP ms | EP overlapped ms | DDP ms | FSDP2 ms "
        "| speedup vs EP / EP overlapped / DDP / FSDP2 | AF-pipe eff |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, sweep in enumerate(repeats):
        for run in sweep:
            af = next(r for r in run["variants"] if r["planner"])
            cells = []
            for mode in BASELINES:
                b = _best(run, mode)
                cells.append("-" if b is None else f"{_ms(b['median'])} (m={b['m']})" if mode.startswith("ep")
                             else _ms(b["median"]))
            sp = " / ".join(f"{run['speedups'][m]:.2f}x" if m in run["speedups"] else "-" for m in BASELINES)
            lines.append(f"| {k + 1} | {run['world']} | {run['rate']} | {_cfg(af)} | {_ms(af['median'])} | "
                         + " | ".join(cells) + f" | **{sp}** | {af['efficiency']:.2f} |")
    if len(repeats) > 1:
        lines += ["", "Spread across repeats (min-max of each repeat's median-based speedup):", "",
                  "| ranks | link | vs EP | vs EP overlapped | vs DDP | vs FSDP2 | AF-pipe step ms |",
                  "|---|---|---|---|---|---|---|"]
        for i, run in enumerate(runs):
            same = [sweep[i] for sweep in repeats]
            cells = [_spread([r["speedups"][m] for r in same if m in r["speedups"]]) for m in BASELINES]
            steps = [next(v for v in r["variants"] if v["planner"])["median"] * 1e3 for r in same]
            lines.append(f"| {run['world']} | {run['rate']} | " + " | ".join(cells)
                         + f" | {min(steps):.0f}-{max(steps):.0f} |")
    lines += _targets(repeats)
    lines += _accuracy(repeats)
    lines += [
        "",
        f"### Every variant (repeat {len(repeats)}): step, cost model, roofline",
        "",
        "pred = the partitioner's predicted step: *a priori* (profile FLOPs at the measured matmul rate, measured "
        "link bandwidth and latency), *profiled* (what the planner chose with: the compute terms fitted to a real "
        "profiling step of the a priori choice's split before any variant ran, `fxdisag.planner.calibrate`) and "
        "*calibrated* after the fact (compute scaled to this run's measured compute, so only the "
        "pipeline/transfer composition is modelled); err = (pred - measured) / measured; the peers are not "
        "modelled. bound = slowest of attention compute, expert compute (colocated modes: all compute of one "
        "rank; peers: the whole model's forward + backward on one rank's shard, timed alone, "
        "`peers.shard_compute_seconds`) and busiest NIC direction (bytes / measured bandwidth); eff = bound / "
        "step. NIC MB = busiest rank's egress / ingress per step (routed rows + gradient all-reduce; peers: the "
        "bytes of the collectives they issue, as gloo runs them, `benchmarks/peers.py`).",
        "",
        "| ranks | link | variant | step ms | pred a priori ms (err) | pred profiled ms (err) | pred calibrated ms "
        "(err) | attn / expert compute ms | transfer ms | NIC MB out / in | bound ms (limiter) | eff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for r in run["variants"]:
            lines.append(
                f"| {run['world']} | {run['rate']} | {_cfg(r)} | {_ms(r['median'])} | {_ms(r['pred_a_priori'])} "
                f"({_pct(r['err_a_priori'])}) | {_ms(r['pred_profiled'])} ({_pct(r['err_profiled'])}) | "
                f"{_ms(r['pred_calibrated'])} ({_pct(r['err_calibrated'])}) | "
                f"{_ms(r['attention_compute'])} / {_ms(r['expert_compute'])} | {_ms(r['transfer'])} | "
                f"{_mb(r['max_egress'])} / {_mb(r['max_ingress'])} | {_ms(r['bound'])} ({r['limiter']}) | "
                f"{'-' if r['efficiency'] is None else format(r['efficiency'], '.2f')} |")
    lines += [
        "",
        "### Calibration (ClusterSpec.measure() and the profiling step on the same ranks, per job)",
        "",
        "Profiling step: the a priori choice's split, run for real at m = 1, one m between and the most the batch "
        "allows; per side compute spans = n x overhead + k x the model's compute (least squares, shown here; each "
        "prediction uses the line through the two probes around its m: `fxdisag/planner/calibrate.py`).",
        "",
        "| ranks | link | matmul GFLOP/s per rank | link GB/s (configured) | latency us | profiling step: attention "
        "ms/action, k; experts ms/action, k (s) | a priori -> profiled choice | planner unrestricted "
        "| loss (all variants and steps) | job s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        c = run["cluster"]
        flops = next(iter(c["peak_flops"].values()))
        free = run["planner_free"]
        losses = [r["loss"] for r in run["variants"]]
        # same model, batch and weights in every variant: the losses agree to float rounding
        spread = max(max(losses) - min(losses), max(r["loss_spread"] for r in run["variants"]))
        equal = f"spread {spread:.1e}" + ("" if spread < 1e-4 else " MISMATCH")
        lines.append(
            f"| {run['world']} | {run['rate']} | {flops / 1e9:.1f} | {c['nic_bandwidth'] / 1e9:.3f} "
            f"({_configured(run['rate'])}) | {c['inter_node_latency'] * 1e6:.0f} | {_calibration(run)} | "
            f"{_choices(run)} | {free['attention']}A+"
            f"{free['experts']}E m={free['m']} x {free['microbatch_size']} seq, {free['rounds']} round(s), "
            f"pred {_ms(free['step'])} ms | {losses[0]:.4f} ({equal}) | {run['worker_seconds']:.0f} |")
    notes = sorted({n for run in runs for n in run["planner_notes"]})
    if notes:
        lines += ["", "Planner splits not run: " + "; ".join(notes) + "."]
    lines += ["", "Timelines (median step, last repeat; `benchmarks/out/`): "
              + ", ".join(f"`{r['timeline']}.png/.json`" for run in runs for r in run["variants"] if "timeline" in r)]
    return "\n".join(lines)


def _calibration(run: dict) -> str:
    c = run.get("calibration")
    if not c:
        return "-"
    return (f"{c['attention_overhead'] * 1e3:.2f}, {c['attention_k']:.2f}; {c['experts_overhead'] * 1e3:.2f}, "
            f"{c['experts_k']:.2f} ({c['seconds']:.1f} s)")


def _choices(run: dict) -> str:
    a = run.get("a_priori_choice")
    af = next(r for r in run["variants"] if r["planner"])
    return ("-" if not a else f"{a['attention']}A m={a['m']}") + f" -> {len(af['attention_ranks'])}A m={af['m']}"


def _accuracy(repeats: list[list[dict]]) -> list[str]:
    """The cost model against measured steps (profiled predictions, every AF-pipe and EP
    configuration of every job and repeat), and the planner's choice across repeats."""
    cells = [(k, run, r) for k, sweep in enumerate(repeats) for run in sweep for r in run["variants"]
             if r.get("err_profiled") is not None]
    if not cells:
        return []
    configs: dict = {}
    for k, run, r in cells:
        configs.setdefault((run["world"], run["rate"], _cfg(r).replace(" (planner)", "")), []).append(r["err_profiled"])
    within = [key for key, errs in configs.items() if all(abs(e) <= 0.10 for e in errs)]
    per_repeat = [sum(abs(r["err_profiled"]) <= 0.10 for kk, _, r in cells if kk == k) for k in range(len(repeats))]
    lines = ["", "### Cost-model accuracy (profiled predictions) and the planner's choice across repeats", "",
             f"Configurations within 10% (target: at least 6, AF-pipe and EP alike): "
             f"{' / '.join(str(n) for n in per_repeat)} of {len(cells) // len(repeats)} per repeat; "
             f"{len(within)} of {len(configs)} in every repeat.", "",
             "| ranks | link | configuration | error per repeat | within 10% |", "|---|---|---|---|---|"]
    for (world, rate, name), errs in configs.items():
        lines.append(f"| {world} | {rate} | {name} | {' / '.join(_pct(e) for e in errs)} | "
                     f"{'yes' if (world, rate, name) in within else 'no'} |")
    lines += ["", "| ranks | link | planner's choice per repeat | stable |", "|---|---|---|---|"]
    for i, run in enumerate(repeats[-1]):
        chosen = [_cfg(next(r for r in sweep[i]["variants"] if r["planner"])).replace(" (planner)", "")
                  for sweep in repeats]
        lines.append(f"| {run['world']} | {run['rate']} | {' / '.join(chosen)} | "
                     f"{'yes' if len(set(chosen)) == 1 else '**no**'} |")
    return lines


def _targets(repeats: list[list[dict]]) -> list[str]:
    """The issue's targets at the comm-bound headline setting (fewest ranks, slowest link)."""
    from fxdisag.testing.throttle import parse_rate

    runs = repeats[-1]
    limited = [i for i, r in enumerate(runs) if parse_rate(r["rate"]) is not None]
    if not limited:
        return []
    i = min(limited, key=lambda k: (runs[k]["world"], parse_rate(runs[k]["rate"])))
    run = runs[i]
    af = next(r for r in run["variants"] if r["planner"])
    ep = _best(run, "ep")

    def ok(flag: bool) -> str:
        return "met" if flag else "**missed**"

    def across(mode: str) -> list[float]:
        return [sweep[i]["speedups"][mode] for sweep in repeats if mode in sweep[i]["speedups"]]

    def row(label: str, mode: str, goal: float) -> str:
        values = across(mode)
        med = statistics.median(values)
        return (f"| AF-pipe over {label} | >= {goal:.2f}x | {med:.2f}x (median of {len(values)} repeat(s); "
                f"{_spread(values)}) | {ok(med >= goal)} |")

    lines = [
        "",
        f"### Targets ({run['world']} ranks, {run['rate']}: the comm-bound headline setting)",
        "",
        "| target | goal | measured | |",
        "|---|---|---|---|",
        row("EP without overlap", "ep", 1.5),
    ]
    if "ep-overlap" in run["speedups"]:
        lines.append(row("EP with overlap", "ep-overlap", 1.2))
    for mode in PEERS:
        if mode in run["speedups"]:
            lines.append(row(mode.upper(), mode, 1.0))
    lines += [
        f"| pipeline efficiency, AF-pipe planner's choice (last repeat) | >= 0.85 | {af['efficiency']:.3f} "
        f"| {ok(af['efficiency'] >= 0.85)} |",
        f"| cost-model error, AF-pipe planner's choice (profiled; a priori / after the fact) | within 10% | "
        f"{_pct(af['err_profiled'])} ({_pct(af['err_a_priori'])} / {_pct(af['err_calibrated'])}) | "
        f"{ok(abs(af['err_profiled']) <= 0.10)} |",
        "",
        f"Bytes alone: AF-pipe's busiest NIC moves {_mb(max(af['max_egress'], af['max_ingress']))} MB per step "
        f"each way, an EP rank's {_mb(max(ep['max_egress'], ep['max_ingress']))} MB (routed rows + gradient "
        f"all-reduce). At the measured bandwidth that is {_ms(af['transfer'])} ms for AF-pipe, so even a perfectly "
        f"overlapped AF-pipe is at most {ep['median'] / af['transfer']:.2f}x faster than the measured EP step "
        f"({_ms(ep['median'])} ms).",
    ]
    return lines


def _configured(rate: str) -> str:
    from fxdisag.testing.throttle import parse_rate

    b = parse_rate(rate)
    return "unlimited" if b is None else f"{b / 1e9:.3f}"


BEGIN = "<!-- BEGIN GENERATED by benchmarks/bench_afpipe_vs_ep.py -->"
END = "<!-- END GENERATED -->"


def write_results(path: Path, generated: str) -> None:
    """Replace the generated block of RESULTS.md, keeping the hand-written text around it."""
    block = f"{BEGIN}\n{generated}\n{END}"
    if path.exists() and BEGIN in path.read_text():
        text = path.read_text()
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1] if END in rest else ""
        path.write_text(head + block + tail)
    else:
        path.write_text(f"# AF-pipe vs expert parallelism: results\n\n{block}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out-json", help=argparse.SUPPRESS)
    ap.add_argument("--emulation", choices=("netns", "throttle"), default="netns",
                    help="netns (root: namespaces + tc tbf) or throttle (in-process, no privileges)")
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--rates", default="400mbit,1gbit,unlimited")
    ap.add_argument("--steps", type=int, default=7, help="measured steps per variant (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant")
    ap.add_argument("--out", default=str(HERE / "out"), help="traces, PNGs, raw JSON")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per job")
    ap.add_argument("--repeats", type=int, default=3, help="run the whole sweep this many times (spread reported)")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    if args.worker:
        run_worker(args.out_json, str(out_dir), args.steps, args.warmup)
        return 0
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if args.steps < 1 or args.warmup < 1:
        ap.error("--steps and --warmup must be >= 1 (the first transfers after init are very slow)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / ".gitignore").write_text("*\n")  # outputs stay out of the repo
    if args.emulation == "netns":
        import netns

        try:  # fail before any job if namespaces cannot be made
            netns.delete_topology(netns.create_topology(1, "unlimited"))
        except netns.NetnsUnavailable as e:
            print(f"bench_afpipe_vs_ep: {e}\nRun as root, or use `--emulation throttle` (in-process link throttle; "
                  "the gradient all-reduce is then not throttled).", file=sys.stderr)
            return 3
    t0 = time.monotonic()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    repeats = []
    for k in range(args.repeats):
        runs = []
        for world in [int(w) for w in args.ranks.split(",")]:
            for rate in args.rates.split(","):
                t = time.monotonic()
                run = launch(args.emulation, world, rate, args.steps, args.warmup, out_dir, args.timeout)
                run["rate"] = rate
                runs.append(run)
                af = next(r for r in run["variants"] if r["planner"])
                sp = ", ".join(f"{m} {x:.2f}x" for m, x in run["speedups"].items())
                print(f"bench: repeat {k + 1}/{args.repeats} {world} ranks {rate:9s}: AF-pipe {_cfg(af)} "
                      f"{af['median'] * 1e3:.0f} ms; speedup vs {sp} ({time.monotonic() - t:.0f} s)", flush=True)
        repeats.append(runs)
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node() or 'host'}, {os.cpu_count()} cores, torch {_torch_version()}",
        "emulation": runs[0]["emulation"].split(" rate=")[0] if runs else args.emulation,
        "minutes": (time.monotonic() - t0) / 60,
        "load_before": load_before,
        "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "command": "python benchmarks/bench_afpipe_vs_ep.py" + "".join(
            f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "repeats": repeats}, indent=1, default=str))
    generated = render(repeats, meta)
    print("\n" + generated)
    if not args.no_results:
        write_results(Path(args.results), generated)
    return 0


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    sys.exit(main())
