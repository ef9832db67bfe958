"""Measure gloo link bandwidth under both cluster-emulation modes, in one run.

What it guarantees: every figure printed was measured in this run; GB/s is
bytes a rank sends to *other* ranks divided by the step time (the slowest
rank's, median of ``--reps`` repetitions after one warm-up), and "x rate" is
that divided by the configured link rate.

Modes:
- ``netns``: ``benchmarks/netns.py``: one network namespace per rank, veths
  into a bridge, ``tc tbf`` on both ends (needs root; skipped with a note when
  unavailable).
- ``throttle``: ``torchrun`` on loopback with ``FXDISAG_THROTTLE=<rate>``: the
  in-process link throttle (``fxdisag/testing/throttle.py``) paces isends.
  Collectives (``all_to_all_single``) are *not* paced in this mode.

Patterns (S = ``--mb`` MiB per peer and direction):
- ``one_way``             rank 0 sends S to rank 1, nobody sends back
- ``p2p_irecv_first``     pairs (0,1), (2,3).. exchange S: irecv posted, then isend
- ``p2p_isend_first``     the same with isend posted first
- ``all_to_all_single``   every rank sends S to every other rank
- ``irecvs_then_isends``  the same exchange as point-to-point ops: every irecv
                          posted before any isend

Usage::

    python benchmarks/bench_links.py                       # everything (about 3-4 min)
    python benchmarks/bench_links.py --ranks 2 --rates 1gbit --modes throttle
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PATTERNS = ["one_way", "p2p_irecv_first", "p2p_isend_first", "all_to_all_single", "irecvs_then_isends"]


# ---------------------------------------------------------------------------
# worker: one rank (started by netns.py or torchrun; reads the torchrun env)


def _worker(out: str, mib_per_peer: float, reps: int) -> None:
    import torch
    import torch.distributed as dist

    from fxdisag.testing.throttle import install_from_env

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    throttle = install_from_env()  # FXDISAG_THROTTLE (throttle mode) or None
    rank, world = dist.get_rank(), dist.get_world_size()
    n = int(mib_per_peer * (1 << 20)) // 4
    peers = [(rank + k) % world for k in range(1, world)]  # staggered, no hot spot
    partner = rank ^ 1 if (rank ^ 1) < world else None
    send = torch.ones(n * world)
    recv = torch.empty(n * world)
    chunk = lambda t, p: t[p * n : (p + 1) * n]  # noqa: E731

    def one_way() -> None:
        if rank == 0:
            dist.isend(chunk(send, 1), 1).wait()
        elif rank == 1:
            dist.irecv(chunk(recv, 0), 0).wait()

    def p2p(irecv_first: bool) -> Callable[[], None]:
        def run() -> None:
            if partner is None:
                return
            if irecv_first:
                works = [dist.irecv(chunk(recv, partner), partner), dist.isend(chunk(send, partner), partner)]
            else:
                works = [dist.isend(chunk(send, partner), partner), dist.irecv(chunk(recv, partner), partner)]
            for w in works:
                w.wait()

        return run

    def a2a() -> None:
        dist.all_to_all_single(recv, send)

    def irecvs_then_isends() -> None:
        works = [dist.irecv(chunk(recv, p), p) for p in peers]
        works += [dist.isend(chunk(send, p), p) for p in peers]
        for w in works:
            w.wait()

    funcs = {
        "one_way": one_way,
        "p2p_irecv_first": p2p(True),
        "p2p_isend_first": p2p(False),
        "all_to_all_single": a2a,
        "irecvs_then_isends": irecvs_then_isends,
    }
    # bytes this rank sends to others, per pattern (for GB/s)
    egress = {
        "one_way": 4 * n,
        "p2p_irecv_first": 4 * n,
        "p2p_isend_first": 4 * n,
        "all_to_all_single": 4 * n * (world - 1),
        "irecvs_then_isends": 4 * n * (world - 1),
    }
    for _ in range(2):  # the first transfers after init are very slow
        irecvs_then_isends()
        dist.barrier()
    times: dict[str, list[float]] = {}
    for name, fn in funcs.items():
        for i in range(reps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i > 0:
                times.setdefault(name, []).append(elapsed.item())
    if throttle is not None:
        throttle.close()
    if rank == 0:
        Path(out).write_text(
            json.dumps({"times": times, "egress_bytes": egress, "emulation": os.environ.get("FXDISAG_EMULATION", "")})
        )
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------
# driver


def _parse_rate(rate: str) -> float | None:
    sys.path.insert(0, str(REPO))
    from fxdisag.testing.throttle import parse_rate

    return parse_rate(rate)


def _launch(mode: str, world: int, rate: str, mib: float, reps: int, timeout: float) -> dict | str:
    """Run the worker on ``world`` ranks; returns its JSON, or a reason string
    when the mode is unavailable."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        worker = [str(Path(__file__).resolve()), "--worker", "--out", out, "--mb", str(mib), "--reps", str(reps)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}")
        env.pop("FXDISAG_THROTTLE", None)
        if mode == "netns":
            cmd = [sys.executable, str(HERE / "netns.py"), "--nproc", str(world), "--rate", rate,
                   "--timeout", str(timeout), "--", *worker]  # fmt: skip
        else:
            env.update(FXDISAG_THROTTLE=rate, GLOO_SOCKET_IFNAME="lo", FXDISAG_EMULATION=f"throttle rate={rate}")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={world}", *worker]  # fmt: skip
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout + 30:.0f} s"
        if mode == "netns" and res.returncode == 3:
            return "unavailable: " + res.stderr.strip().splitlines()[0]
        if res.returncode != 0 or not os.path.exists(out):
            tail = "\n".join(res.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"bench_links: {mode} world={world} rate={rate} failed (exit {res.returncode}):\n{tail}")
        return json.loads(Path(out).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--mb", type=float, default=None, help="MiB per peer and direction (default 8 for 2 ranks, 4 for 4)")
    ap.add_argument("--reps", type=int, default=5, help="measured repetitions per pattern (median reported)")
    ap.add_argument("--ranks", default="2,4")
    ap.add_argument("--rates", default="unlimited,1gbit,400mbit")
    ap.add_argument("--modes", default="netns,throttle")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per launch")
    ap.add_argument("--json", help="also write all measurements to this file")
    args = ap.parse_args(argv)
    if args.worker:
        _worker(args.out, args.mb, args.reps)
        return 0

    modes = args.modes.split(",")
    rows = []
    unavailable: dict[str, str] = {}
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"bench_links: {time.strftime('%Y-%m-%d %H:%M')}, cores={os.cpu_count()}, load average {load}", flush=True)
    for world in [int(w) for w in args.ranks.split(",")]:
        mib = args.mb if args.mb is not None else (8.0 if world == 2 else 4.0)
        for rate in args.rates.split(","):
            for mode in modes:  # alternate modes within each setting
                if mode in unavailable:
                    continue
                t0 = time.monotonic()
                res = _launch(mode, world, rate, mib, args.reps, args.timeout)
                if isinstance(res, str):
                    unavailable[mode] = res
                    print(f"  {mode}: {res}", flush=True)
                    continue
                print(f"  measured {mode:8s} ranks={world} rate={rate:9s} ({time.monotonic() - t0:.0f} s)", flush=True)
                for pat in PATTERNS:
                    med = statistics.median(res["times"][pat])
                    rows.append({
                        "mode": mode, "ranks": world, "rate": rate, "pattern": pat, "mib_per_peer": mib,
                        "median_s": med, "min_s": min(res["times"][pat]), "max_s": max(res["times"][pat]),
                        "gbps": res["egress_bytes"][pat] / med / 1e9,
                    })  # fmt: skip
    _print_table(rows)
    for mode, why in unavailable.items():
        print(f"\nmode {mode} not measured: {why}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _print_table(rows: list[dict]) -> None:
    print("\nGB/s = bytes sent to other ranks per rank / step time (median); x rate = GB/s / configured rate")
    print("| ranks | rate | pattern | mode | MiB/peer | median ms (min-max) | GB/s | x rate |")
    print("|---|---|---|---|---|---|---|---|")
    key = lambda r: (r["ranks"], ["unlimited", "1gbit", "400mbit"].index(r["rate"]) if r["rate"] in ("unlimited", "1gbit", "400mbit") else 9, r["rate"], PATTERNS.index(r["pattern"]), r["mode"])  # noqa: E731,E501
    for r in sorted(rows, key=key):
        rate_bytes = _parse_rate(r["rate"])
        ratio = f"{r['gbps'] * 1e9 / rate_bytes:.2f}" if rate_bytes else "-"
        spread = f"{r['median_s'] * 1e3:.0f} ({r['min_s'] * 1e3:.0f}-{r['max_s'] * 1e3:.0f})"
        print(f"| {r['ranks']} | {r['rate']} | {r['pattern']} | {r['mode']} | {r['mib_per_peer']:g} | {spread} | {r['gbps']:.3f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
