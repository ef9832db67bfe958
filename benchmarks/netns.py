"""Run N ranks of a training script as N "nodes" joined by rate-limited NICs.

Contract:

- ``python benchmarks/netns.py --nproc N --rate 1gbit -- script.py args...``
  (or ``run_in_namespaces([...], nproc=N, rate="1gbit")``) starts one process
  per rank, each in its own Linux network namespace, with the environment
  torchrun would give it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``) plus ``GLOO_SOCKET_IFNAME``, so the same
  script runs unchanged under torchrun and here.
- Topology: a "switch" namespace with a bridge; per rank a veth pair from the
  rank's namespace (interface ``nic0``, address 10.99.0.(rank+1)/24) into the
  bridge. ``tc tbf`` limits both ends of each pair, so each rank's NIC is
  limited in both directions (egress and ingress), as a per-node NIC is.
  ``--rate unlimited`` skips tbf.
- Addresses exist only inside these namespaces; nothing is configured in the
  namespace the launcher runs in.
- Waits for all ranks with a timeout. If a rank fails, the others get
  ``--grace`` seconds to finish, then are killed; the exit code is the first
  failing rank's (124 on timeout).
- Always deletes its namespaces: on success, on errors, on Ctrl-C/SIGTERM.
  Namespaces left by a launcher that was SIGKILLed (their names embed its
  pid) are deleted on the next run.
- Needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root). Without them it exits with
  code 3 and a message pointing to the in-process throttle:
  ``FXDISAG_THROTTLE=1gbit torchrun --nproc-per-node N script.py``
  (the runtime reads ``FXDISAG_THROTTLE``; see fxdisag/testing/throttle.py).

The children also get ``FXDISAG_EMULATION`` (e.g. ``netns rate=1gbit
burst=128kb``) so a benchmark can report which emulation it ran under, and
``OMP_NUM_THREADS=1`` unless set. ``LOCAL_RANK`` is 0 and
``LOCAL_WORLD_SIZE`` 1: every namespace is a node with one process.

Pseudo-code::

    ip netns add fxd<pid>sw; bridge br0 in it
    for rank r:
        ip netns add fxd<pid>r<r>
        ip link add nic0 netns r<r> type veth peer name p<r> netns sw; p<r> -> br0
        address 10.99.0.(r+1)/24 on nic0; tbf on nic0 and on p<r>
    for rank r: ip netns exec fxd<pid>r<r> env RANK=r ... python script.py args
    wait (timeout); finally: kill what is left, ip netns del every namespace
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

SUBNET = "10.99.0"
NIC = "nic0"
_NS_RE = re.compile(r"^fxd(\d+)(?:sw|r\d+)$")
EXIT_NO_NETNS = 3
EXIT_TIMEOUT = 124


class NetnsUnavailable(RuntimeError):
    """Network namespaces or tc cannot be used here (usually: not root)."""


def _fallback_hint(nproc: int, rate: str) -> str:
    return (
        "Use the in-process link throttle instead, which needs no privileges: "
        f"FXDISAG_THROTTLE={rate} torchrun --standalone --nproc-per-node {nproc} "
        "<script> (the fxdisag runtime installs fxdisag.testing.throttle when "
        "FXDISAG_THROTTLE is set; it paces sends only and does not model "
        "receiver-side contention)."
    )


@dataclass
class Topology:
    """Names of what one launcher run created (for cleanup and for the ranks)."""

    tag: str
    nproc: int
    namespaces: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"fxd{self.tag}sw"

    def rank_ns(self, rank: int) -> str:
        return f"fxd{self.tag}r{rank}"

    @staticmethod
    def address(rank: int) -> str:
        return f"{SUBNET}.{rank + 1}"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    _run(cmd)


def _run(cmd: list[str]) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, cmd, res.stdout, res.stderr)


def _delete_namespace(ns: str) -> None:
    # Kill anything still running inside (only our ranks can be there), then
    # delete: deleting the namespace removes the veths and the bridge in it.
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in res.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cleanup_stale() -> list[str]:
    """Delete namespaces left by launchers that died without cleaning up
    (names fxd<pid>..., pid no longer alive). Returns the names deleted."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    deleted = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NS_RE.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _delete_namespace(name)
            deleted.append(name)
    return deleted


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1 << 20, "mb": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30, "kbit": 128, "mbit": 1 << 17, "gbit": 1 << 27}  # fmt: skip
# tbf passes no packet larger than its bucket: a burst below one full frame
# (1500 B MTU + Ethernet header) stalls the link forever.
_MIN_BURST_BYTES = 1600


