"""Benchmark: skewed routing, step time with and without expert balancing, and the migration's cost.

3 ranks under torchrun (gloo; 1 attention rank + 2 expert ranks, experts 0-3 on rank 1,
4-7 on rank 2), a qwen3_moe-family model whose routers are skewed toward experts 0 and 2
(both on rank 1). Their gate rows are +c*u and -c*u for one random direction u, so every
token picks exactly one of the two, by the sign of its hidden state along u, plus one
other expert. Rank 1 computes about twice the (token, expert) pairs of rank 2. Two runs
with the same model, batches and seed:

* ``static``: the plan's placement all along;
* ``balanced``: ``fxdisag.ExpertBalancer(every=--every)`` re-places experts when the move
  pays for itself by its own (compute-only) estimate.

Reports:

* the median step time of each run over the steps after the balancer's first decision;
* the bytes the busiest rank sent per step;
* the balancer's reports (imbalance, swaps, predicted saving and cost);
* per move, the predicted saving per step against the measured one (the balanced run's
  median step change across the move, less the static run's over the same steps);
* the migration's measured time.

``FXDISAG_THROTTLE`` (e.g. ``200mbit``) emulates a slow NIC inside the processes, as for the
demo.

    python benchmarks/bench_balance.py                      # 30 steps, decision every 5
    FXDISAG_THROTTLE=200mbit python benchmarks/bench_balance.py

The figures are what the run measured, whatever they are. On this 2-core host the 3
processes share the cores, so a balanced step can only gain where one rank's work or link
was the bottleneck.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from torchrun_worker import run_worker


def _config(args):
    from fxdisag.testing.models import tiny_config

    cfg = tiny_config("qwen3_moe", num_layers=args.num_layers)
    cfg.hidden_size = args.hidden_size
    cfg.moe_intermediate_size = 2 * args.hidden_size
    cfg.head_dim = 32
    cfg.num_attention_heads = args.hidden_size // 32
    cfg.num_key_value_heads = cfg.num_attention_heads
    return cfg


def skew(model, scale: float = 6.0) -> None:
    """Gate rows of experts 0 and 2 at +scale*u and -scale*u: every token picks one of them."""
    g = torch_generator()
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue
        import torch

        u = torch.randn(gate.weight.shape[1], generator=g)
        u = u / u.norm() * scale
        with torch.no_grad():
            gate.weight[0] = u
            gate.weight[2] = -u


def torch_generator():
    import torch

    return torch.Generator().manual_seed(1234)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    import fxdisag
    from fxdisag.planner.plan import Plan
    from fxdisag.testing.models import example_batch
    from fxdisag.testing.throttle import install_from_env
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    install_from_env()
    dist.init_process_group("gloo")
    cfg = _config(args)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.train()
    skew(model)
    batches = [example_batch(cfg, args.batch_size, args.seq_len, seed=s) for s in range(args.steps)]
    plan = Plan.manual(num_attention=1, num_expert=2, num_experts=cfg.num_experts, num_microbatches=2)
    dmodel = fxdisag.disaggregate(model, batches[0], plan)
    opt = torch.optim.AdamW(dmodel.parameters(), lr=1e-3)
    balancer = fxdisag.ExpertBalancer(dmodel, opt, every=args.every, horizon=args.horizon) \
        if args.variant == "balanced" else None
    times, losses, reports, sent, decisions = [], [], [], [], []
    for batch in batches:
        dist.barrier()
        t0 = time.perf_counter()
        out = dmodel(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
        sent.append(sum(dmodel.step_sent_bytes().values()))
        if balancer is not None:
            report = balancer.step()
            if report is not None:
                reports.append(str(report))
                decisions.append({"step": report.step, "moved": report.moved,
                                  "saving_s": report.saving_per_step_s, "cost_s": report.cost_s})
    moved = [r for r in (balancer.reports if balancer else []) if r.moved]
    every_sent: list = [None] * dist.get_world_size()
    dist.all_gather_object(every_sent, sent)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"variant": args.variant, "times": times, "losses": losses, "reports": reports,
                                      "decisions": decisions,
                                      "sent": every_sent,
                                      "migration_s": [r.migration_s for r in moved],
                                      "moved_bytes": [r.moved_bytes for r in moved]}), flush=True)
    dist.destroy_process_group()


def measured_savings(static: list[float], balanced: list[float], decisions: list[dict], every: int) -> list[str]:
    """Per move: the balancer's predicted saving per step against the measured one, the
    change of the balanced run's median step across the move less the static run's over the
    same steps (both runs share the machine's drift). The windows are the ``every`` steps
    before and after the decision (decision at step s: steps s-every..s-1 and s..s+every-1)."""
    lines = ["per move: predicted saving vs measured (balanced run's median step change across the move, "
             "less the static run's over the same steps)"]
    for d in decisions:
        s = d["step"]
        if not d["moved"] or s - every < 0 or s + every > len(balanced):
            continue
        before, after = slice(s - every, s), slice(s, s + every)
        delta_b = statistics.median(balanced[before]) - statistics.median(balanced[after])
        delta_s = statistics.median(static[before]) - statistics.median(static[after])
        lines.append(f"  step {s}: predicted {d['saving_s'] * 1e3:.1f} ms/step, measured {(delta_b - delta_s) * 1e3:.1f} "
                     f"ms/step (balanced {delta_b * 1e3:+.1f}, static {delta_s * 1e3:+.1f})")
    if len(lines) == 1:
        lines.append("  (no move with a full window on both sides)")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--horizon", type=int, default=100)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--port", type=int, default=29571)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    results = {}
    for variant in ("static", "balanced"):
        results[variant] = run_worker(__file__, 3, args.port, [
            "--variant", variant, "--steps", str(args.steps), "--every", str(args.every), "--horizon",
            str(args.horizon), "--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers),
            "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)], timeout=1200)
    after = args.every  # steps after the first decision
    print(f"throttle: {os.environ.get('FXDISAG_THROTTLE', 'none')}; {args.steps} steps, decision every {args.every}")
    for variant, r in results.items():
        med = statistics.median(r["times"][after:])
        busiest = max(statistics.median(per[after:]) for per in r["sent"])
        print(f"{variant}: median step {med * 1e3:.1f} ms over steps {after}..{args.steps - 1}; busiest rank sent "
              f"{busiest / 1e6:.2f} MB/step; final loss {r['losses'][-1]:.5f}")
        for line in r["reports"]:
            print(f"  {line}")
        if r["migration_s"]:
            print(f"  migrations: {[f'{s * 1e3:.1f} ms' for s in r['migration_s']]}, "
                  f"{[f'{b / 1e6:.2f} MB' for b in r['moved_bytes']]}")
    for line in measured_savings(results["static"]["times"], results["balanced"]["times"],
                                 results["balanced"]["decisions"], args.every):
        print(line)
    s, b = (statistics.median(results[v]["times"][after:]) for v in ("static", "balanced"))
    print(f"speed-up of balancing: {s / b:.2f}x; losses equal: "
          f"{max(abs(x - y) for x, y in zip(results['static']['losses'], results['balanced']['losses'])):.2e} max diff")
    return 0


if __name__ == "__main__":
    sys.exit(main())
