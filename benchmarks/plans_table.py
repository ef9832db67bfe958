"""The planner's choices at paper scale, as the table in docs/PLANS.md.

    python benchmarks/plans_table.py [--write docs/PLANS.md] [--models ...] [--seq-lens ...]

For each model (full size, meta device) and sequence length on 16x8xh800 with a global
batch of 256 sequences: the AF-pipe plan (pipeline depth p, attention:expert devices per
group, micro-batches, schedule, recomputation), its predicted step, and the Megatron-LM
PP x EP x DP baseline with the all-to-all overlapped and exposed (step, configuration,
speedup of AF-pipe over it). One profile per model serves every length (profile costs are
exact polynomials in S). ``--write`` replaces the table between the markers of the page
and leaves the rest of it as written.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's fxdisag, not an installed one

import argparse
import sys
import time
from pathlib import Path

BEGIN, END = "<!-- plans-table:begin -->", "<!-- plans-table:end -->"
MODELS = ("deepseek-moe-16b", "gpt-oss-120b", "qwen3-235b-a22b")
SEQ_LENS = (4096, 8192, 16384, 32768)


def _row(name: str, seq_len: int, result) -> str:
    p = result.pipeline_depth
    a, e = len(result.attention_ranks) // p, len(result.expert_ranks) // p
    kind = result.schedule_kind + (f" ({result.in_flight} in flight)" if result.schedule_kind == "1f1b" else "")
    rc = "+".join(k for k, v in result.recompute.items() if v) or "none"
    cells = [name, f"{seq_len // 1024}K", str(p), f"{a}:{e}", f"{result.num_microbatches} x {result.microbatch_size}"
             + (f" x {result.grad_accumulation} rounds" if result.grad_accumulation > 1 else ""), kind, rc,
             f"{result.step_time:.3g}"]
    for variant, step in (("overlap", result.baseline_step_time_overlap), ("no_overlap", result.baseline_step_time)):
        if step is None:
            cells += ["does not fit", ""]
            continue
        cfg = result.baseline[variant]
        short = f"PP{cfg['pp']}" + (f"xV{cfg['v']}" if cfg["v"] > 1 else "") + f" EP{cfg['ep']} DP{cfg['dp']} m{cfg['m']}"
        cells += [f"{step:.3g} ({short})", f"{step / result.step_time:.2f}x"]
    return "| " + " | ".join(cells) + " |"


def table(models=MODELS, seq_lens=SEQ_LENS, cluster_text: str = "16x8xh800", global_batch: int = 256,
          log=print) -> str:
    from fxdisag.cli_plan import model_profile
    from fxdisag.planner import ClusterSpec, PlanError, plan

    cluster = ClusterSpec.parse(cluster_text)
    lines = [
        f"Cluster {cluster.describe()}, global batch {global_batch} sequences, bf16, Adam (fp32 states, sharded "
        "over data-parallel replicas), fused attention. Steps in seconds. Speedup = baseline step / AF-pipe step.",
        "",
        "| model | seq | p | A:E per group | micro-batches | schedule | recompute | AF-pipe step | "
        "Megatron, a2a overlapped | speedup | Megatron, a2a exposed | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in models:
        start = time.perf_counter()
        prof = model_profile(name, seq_lens[0])
        for seq_len in seq_lens:
            try:
                result = plan(prof, cluster, global_batch, seq_len=seq_len)
            except PlanError as exc:
                lines.append(f"| {name} | {seq_len // 1024}K | no plan: {str(exc).splitlines()[-1]} |")
                continue
            lines.append(_row(name, seq_len, result))
        log(f"plans_table: {name} in {time.perf_counter() - start:.1f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="PAGE", help="replace the table between the markers of PAGE")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=list(SEQ_LENS))
    parser.add_argument("--cluster", default="16x8xh800")
    parser.add_argument("--global-batch", type=int, default=256)
    args = parser.parse_args(argv)
    text = table(args.models, args.seq_lens, args.cluster, args.global_batch,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
    if not args.write:
        print(text)
        return 0
    page = Path(args.write)
    old = page.read_text()
    if BEGIN not in old or END not in old:
        raise SystemExit(f"{page}: no {BEGIN} ... {END} markers to put the table between")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"wrote the table into {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
