"""``python -m fxdisag plan`` and ``python -m fxdisag simulate``.

Contract
--------
``add_plan_parsers(subparsers)`` adds the two sub-commands to an argparse sub-parser
set; each sets ``func`` (``args.func(args) -> int``), as ``fxdisag/cli.py`` expects.

* ``plan --model M --cluster 16x8xh800 --seq-len 4096 --global-batch N [--json] [--explain]``
  captures M (a registry name on the meta device, or a tiny family), profiles it, searches
  the plan and prints it: ranks, placement, micro-batches, predicted AF-pipe and EP
  baseline step times, speedup, utilisation, memory per device (``--json``: the plan as
  JSON; ``--explain``: every formula with its values).
* ``simulate`` (same arguments, plus ``--png FILE``, ``--trace FILE``; pinned to pipeline
  depth 1 and GPipe, the plans it models) runs the plan's
  schedule through the discrete-event simulator with the cost model's per-action times
  and prints step time, bubble and exposed communication.

The simulation is of one routing domain reduced to its smallest symmetric form
(A/g attention and F/g expert ranks, g = gcd(A, F)): every attention rank and every
expert rank of a domain behaves alike under uniform routing, so per-rank traffic and
compute are those of the full plan; links get the bandwidth that makes each rank's
busier side take the roofline's transfer time.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["add_plan_parsers", "model_profile", "plan_from_args", "simulate_plan"]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registry name (e.g. mixtral-8x7b) or tiny family (e.g. qwen3_moe)")
    p.add_argument("--cluster", default="16x8xh800",
                   help="<nodes>x<devices per node>x<preset> (presets: h800, h100, a100, mi250x), or a JSON file "
                        "written from ClusterSpec.to_dict() (default: 16x8xh800)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd"))
    p.add_argument("--max-microbatches", type=int, default=32)
    p.add_argument("--memory-fraction", type=float, default=0.9, help="usable share of device memory (default 0.9)")
    p.add_argument("--no-shard-optimizer", action="store_true",
                   help="keep full optimizer state on every replica (default: sharded, ZeRO-1 style)")
    p.add_argument("--eager-attention-memory", action="store_true",
                   help="count the S x S attention probabilities eager attention keeps (default: fused attention)")
    p.add_argument("--num-attention", type=int, default=None, help="pin the number of attention devices")
    p.add_argument("--num-microbatches", type=int, default=None, help="pin the number of micro-batches")
    p.add_argument("--pipeline-depth", type=int, default=None, help="pin the pipeline depth p (default: searched)")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default=None, help="pin the schedule (default: searched)")
    p.add_argument("--chunks", action="store_true",
                   help="solve the chosen plan's chunks of each MoE layer's dispatch -> experts -> combine "
                        "(forward and backward; depth 1)")
    p.add_argument("--shared-experts", choices=("auto", "attention", "expert", "replicated"), default="auto",
                   help="where a model's shared experts run: chosen by the cost model (auto, the default), on the "
                        "attention group, on one expert rank, or a copy on every expert rank, as an always-selected "
                        "expert (depth 1)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers of the model")


def add_plan_parsers(subparsers) -> None:
    """Add ``plan`` and ``simulate`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser(
        "plan",
        help="choose attention/expert ranks, placement and micro-batches for a cluster",
        description="Capture and profile a model, then search the AF-pipe plan with the smallest predicted "
        "step time that fits in memory; print it with the expert-parallel baseline's predicted step time.",
    )
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--explain", action="store_true", help="also print every formula with its values")
    p.set_defaults(func=_run_plan)

    s = subparsers.add_parser(
        "simulate",
        help="run the plan's schedule through the discrete-event simulator",
        description="Plan as `plan` does, then simulate the schedule with the cost model's per-action times.",
    )
    _add_common(s)
    s.add_argument("--png", metavar="FILE", help="write the simulated timeline as a Gantt chart (needs matplotlib)")
    s.add_argument("--trace", metavar="FILE", help="write the simulated timeline as Chrome trace JSON")
    s.set_defaults(func=_run_simulate, pipeline_depth=1, schedule="gpipe")  # what the simulation models


def _cluster(text: str):
    from fxdisag.planner.cluster import ClusterSpec

    if os.path.exists(text):
        import json

        with open(text) as f:
            return ClusterSpec.from_dict(json.load(f))
    return ClusterSpec.parse(text)


def model_profile(model: str, seq_len: int, dtype: str = "bfloat16", *, fused_attention: bool = True,
                  layers: int | None = None):
    """The profile of ``model`` (a registry name, built on the meta device, or a tiny family):
    registry models are profiled from a few layers and repeated (exact:
    ``fxdisag/planner/repeat.py``)."""
    import torch

    from fxdisag.capture import capture
    from fxdisag.planner.profile import profile
    from fxdisag.planner.repeat import profile_repeating
    from fxdisag.testing.models import REGISTRY, full_size_config, meta_model, resolve_model

    full = model in REGISTRY

    def profile_one(module):
        ids = torch.zeros(1, 16, dtype=torch.long, device="meta" if full else "cpu")
        captured = capture(module, {"input_ids": ids, "labels": ids})
        return profile(captured, 1, seq_len, getattr(torch, dtype), fused_attention=fused_attention, name=model)

    if full:
        total = layers or full_size_config(model).num_hidden_layers
        return profile_repeating(lambda n: meta_model(model, num_layers=n), total, profile_one)
    return profile_one(resolve_model(model, num_layers=layers) if layers else resolve_model(model))


def plan_from_args(args: argparse.Namespace):
    """(plan, profile, cluster) for parsed ``plan``/``simulate`` arguments."""
    from fxdisag.planner.search import plan

    cluster = _cluster(args.cluster)
    prof = model_profile(args.model, args.seq_len, args.dtype, fused_attention=not args.eager_attention_memory,
                         layers=args.layers)
    result = plan(
        prof,
        cluster,
        args.global_batch,
        max_microbatches=args.max_microbatches,
        optimizer=args.optimizer,
        shard_optimizer=not args.no_shard_optimizer,
        memory_fraction=args.memory_fraction,
        num_attention=args.num_attention,
        num_microbatches=args.num_microbatches,
        pipeline_depth=args.pipeline_depth,
        schedule=args.schedule,
        chunks=bool(getattr(args, "chunks", False)),
        shared_experts=getattr(args, "shared_experts", "auto"),
    )
    return result, prof, cluster


def _run_plan(args: argparse.Namespace) -> int:
    result, _, _ = plan_from_args(args)
    if args.json:
        print(result.to_json(indent=1))
    else:
        print(result)
        if args.explain:
            print()
            print(result.explain())
    return 0


# ---------------------------------------------------------------------- simulation


def _reduced_groups(result) -> tuple[int, int]:
    domains = result.routing_domains or [sorted(result.attention_ranks + result.expert_ranks)]
    first = set(domains[0])
    a = sum(1 for r in result.attention_ranks if r in first)
    f = sum(1 for r in result.expert_ranks if r in first)
    g = math.gcd(a, f)
    return a // g, f // g


def simulate_plan(result):
    """Simulate one accumulation round of ``result`` (a searched Plan) on its reduced domain.

    Returns (SimResult with the all-reduce, SimResult without it, step-time estimate for
    all rounds, (A', F'))."""
    from fxdisag.schedule import ActionKind, af_pipe_schedule, chunk_schedule
    from fxdisag.schedule.actions import num_chunks
    from fxdisag.schedule.simulate import LinkModel, simulate

    t = result.breakdown
    if not t:
        raise ValueError("simulate needs a plan made by the search (it has no predicted stage times)")
    if result.pipeline_depth > 1 or result.schedule_kind != "gpipe":
        raise ValueError(f"simulate models pipeline depth 1 with the GPipe schedule; this plan has depth "
                         f"{result.pipeline_depth} and schedule {result.schedule_kind!r}: pin --pipeline-depth 1 "
                         "--schedule gpipe to simulate")
    a, f = _reduced_groups(result)
    attention, experts = list(range(a)), list(range(a, a + f))
    J, m = result.num_moe_layers, result.num_microbatches
    lat = t["link_latency"]

    def bandwidth(per_attention_device: float, seconds: float) -> float:
        busiest = max(per_attention_device, per_attention_device * a / f)  # sender or receiver side
        return busiest / (seconds - lat) if seconds - lat > 0 else math.inf

    to_experts = bandwidth(t["dispatch_bytes"], t["dispatch"])
    to_attention = bandwidth(t["combine_bytes"], t["combine"])
    attention_set = set(attention)

    class _Link(LinkModel):
        def bandwidth(self, src: int, dst: int) -> float:
            return to_experts if src in attention_set else to_attention

        def latency(self, src: int, dst: int) -> float:
            return lat

    def compute_time(with_reduce: bool):
        def fn(rank: int, action) -> float:
            k, s = action.kind, action.stage
            if k is ActionKind.REDUCE:
                if not with_reduce:
                    return 0.0
                return t["sync_attention"] if rank in attention_set else t["sync_experts"]
            if not k.is_compute:
                return 0.0
            d = "b" if k.is_backward else "f"
            if k.role == "E":  # a chunk: one action's overhead and its share of the work
                r, fixed = num_chunks(schedule.chunks, k, s), min(t.get("fixed_expert", 0.0), t[f"expert_{d}"])
                return fixed + (t[f"expert_{d}"] - fixed) / r
            return (t[f"pre_{d}"] if s == 0 else 0.0) + (t[f"attn_{d}"] if s < J else 0.0) + (t[f"post_{d}"] if s == J else 0.0)
        return fn

    per_message = {"D": t["dispatch_bytes"], "C": t["combine_bytes"], "GC": t["combine_grad_bytes"],
                   "GD": t["dispatch_grad_bytes"]}

    def message_bytes(src: int, action, dst: int) -> float:
        # an attention rank's rows split evenly over the experts, and over a chunked layer's chunks
        return per_message[action.kind.channel] / f / num_chunks(schedule.chunks, action.kind, action.stage)

    schedule = af_pipe_schedule(attention, experts, J, m)
    if result.chunks:
        schedule = chunk_schedule(schedule, {j: tuple(c) for j, c in enumerate(result.chunks) if max(c) > 1})
    link = _Link()
    with_reduce = simulate(schedule, compute_time(True), message_bytes, link)
    without = simulate(schedule, compute_time(False), message_bytes, link, check=False)
    step = (result.grad_accumulation - 1) * without.step_time + with_reduce.step_time
    return with_reduce, without, step, (a, f)


def _run_simulate(args: argparse.Namespace) -> int:
    result, _, _ = plan_from_args(args)
    sim, round_only, step, (a, f) = simulate_plan(result)
    print(result)
    print()
    print(f"simulated: one routing domain reduced to {a} attention : {f} expert rank(s), "
          f"{result.num_microbatches} micro-batch(es), {result.num_moe_layers} MoE layers")
    print(f"  one round (incl. gradient all-reduce, not overlapped): {sim.step_time:.4g} s")
    print(f"  step ({result.grad_accumulation} round(s)): simulated {step:.4g} s, roofline {result.step_time:.4g} s")
    print(f"  bubble (round without the all-reduce): attention {round_only.bubble_fraction['attention']:.1%}, "
          f"experts {round_only.bubble_fraction['expert']:.1%}")
    exposed_a = [round_only.exposed_comm[r] for r in round_only.attention_ranks]
    exposed_e = [round_only.exposed_comm[r] for r in round_only.expert_ranks]
    print(f"  exposed communication per round: attention {sum(exposed_a) / len(exposed_a):.4g} s, "
          f"experts {sum(exposed_e) / len(exposed_e):.4g} s")
    if args.trace:
        from fxdisag.runtime.timeline import chrome_trace

        chrome_trace(sim.spans, args.trace)
        print(f"  wrote {args.trace}")
    if args.png:
        from fxdisag.runtime.timeline import gantt_png

        gantt_png(sim.spans, args.png, title=f"{result.model}: one round of the AF-pipe schedule (simulated)")
        print(f"  wrote {args.png}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="fxdisag-plan")
    add_plan_parsers(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