def parse_size(text: str) -> int:
    """A tc size ("128kb", "1mb", "64kbit"; k = 1024, as in tc) in bytes."""
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", text.strip().lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"netns: size {text!r}: expected a number with a tc unit, e.g. '128kb'")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _tbf(ns: str, dev: str, rate: str, burst: str, latency: str) -> None:
    _run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root",
          "tbf", "rate", rate, "burst", burst, "latency", latency])  # fmt: skip


def create_topology(
    nproc: int, rate: str, burst: str = "128kb", tbf_latency: str = "100ms"
) -> Topology:
    """Create the namespaces, bridge, veths and tbf qdiscs. On failure,
    whatever was created is deleted and NetnsUnavailable (no privileges, no
    ip/tc) or CalledProcessError (anything else) is raised."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"'{tool}' (iproute2) is not installed.")
    topo = Topology(tag=str(os.getpid()), nproc=nproc)
    try:
        try:
            _run(["ip", "netns", "add", topo.switch])
        except subprocess.CalledProcessError as e:
            raise NetnsUnavailable(
                f"cannot create a network namespace ('ip netns add' said: "
                f"{e.stderr.strip()}); this needs CAP_NET_ADMIN and CAP_SYS_ADMIN (root)."
            ) from e
        topo.namespaces.append(topo.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=topo.switch)
        _ip("link", "set", "br0", "up", ns=topo.switch)
        for r in range(nproc):
            ns, port = topo.rank_ns(r), f"p{r}"
            _run(["ip", "netns", "add", ns])
            topo.namespaces.append(ns)
            _ip("link", "add", NIC, "netns", ns, "type", "veth", "peer", "name", port,
                "netns", topo.switch)  # fmt: skip
            _ip("link", "set", port, "master", "br0", ns=topo.switch)
            _ip("link", "set", port, "up", ns=topo.switch)
            _ip("addr", "add", f"{topo.address(r)}/24", "dev", NIC, ns=ns)
            _ip("link", "set", NIC, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            if rate != "unlimited":
                try:
                    _tbf(ns, NIC, rate, burst, tbf_latency)  # the rank's egress
                    _tbf(topo.switch, port, rate, burst, tbf_latency)  # its ingress
                except subprocess.CalledProcessError as e:
                    raise ValueError(
                        f"netns: tc tbf failed ({e.stderr.strip()}) for rate={rate!r} "
                        f"burst={burst!r} latency={tbf_latency!r}; check the values "
                        "(tc units, e.g. 1gbit, 128kb, 100ms) and that sch_tbf is available."
                    ) from e
    except BaseException:
        delete_topology(topo)
        raise
    return topo


def delete_topology(topo: Topology) -> None:
    for ns in reversed(topo.namespaces):
        _delete_namespace(ns)
    topo.namespaces.clear()


def _command(cmd: list[str]) -> list[str]:
    if not cmd:
        raise ValueError("netns: no command given; usage: netns.py [options] -- script.py args")
    if cmd[0].endswith(".py") or cmd[0] in ("-m", "-c"):
        return [sys.executable, *cmd]
    return list(cmd)


def _rank_env(topo: Topology, rank: int, port: int, rate: str, burst: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(topo.nproc),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        GROUP_RANK=str(rank),
        MASTER_ADDR=topo.address(0),
        MASTER_PORT=str(port),
        GLOO_SOCKET_IFNAME=NIC,
        FXDISAG_EMULATION=(
            f"netns rate={rate}" + (f" burst={burst}" if rate != "unlimited" else "")
        ),
    )
    return env


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated(f"signal {signum}")


def run_in_namespaces(
    cmd: list[str],
    nproc: int,
    rate: str = "1gbit",
    burst: str = "128kb",
    tbf_latency: str = "100ms",
    timeout: float = 600.0,
    grace: float = 5.0,
    master_port: int = 29500,
) -> int:
    """Run ``cmd`` once per rank in its own namespace (see the module
    docstring). Returns 0 if every rank exited with 0, else the first failing
    rank's exit code (124 on timeout). Raises NetnsUnavailable without
    privileges."""
    if nproc < 1 or nproc > 250:
        raise ValueError(f"netns: --nproc must be in 1..250, got {nproc}")
    if os.environ.get("FXDISAG_THROTTLE", "").strip() not in ("", "unlimited"):
        raise ValueError(
            "netns: FXDISAG_THROTTLE is set, which would throttle a second time inside "
            "the shaped namespaces; unset it (use netns.py OR the in-process throttle)."
        )
    if rate != "unlimited" and parse_size(burst) < _MIN_BURST_BYTES:
        raise ValueError(
            f"netns: --burst {burst!r} is below one frame ({_MIN_BURST_BYTES} B); tbf "
            "would pass nothing. Use e.g. 128kb."
        )
    argv = _command(cmd)
    for name in cleanup_stale():
        print(f"netns: deleted stale namespace {name} (its launcher is gone)", file=sys.stderr)
    old_handlers = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    topo: Topology | None = None
    procs: list[subprocess.Popen] = []
    try:
        topo = create_topology(nproc, rate, burst, tbf_latency)
        for r in range(nproc):
            procs.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", topo.rank_ns(r), *argv],
                    env=_rank_env(topo, r, master_port, rate, burst),
                    start_new_session=True,  # so that killpg reaches the rank's children
                )
            )
        deadline = time.monotonic() + timeout
        failed: tuple[int, int] | None = None  # (rank, exit code) of the first failure
        fail_deadline = float("inf")
        while True:
            codes = [p.poll() for p in procs]
            if failed is None:
                for r, c in enumerate(codes):
                    if c not in (None, 0):
                        failed, fail_deadline = (r, c), time.monotonic() + grace
                        break
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            if now > deadline:
                running = [r for r, c in enumerate(codes) if c is None]
                print(f"netns: timeout after {timeout:.0f} s; killing ranks {running}", file=sys.stderr)
                _kill(procs)
                return EXIT_TIMEOUT
            if now > fail_deadline:
                running = [r for r, c in enumerate(codes) if c is None]
                print(
                    f"netns: rank {failed[0]} exited with {failed[1]}; killing ranks {running}",  # type: ignore[index]
                    file=sys.stderr,
                )
                _kill(procs)
                break
            time.sleep(0.05)
        if failed is not None:
            return failed[1] if failed[1] > 0 else 128 - failed[1]
        return 0
    finally:
        _kill(procs)
        if topo is not None:
            delete_topology(topo)
        for s, h in old_handlers.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: netns.py [options] -- script.py [args...]  (see --help)", file=sys.stderr)
        if "-h" not in argv and "--help" not in argv:
            return 2
        own, cmd = argv, []
    else:
        i = argv.index("--")
        own, cmd = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(
        prog="netns.py",
        description="Run N ranks in network namespaces joined by tbf-limited veths.",
        epilog="Without root: use FXDISAG_THROTTLE=<rate> with torchrun instead.",
    )
    ap.add_argument("--nproc", type=int, required=True, help="number of ranks")
    ap.add_argument("--rate", default="1gbit", help="tc rate per NIC, or 'unlimited'")
    ap.add_argument("--burst", default="128kb", help="tbf burst (default 128kb)")
    ap.add_argument("--tbf-latency", default="100ms", help="tbf queue limit as latency")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    ap.add_argument("--grace", type=float, default=5.0, help="seconds before killing peers of a failed rank")
    ap.add_argument("--master-port", type=int, default=29500)
    args = ap.parse_args(own)
    try:
        return run_in_namespaces(
            cmd, args.nproc, args.rate, args.burst, args.tbf_latency, args.timeout,
            args.grace, args.master_port,
        )  # fmt: skip
    except NetnsUnavailable as e:
        print(f"netns: {e}\n{_fallback_hint(args.nproc, args.rate)}", file=sys.stderr)
        return EXIT_NO_NETNS
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    except (_Terminated, KeyboardInterrupt):
        print("netns: interrupted; namespaces deleted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
