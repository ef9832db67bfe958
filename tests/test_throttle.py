"""Tests for tests/distributed.py (the multi-process harness) and for
fxdisag/testing/throttle.py (the in-process link throttle)."""

from __future__ import annotations

import os
import time
import warnings

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


def _children_pids() -> set[tuple[int, str]]:
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
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                # multiprocessing's resource tracker is long-lived by design
                if "resource_tracker" not in cmd:
                    pids.add((int(d), cmd[:200]))
    return pids


def test_harness_timeout_kills_and_names_rank() -> None:
    before = _children_pids()
    t0 = time.monotonic()
    # rank 0 finishes unless the machine is so loaded that even its start
    # takes 8 s; either way rank 1 must be named
    with pytest.raises(TimeoutError, match=r"ranks \[(0, )?1\] did not finish"):
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


# --------------------------------------------------------------------------
# throttle: parsing (no processes)

from fxdisag.testing.throttle import (  # noqa: E402
    ENV_VAR,
    LinkThrottle,
    install_from_env,
    installed,
    parse_rate,
    parse_time,
    throttle_from_spec,
)


@pytest.mark.parametrize(
    "text, bytes_per_s",
    [
        ("1gbit", 125e6),
        ("400mbit", 50e6),
        ("8kbit", 1000.0),
        ("800", 100.0),  # bare number: bits/s, as in tc
        ("2mbps", 2e6),  # tc "bps" is bytes/s
        ("1.5GBit", 187.5e6),
    ],
)
def test_parse_rate(text: str, bytes_per_s: float) -> None:
    assert parse_rate(text) == pytest.approx(bytes_per_s)


def test_parse_rate_and_time_errors() -> None:
    assert parse_rate("unlimited") is None
    assert parse_time("50us") == pytest.approx(50e-6)
    assert parse_time("2ms") == pytest.approx(2e-3)
    assert parse_time("0.5") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'1 gigabit'.*tc unit"):
        parse_rate("1 gigabit")
    with pytest.raises(ValueError, match="must be > 0"):
        parse_rate("0mbit")
    with pytest.raises(ValueError, match="'5 minutes'"):
        parse_time("5 minutes")


def test_throttle_from_spec() -> None:
    t = throttle_from_spec("400mbit,latency=50us,egress=per_link")
    assert t is not None
    assert (t.bandwidth, t.latency, t.egress) == (50e6, pytest.approx(50e-6), "per_link")
    assert throttle_from_spec("unlimited") is None
    with pytest.raises(ValueError, match="unknown option 'jitter=1ms'"):
        throttle_from_spec("1gbit,jitter=1ms")
    with pytest.raises(ValueError, match="egress must be"):
        throttle_from_spec("1gbit,egress=fast")
    assert install_from_env({}) is None
    assert install_from_env({ENV_VAR: "unlimited"}) is None
    assert installed() is None
    with pytest.raises(ValueError, match="bandwidth_bytes_per_s must be > 0"):
        LinkThrottle(0)


# --------------------------------------------------------------------------
# throttle: 2-3 gloo ranks


def _warm_up(rank: int, world_size: int) -> None:
    # the first transfer after init can be 100x slow (see the notes)
    t = torch.zeros(1 << 18)
    for peer in range(world_size):
        if peer != rank:
            w = dist.irecv(torch.empty_like(t), peer)
            dist.isend(t, peer).wait()
            w.wait()
    dist.barrier()


def _throughput_body(
    rank: int, world_size: int, rate: float, latency: float, total: int, nmsg: int
) -> tuple[float, float]:
    """Returns (best time to receive ``total`` bytes in ``nmsg`` messages,
    best time to receive one 4-byte message), measured on rank 1."""
    from fxdisag.testing.throttle import LinkThrottle

    _warm_up(rank, world_size)
    n = total // nmsg // 4
    throttle = LinkThrottle(rate, latency_s=latency)
    tiny = float("inf")
    for _ in range(2):
        buf = torch.zeros(1)
        dist.barrier()
        t0 = time.monotonic()
        if rank == 0:
            throttle.isend(buf + 1, 1).wait()
        else:
            dist.irecv(buf, 0).wait()
            tiny = min(tiny, time.monotonic() - t0)
            assert buf.item() == 1.0
    best = float("inf")
    for _ in range(2):
        bufs = [torch.full((n,), float(i)) for i in range(nmsg)]
        dist.barrier()
        t0 = time.monotonic()
        if rank == 0:
            for w in [throttle.isend(b, 1) for b in bufs]:
                w.wait()
        else:
            works = [dist.irecv(b, 0) for b in bufs]
            for w in works:
                w.wait()
            best = min(best, time.monotonic() - t0)
            assert [b[0].item() for b in bufs] == [float(i) for i in range(nmsg)]
    throttle.close()
    return best, tiny


def test_throttle_throughput_and_latency_match_setting() -> None:
    rate, latency, total = 50e6, 0.03, 8 << 20  # 400 Mbit/s, 30 ms, 8 MiB in 4 messages
    bulk, tiny = run_distributed(_throughput_body, 2, rate, latency, total, 4, timeout=60)[1]
    # messages are back to back on the link; latency is paid once, after the last
    assert bulk == pytest.approx(total / rate + latency, rel=0.15), bulk  # 0.198 s by hand
    assert tiny == pytest.approx(latency + 4 / rate, rel=0.15), tiny


