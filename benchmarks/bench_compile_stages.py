"""Benchmark: the demo's step time with and without compiled stage programs, in one run.

Runs ``examples/train.py`` under torchrun (2 ranks, gloo, loopback, no throttle) once per
variant, with the same model, batch, seed and steps, and reports what each printed: the
parity line, the set-up time (capture, build, and for compiled stages inductor's first
compiles, which happen in the parity step), the median step time over steps 2..N and the
final loss. Variants: ``disaggregate``, ``disaggregate --compile-stages``, and the same two
through ``--front-door compile`` (torch.compile(model, backend="fxdisag")).

    python benchmarks/bench_compile_stages.py                 # default: 40 steps, hidden 128, 4 layers
    python benchmarks/bench_compile_stages.py --steps 60 --hidden-size 256

The speed-up is reported whatever it is; a variant that fails parity is reported as such.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = [
    ("disaggregate", []),
    ("disaggregate + compile_stages", ["--compile-stages"]),
    ("torch.compile", ["--front-door", "compile"]),
    ("torch.compile + compile_stages", ["--front-door", "compile", "--compile-stages"]),
]


def run_variant(extra: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(args.port),
           str(ROOT / "examples" / "train.py"), "--steps", str(args.steps), "--quiet",
           "--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
           "--microbatches", str(args.microbatches), "--family", args.family, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    result = {"rc": proc.returncode, "wall_s": wall, "output": out}
    if m := re.search(r"median step time: ([\d.]+) s", out):
        result["step_s"] = float(m.group(1))
    if m := re.search(r"checked in ([\d.]+) s", out):
        result["setup_s"] = float(m.group(1))
    if m := re.search(r"final loss: ([\d.]+)", out):
        result["final_loss"] = float(m.group(1))
    if m := re.search(r"parity vs eager: .*?: (OK|FAILED)", out):
        result["parity"] = m.group(0)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--family", default="qwen3_moe")
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = p.parse_args(argv)
    print(f"demo: {args.family}, {args.num_layers} layers, hidden {args.hidden_size}, batch {args.batch_size} x "
          f"{args.seq_len}, m={args.microbatches}, {args.steps} steps, 2 ranks (1A+1E), gloo on loopback", flush=True)
    rows = []
    for name, extra in VARIANTS:
        if args.only and name not in args.only:
            continue
        r = run_variant(extra, args)
        rows.append((name, r))
        if r["rc"] != 0 or "step_s" not in r:
            print(f"{name}: FAILED (rc {r['rc']})\n{r['output'][-3000:]}", flush=True)
        else:
            print(f"{name}: median step {r['step_s']:.3f} s, set-up + parity {r.get('setup_s', float('nan')):.1f} s, "
                  f"final loss {r.get('final_loss')}; {r.get('parity', 'no parity line')}", flush=True)
    base = {n: r.get("step_s") for n, r in rows}
    print("\n| variant | median step (s) | vs its front door uncompiled | set-up + parity step (s) | final loss |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        ref = base.get(name.replace(" + compile_stages", ""))
        ratio = f"{ref / r['step_s']:.2f}x faster" if ref and r.get("step_s") else "-"
        print(f"| {name} | {r.get('step_s', float('nan')):.3f} | {ratio} | {r.get('setup_s', float('nan')):.1f} | "
              f"{r.get('final_loss')} |")
    return 0 if all(r["rc"] == 0 for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
