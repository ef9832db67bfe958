"""Run a benchmark script's own ``--worker`` mode under torchrun and read back its result.

``run_worker(script, nproc, port, args, timeout)`` launches ``python -m
torch.distributed.run --nproc-per-node nproc --master-port port script --worker *args``
(gloo on loopback, one OpenMP thread per rank, the repository on ``PYTHONPATH``) and
returns the JSON that rank 0 printed on a line starting with ``RESULT ``. A rank that
fails, or no such line, raises ``RuntimeError`` with the tails of stdout and stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_worker(script: str, nproc: int, port: int, args: list[str], timeout: float) -> Any:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(port),
           script, "--worker", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{' '.join(args)}: FAILED (rc {proc.returncode})\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])
