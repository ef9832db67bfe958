"""Planning time of full-size registry models, end to end: build on the meta device, capture,
profile (a few layers, repeated: fxdisag/planner/repeat.py) and search (target: DeepSeek-V3
under 5 s on this machine).

    python benchmarks/bench_plan.py [--models deepseek-v3 ...] [--cluster 16x8xh800]
                                    [--seq-len 4096] [--global-batch 256] [--repeats 3]
    python benchmarks/bench_plan.py --models qwen3-235b-a22b --chunks   # + the chunk solver (#14)

Prints, per model, the median of --repeats runs in one process (imports excluded: paid
once per process): profile seconds (build + capture + profile), search seconds (the
AF-pipe search and the Megatron-LM baseline's, or the no-fit diagnosis), total, and
the outcome. Run on an otherwise idle machine.

``--chunks``: the search pinned to depth 1 (chunked layers run at depth 1), once without
and once with ``chunks=True``; "chunks s" is the difference, the solver's cost
(``planner/chunking.solve_chunks``: 25 step evaluations whatever the layer count).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fxdisag, not an installed one

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["deepseek-v3"])
    parser.add_argument("--cluster", default="16x8xh800")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunks", action="store_true", help="also time the chunk solver (depth 1)")
    args = parser.parse_args()
    if args.chunks:
        return time_chunks(args)

    from fxdisag.cli_plan import model_profile
    from fxdisag.planner import ClusterSpec, PlanError, plan

    cluster = ClusterSpec.parse(args.cluster)
    print(f"{'model':<18}{'profile s':>10}{'search s':>10}{'total s':>9}  outcome")
    for name in args.models:
        prof_t, search_t = [], []
        outcome = ""
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            prof = model_profile(name, args.seq_len)
            t1 = time.perf_counter()
            try:
                result = plan(prof, cluster, args.global_batch, seq_len=args.seq_len)
                outcome = (f"p {result.pipeline_depth}, step {result.step_time:.3g} s, speedup "
                           f"{result.speedup or float('nan'):.2f}x / {result.speedup_no_overlap or float('nan'):.2f}x")
            except PlanError as exc:
                outcome = "no fit: " + str(exc).splitlines()[-1]
            t2 = time.perf_counter()
            prof_t.append(t1 - t0)
            search_t.append(t2 - t1)
        p, s = statistics.median(prof_t), statistics.median(search_t)
        print(f"{name:<18}{p:>10.2f}{s:>10.2f}{p + s:>9.2f}  {outcome}", flush=True)


def time_chunks(args) -> None:
    from fxdisag.cli_plan import model_profile
    from fxdisag.planner import ClusterSpec, plan

    cluster = ClusterSpec.parse(args.cluster)
    print(f"{'model':<18}{'layers':>7}{'search s':>10}{'+ chunks s':>11}{'chunks s':>10}  solver's choice")
    for name in args.models:
        prof = model_profile(name, args.seq_len)
        plain, chunked, note = [], [], ""
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plan(prof, cluster, args.global_batch, seq_len=args.seq_len, pipeline_depth=1, baseline=False)
            t1 = time.perf_counter()
            result = plan(prof, cluster, args.global_batch, seq_len=args.seq_len, pipeline_depth=1, baseline=False,
                          chunks=True)
            t2 = time.perf_counter()
            plain.append(t1 - t0)
            chunked.append(t2 - t1)
            note = next((n for n in result.notes if n.startswith("dispatch -> experts")), "")
        a, b = statistics.median(plain), statistics.median(chunked)
        print(f"{name:<18}{len(prof.moe):>7}{a:>10.2f}{b:>11.2f}{b - a:>10.3f}  {note}", flush=True)


if __name__ == "__main__":
    main()
