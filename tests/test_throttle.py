"""Tests for tests/distributed.py (the multi-process harness) and for
fxdisag/runtime/throttle.py (the in-process link throttle)."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from distributed import DistributedTestError, run_distributed

pytestmark = pytest.mark.dist


# --------------------------------------------------------------------------
# harness


def _allreduce_body(rank: int, world_size: int, n: int) -> dict:
    t = torch.full((n,), float(rank + 1))
    dist.all_reduce(t)
    return {
        "sum": t,
        "threads": torch.get_num_threads(),
        "env_rank": os.environ["RANK"],
        "extra": os.environ.get("FXDISAG_TEST_VAR"),
        "pid": os.getpid(),
    }


def test_harness_returns_per_rank_values() -> None:
    out = run_distributed(_allreduce_body, 2, 3, timeout=60, env={"FXDISAG_TEST_VAR": "x"})
    # 1 + 2, computed by hand
    assert [o["sum"].tolist() for o in out] == [[3.0, 3.0, 3.0]] * 2
    assert [o["threads"] for o in out] == [1, 1]
    assert [o["env_rank"] for o in out] == ["0", "1"]
    assert [o["extra"] for o in out] == ["x", "x"]
    for o in out:
        assert not _pid_alive(o["pid"])


def _sleep_forever_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        while True:
            time.sleep(1)
    return os.getpid()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _children_pids() -> set[int]:
    me = os.getpid()
    pids = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[1]) == me and fields[0] != "Z":
                pids.add(int(d))
    return pids


def test_harness_timeout_kills_and_names_rank() -> None:
    before = _children_pids()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish"):
        run_distributed(_sleep_forever_on_rank1, 2, timeout=8)
    elapsed = time.monotonic() - t0
    assert elapsed < 8 + 8, elapsed  # deadline plus kill/join slack
    assert _children_pids() - before == set(), "orphan rank processes left behind"


def _raise_on_rank1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom from rank one")
    dist.barrier()  # rank 0 blocks on the dead peer: must be killed, not waited for


def test_harness_reports_failing_rank_traceback() -> None:
    before = _children_pids()
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_raise_on_rank1, 2, timeout=60)
    assert time.monotonic() - t0 < 20
    msg = str(info.value)
    assert "root cause most likely on rank 1" in msg
    assert "----- rank 1 -----" in msg
    assert "ValueError: boom from rank one" in msg
    assert "_raise_on_rank1" in msg  # the traceback, not just the message
    assert _children_pids() - before == set()


def _exit_hard(rank: int, world_size: int) -> None:
    if rank == 0:
        os._exit(3)
    dist.barrier()


def test_harness_detects_rank_dying_without_report() -> None:
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_exit_hard, 2, timeout=60)
    msg = str(info.value)
    assert "root cause most likely on rank 0" in msg
    assert "rank 0 exited with code 3" in msg
