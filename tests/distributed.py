"""Multi-process test harness: run a function on N gloo ranks, never hang.

Contract of ``run_distributed(fn, world_size, *args, timeout=120.0, env=None, grace=2.0)``:

- spawns ``world_size`` processes (multiprocessing "spawn" context); each one
  initialises ``torch.distributed`` with gloo over a free localhost TCP port,
  sets ``torch.set_num_threads(1)``, calls ``fn(rank, world_size, *args)``,
  destroys the process group and ships the return value back;
- returns the per-rank return values as a list indexed by rank;
- ``fn`` must be a module-level (picklable) function; return values must be
  picklable (tensors are fine: they are pickled by value, not through shared
  memory, so a child may exit before the parent reads its result);
- the whole run has one hard deadline (``timeout`` seconds): on expiry every
  child is killed and ``TimeoutError`` names the ranks that did not finish;
- if a rank raises, or dies without reporting, the parent waits a short grace
  period (``grace`` seconds) for the other ranks' errors (a peer's failure
  usually shows up as a secondary gloo error on the others), kills the rest and
  raises ``DistributedTestError`` quoting the traceback of every failed rank, the
  likely root cause first (errors saying a peer went away are listed last); its
  ``tracebacks`` attribute maps each failed rank to its traceback text (fault
  tests read the survivors' errors there). SIGKILL also ends a stopped
  (SIGSTOPped) child;
- no orphans: children are killed on every exit path of the parent (including
  KeyboardInterrupt), are daemonic, and on Linux also ask the kernel to kill
  them if the parent dies (PR_SET_PDEATHSIG).

Environment of each child: the parent's, plus ``OMP_NUM_THREADS=1``,
``GLOO_SOCKET_IFNAME=lo``, ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` (what torchrun sets), then ``env`` on top.
The environment is applied before the child imports anything, so variables
read at import time (OMP_NUM_THREADS, FXDISAG_*) take effect.

Usage in a test::

    def _body(rank, world_size, n):          # module level, so it pickles
        t = torch.full((n,), float(rank))
        dist.all_reduce(t)
        return t

    @pytest.mark.dist
    def test_sum():
        out = run_distributed(_body, 2, 4, timeout=60)
        assert out[0].tolist() == [1.0] * 4
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

# A failing rank usually takes its peers down with secondary errors within a
# second or so; wait this long to collect them before killing the survivors.
_ERROR_GRACE_S = 2.0
# Retries when another process grabbed the chosen port between our probe and
# rank 0's bind (several engineers run tests on this machine at once).
_PORT_RETRIES = 3


class DistributedTestError(RuntimeError):
    """One or more ranks raised (or died); the message holds their tracebacks,
    ``tracebacks`` the same per rank."""

    def __init__(self, message: str, tracebacks: dict[int, str] | None = None):
        super().__init__(message)
        self.tracebacks = dict(tracebacks or {})


@dataclass
class _RankReport:
    """What a child sends back: its rank, whether it succeeded, and the payload
    (pickled return value on success, formatted traceback on failure)."""

    rank: int
    ok: bool
    payload: bytes | str


@dataclass
class _Outcome:
    """Result of one attempt: per-rank values on success, else the failed
    ranks' tracebacks, the order they failed in, and the ranks still running."""

    values: list[Any] | None
    tracebacks: dict[int, str]
    failure_order: list[int]
    unfinished: list[int]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux only: SIGKILL this process when its parent dies, so that a parent
    killed with SIGKILL (which runs no cleanup) leaves no orphan ranks."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except OSError:
        pass  # no libc.so.6 (e.g. musl): the daemon flag still covers normal exits


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple,
    timeout: float,
    results: "mp.Queue[_RankReport]",
) -> None:
    _die_with_parent()
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        # On failure we report without destroying the group: destroy may block
        # on peers that are themselves stuck, and the parent kills us anyway.
        value = fn(rank, world_size, *args)
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        dist.destroy_process_group()
        results.put(_RankReport(rank, True, payload))
    except BaseException:  # noqa: BLE001 - everything must reach the parent
        results.put(_RankReport(rank, False, traceback.format_exc()))


@contextlib.contextmanager
def _environ(overrides: dict[str, str]) -> Iterator[None]:
    """Temporarily set os.environ; a spawned child copies it at start()."""
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kill_all(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)


def _looks_like_port_clash(tracebacks: dict[int, str]) -> bool:
    text = "\n".join(tracebacks.values()).lower()
    return "address already in use" in text or "eaddrinuse" in text


# gloo's wording when the *peer* went away: such an error is a consequence, so
# the report lists these ranks after the ones that failed on their own.
_SECONDARY_MARKERS = ("closed by peer", "reset by peer", "remote worker")


