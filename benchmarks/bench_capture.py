"""Capture time of full-size registry models on the meta device (target: DeepSeek-V3 < 10 s).

    python benchmarks/bench_capture.py [--models deepseek-v3 mixtral-8x7b ...] [--repeats 3]

Prints, per model: build time (meta), capture time (median of --repeats, each on a fresh
model), graph nodes and MoE layers. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fxdisag.capture import capture
from fxdisag.testing.models import REGISTRY, meta_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(REGISTRY), help="registry names (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=4096)
    args = parser.parse_args()
    print(f"{'model':<18}{'build s':>9}{'capture s (median)':>20}{'nodes':>8}{'moe layers':>12}")
    for name in args.models:
        times, build = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            model = meta_model(name, dtype=torch.bfloat16)
            build.append(time.perf_counter() - t0)
            ids = torch.zeros(1, args.seq_len, dtype=torch.long, device="meta")
            t0 = time.perf_counter()
            captured = capture(model, {"input_ids": ids, "labels": ids})
            times.append(time.perf_counter() - t0)
        nodes = len(captured.graph_module.graph.nodes)
        print(
            f"{name:<18}{statistics.median(build):>9.2f}{statistics.median(times):>20.2f}"
            f"{nodes:>8}{len(captured.layout.moe):>12}"
        )


if __name__ == "__main__":
    main()
