"""Benchmark: peak resident memory per rank, meta-device build against full-model build.

Writes one HF checkpoint (``save_pretrained``) of a qwen3_moe model large enough for its
weights to dominate a process (default: 4 layers, 64 experts, hidden 1024: ~1.7 GB of
float32 weights), then runs three variants under torchrun (gloo, one process per rank,
the plan 1 attention rank + N-1 expert ranks) and reports, per rank, the peak resident
set size (``ru_maxrss``) after building and one training step, the process's size right
after ``import torch, transformers`` (the floor), and the parameter bytes it holds:

* ``full``: every rank builds the whole model on CPU (``from_pretrained``), then
  ``disaggregate`` releases what the rank does not compute with (what fxdisag did before);
* ``meta + weights``: the model is built on meta and ``disaggregate(..., weights=dir)``
  reads only the rank's own tensors and expert rows;
* ``meta + seed``: the same without a checkpoint, initialised under a seed.

    python benchmarks/bench_meta_build.py                     # 3 ranks, the default model
    python benchmarks/bench_meta_build.py --ranks 3 --experts 64 --hidden-size 1024 --num-layers 4

The figures are what the run measured, whatever they are.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

from torchrun_worker import run_worker

VARIANTS = ("full", "meta + weights", "meta + seed")


def _config(args):
    from fxdisag.testing.models import tiny_config

    cfg = tiny_config("qwen3_moe", num_layers=args.num_layers)
    cfg.hidden_size = args.hidden_size
    cfg.intermediate_size = 2 * args.hidden_size
    cfg.moe_intermediate_size = args.hidden_size // 2
    cfg.num_experts = args.experts
    cfg.head_dim = 64
    cfg.num_attention_heads = args.hidden_size // 64
    cfg.num_key_value_heads = max(1, cfg.num_attention_heads // 4)
    cfg.vocab_size = 32000
    return cfg


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (the floor includes it)

    floor = _rss_mb()
    import fxdisag
    from fxdisag.planner.plan import Plan
    from fxdisag.testing.models import example_batch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = _config(args)
    t0 = time.perf_counter()
    if args.variant == "full":
        model = AutoModelForCausalLM.from_pretrained(args.ckpt, attn_implementation="eager",
                                                     experts_implementation=cfg._experts_implementation)
        weights = None
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        weights = args.ckpt if args.variant == "meta + weights" else None
    model.train()
    batch = example_batch(cfg, 2 * (1), args.seq_len, seed=0)
    plan = Plan.manual(num_attention=1, num_expert=world - 1, num_experts=cfg.num_experts, num_microbatches=2)
    dmodel = fxdisag.disaggregate(model, batch, plan, weights=weights, seed=0, sync_params=False)
    built = time.perf_counter() - t0
    seen = {id(p): p.numel() * p.element_size() for p in list(model.parameters()) + list(dmodel.parameters())
            if not p.is_meta}
    out = dmodel(**batch)
    out.loss.backward()
    row = {"variant": args.variant, "rank": rank, "role": dmodel.role, "floor_mb": floor, "peak_mb": _rss_mb(),
           "param_mb": sum(seen.values()) / 2**20, "build_s": built, "loss": float(out.loss)}
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        print("RESULT " + json.dumps(rows), flush=True)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--port", type=int, default=29561)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _config(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="fxdisag-bench-ckpt-") as ckpt:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(ckpt)
        del model
        print(f"checkpoint: qwen3_moe, {args.num_layers} layers, {args.experts} experts, hidden {args.hidden_size}: "
              f"{n / 1e6:.0f} M parameters, {n * 4 / 2**30:.2f} GiB float32", flush=True)
        for variant in VARIANTS:
            results += run_worker(__file__, args.ranks, args.port, [
                "--variant", variant, "--ckpt", ckpt, "--experts", str(args.experts), "--hidden-size",
                str(args.hidden_size), "--num-layers", str(args.num_layers), "--seq-len", str(args.seq_len)],
                timeout=900)
    print(f"\n| variant | rank | role | peak RSS MB | floor MB | parameters held MB | build s | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['rank']} | {r['role']} | {r['peak_mb']:.0f} | {r['floor_mb']:.0f} | "
              f"{r['param_mb']:.0f} | {r['build_s']:.1f} | {r['loss']:.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