def test_throttle_clock_model_shared_and_per_link() -> None:
    from fxdisag.testing.throttle import _Link

    # 1 MB/s, 20 ms latency. At t=10 s: 1000 B to rank 1, 2000 B to rank 2,
    # 500 B to rank 1; at t=10.1 s (NIC idle again) 1000 B to rank 2.
    posts = [(10.0, 1, 1000), (10.0, 2, 2000), (10.0, 1, 500), (10.1, 2, 1000)]
    expected = {
        # one NIC: transmissions end at 10.001, 10.003, 10.0035, 10.101
        "shared": [10.021, 10.023, 10.0235, 10.121],
        # a wire per destination: rank 1 ends at 10.001 then 10.0015, rank 2 at 10.002
        "per_link": [10.021, 10.022, 10.0215, 10.121],
    }
    for egress, want in expected.items():
        t = LinkThrottle(1e6, latency_s=0.02, egress=egress)  # type: ignore[arg-type]
        links = {1: _Link(1), 2: _Link(2)}
        got = [t._reserve(links[d], nb, now) for now, d, nb in posts]
        assert got == pytest.approx(want, abs=1e-9), egress
        assert (links[1].stats.bytes, links[2].stats.messages) == (1500, 2)


def _ordering_body(rank: int, world_size: int, nmsg: int) -> list[float]:
    from fxdisag.testing.throttle import LinkThrottle

    _warm_up(rank, world_size)
    sizes = [(i * 7919 % 13 + 1) * 256 for i in range(nmsg)]  # irregular, big and small mixed
    with LinkThrottle(20e6, latency_s=1e-3):  # installed: dist.isend is throttled
        assert dist.isend.__module__ == "fxdisag.testing.throttle"
        assert dist.batch_isend_irecv.__module__ == "fxdisag.testing.throttle"
        assert dist.send.__module__ == "fxdisag.testing.throttle"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            x = torch.full((2,), float(rank))
            y = torch.empty(2)
            dist.all_to_all_single(y, x)
            dist.all_to_all_single(y, x)
        assert y.tolist() == [0.0, 1.0]  # still the real collective
        assert [str(w.message).split(" is ")[0] for w in caught] == [
            "torch.distributed.all_to_all_single"  # once, not per call
        ]
        half = nmsg // 2
        if rank == 0:
            msgs = [torch.full((n,), float(i)) for i, n in enumerate(sizes)]
            for i in range(10):  # blocking sends are paced too
                dist.send(msgs[i], 1, tag=i % 3)
            works = [dist.isend(m, 1, tag=i % 3) for i, m in enumerate(msgs[:half]) if i >= 10]
            ops = [dist.P2POp(dist.isend, m, 1, tag=(half + i) % 3) for i, m in enumerate(msgs[half:])]
            works += dist.batch_isend_irecv(ops)
            for w in works:
                w.wait()
            return []
        bufs = [torch.empty(n) for n in sizes]
        ops = [dist.P2POp(dist.irecv, b, 0, tag=i % 3) for i, b in enumerate(bufs)]
        t0 = time.monotonic()
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        elapsed = time.monotonic() - t0
        whole = all(b.min().item() == b.max().item() for b in bufs)
        return [b.mean().item() for b in bufs] + [float(whole), elapsed, 4.0 * sum(sizes)]


def test_throttle_preserves_order_and_patches_dist() -> None:
    import fxdisag.testing.throttle as th

    real = dist.isend
    out = run_distributed(_ordering_body, 2, 200, timeout=60)
    *means, whole, elapsed, nbytes = out[1]
    assert means == [float(i) for i in range(200)]
    assert whole == 1.0  # every message arrived whole, not mixed with another
    # the dist.send, dist.isend and batch_isend_irecv parts were all paced
    assert elapsed >= 0.95 * nbytes / 20e6, (elapsed, nbytes)
    assert dist.isend is real and th.installed() is None  # the parent was never patched


def _overlap_body(rank: int, world_size: int, rate: float) -> dict:
    from fxdisag.testing.throttle import LinkThrottle

    _warm_up(rank, world_size)
    a = torch.randn(256, 256)

    def compute(iters: int) -> float:
        t0 = time.monotonic()
        for _ in range(iters):
            a @ a
        return time.monotonic() - t0

    # calibrate on rank 0 so that compute alone is about 0.3 s
    iters = torch.tensor([0])
    if rank == 0:
        compute(20)
        per = compute(50) / 50
        iters[0] = max(1, int(0.3 / per))
    dist.broadcast(iters, 0)
    nbytes = int(0.3 * rate) // 4 * 4
    throttle = LinkThrottle(rate)
    res: dict[str, float] = {}
    for phase in ("comm", "compute", "both", "comm", "compute", "both"):
        buf = torch.zeros(nbytes // 4)
        dist.barrier()
        if rank == 1:
            if phase != "compute":
                dist.irecv(buf, 0).wait()
            continue
        t0 = time.monotonic()
        work = throttle.isend(buf, 1) if phase != "compute" else None
        if phase != "comm":
            compute(int(iters))
        if work is not None:
            work.wait()
        res[phase] = min(res.get(phase, float("inf")), time.monotonic() - t0)
    throttle.close()
    return res


def test_throttle_lets_compute_overlap_transfer() -> None:
    res = run_distributed(_overlap_body, 2, 50e6, timeout=60)[0]
    comm, comp, both = res["comm"], res["compute"], res["both"]
    assert comm == pytest.approx(0.3, rel=0.15), res
    # overlapped: about max(comm, compute), well under the sum
    assert max(comm, comp) * 0.95 <= both <= 0.8 * (comm + comp), res