def _format_failure(
    tracebacks: dict[int, str], order: list[int], unfinished: list[int]
) -> str:
    def is_secondary(r: int) -> bool:
        return any(m in tracebacks[r] for m in _SECONDARY_MARKERS)

    order = sorted(order, key=is_secondary)  # stable: arrival order otherwise
    lines = [
        f"ranks {order} failed (root cause most likely on rank {order[0]}; "
        "errors about a lost peer are listed last)"
    ]
    if unfinished:
        lines.append(f"ranks {unfinished} had not finished and were killed")
    for r in order:
        lines.append(f"\n----- rank {r} -----\n{tracebacks[r].rstrip()}")
    return "\n".join(lines)


def _run_once(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    timeout: float,
    env: dict[str, str],
    port: int,
    grace: float = _ERROR_GRACE_S,
) -> "_Outcome":
    """One attempt; raises TimeoutError if no rank failed but some never finished."""
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    procs = []
    deadline = time.monotonic() + timeout
    try:
        for rank in range(world_size):
            child_env = {
                "OMP_NUM_THREADS": "1",
                "GLOO_SOCKET_IFNAME": "lo",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                **env,
            }
            p = ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, port, args, timeout, results),
                name=f"rank{rank}",
                daemon=True,
            )
            with _environ(child_env):
                p.start()
            procs.append(p)

        values: dict[int, bytes] = {}
        tracebacks: dict[int, str] = {}
        order: list[int] = []
        error_deadline: float | None = None
        while len(values) + len(tracebacks) < world_size:
            now = time.monotonic()
            limit = deadline if error_deadline is None else min(deadline, error_deadline)
            if now >= limit:
                break
            try:
                rep: _RankReport = results.get(timeout=min(0.2, limit - now))
            except queue_mod.Empty:
                # A rank that died without reporting (segfault, os._exit, OOM
                # kill) will never report: count it as failed. Re-check the
                # queue first, since it may have reported just before exiting.
                for r, p in enumerate(procs):
                    if (
                        r not in values
                        and r not in tracebacks
                        and p.exitcode is not None
                        and results.empty()
                    ):
                        time.sleep(0.1)  # let its queue feeder thread flush
                        if results.empty():
                            tracebacks[r] = (
                                f"rank {r} exited with code {p.exitcode} "
                                "without reporting a result or an exception (its stderr above "
                                "shows why; if fn could not be unpickled, define it at "
                                "module level in an importable module)"
                            )
                            order.append(r)
                if tracebacks and error_deadline is None:
                    error_deadline = time.monotonic() + grace
                continue
            if rep.ok:
                values[rep.rank] = rep.payload  # type: ignore[assignment]
            else:
                tracebacks[rep.rank] = rep.payload  # type: ignore[assignment]
                order.append(rep.rank)
                if error_deadline is None:
                    error_deadline = time.monotonic() + grace

        unfinished = [r for r in range(world_size) if r not in values and r not in tracebacks]
        if tracebacks:
            return _Outcome(None, tracebacks, order, unfinished)
        if unfinished:
            raise TimeoutError(
                f"run_distributed({getattr(fn, '__qualname__', fn)!r}, world_size="
                f"{world_size}): ranks {unfinished} did not finish within "
                f"{timeout:.1f} s and were killed; ranks {sorted(values)} finished. "
                "Look for a collective or recv that one rank never matched, or "
                "raise the timeout= argument."
            )
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        return _Outcome([pickle.loads(values[r]) for r in range(world_size)], {}, [], [])
    finally:
        _kill_all(procs)
        results.close()
        results.join_thread()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    env: dict[str, str] | None = None,
    grace: float = _ERROR_GRACE_S,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks and
    return the per-rank results (see the module docstring for the contract)."""
    if world_size < 1:
        raise ValueError(f"run_distributed: world_size must be >= 1, got {world_size}")
    if timeout <= 0:
        raise ValueError(f"run_distributed: timeout must be > 0 seconds, got {timeout}")
    env = {k: str(v) for k, v in (env or {}).items()}
    for attempt in range(_PORT_RETRIES):
        outcome = _run_once(fn, world_size, args, timeout, env, _free_port(), grace)
        if outcome.values is not None:
            return outcome.values
        if not (_looks_like_port_clash(outcome.tracebacks) and attempt + 1 < _PORT_RETRIES):
            raise DistributedTestError(
                f"run_distributed({getattr(fn, '__qualname__', fn)!r}, world_size="
                f"{world_size}): "
                + _format_failure(outcome.tracebacks, outcome.failure_order, outcome.unfinished),
                outcome.tracebacks,
            )
    raise AssertionError("unreachable")
