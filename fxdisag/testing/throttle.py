"""In-process link throttle: emulate a bandwidth-limited NIC without root.

Contract:

- ``LinkThrottle(bandwidth_bytes_per_s, latency_s=0.0).isend(tensor, dst, group, tag)``
  returns a Work-like object at once; the real ``torch.distributed.isend`` is
  issued, from a background thread, at the message's emulated arrival time, and
  ``wait()`` returns once that real send was issued and has completed.
- Timing model (a store-and-forward NIC with a virtual clock)::

      on isend(msg):                            # in the caller's thread
          depart   = max(now, nic_free)
          nic_free = depart + msg.nbytes / bandwidth
          arrival  = nic_free + latency
          links[dst].fifo.put((arrival, msg))
      link thread for dst, forever:
          arrival, msg = fifo.get()             # FIFO: post order per destination
          sleep until arrival
          real_isend(msg)

  With ``egress="shared"`` (the default) there is one clock per process, shared
  by all destinations: a rank's sends to different peers share its NIC, as with
  ``tc tbf`` on the rank's veth in ``benchmarks/netns.py``. With
  ``egress="per_link"`` each destination has its own clock (a dedicated wire
  per peer, i.e. a full-bisection fabric with one NIC per peer).
- Per-destination FIFO: sends to one destination are issued in the order they
  were posted, whatever their sizes, so gloo's (source, tag) matching holds.
- Receives are never delayed. Receiver-side (incast) contention is not
  modelled: two ranks sending to a third at once each get the full rate.
  Collectives (``all_to_all_single``, ``all_reduce``, ...) are not throttled;
  while installed, ``all_to_all_single`` and ``all_to_all`` warn once
  (RuntimeWarning), since a step timed with them would be silently optimistic.
  Sends to self are not throttled.
- Fidelity (benchmarks/bench_links.py): a message is delivered when its real
  loopback send completes, i.e. emulated arrival + loopback copy time (a few
  ms for 8 MiB), so large bidirectional exchanges reach ~0.85-0.95 of the rate.
  gloo's half-duplex penalty when an isend is posted before the matching
  irecv is not reproduced (the real send is always issued late).
- ``install()`` (or ``with throttle:``) routes ``torch.distributed.isend``,
  the sends of ``torch.distributed.batch_isend_irecv`` and the blocking
  ``torch.distributed.send`` through the throttle in this process, so code that calls them through the module (``dist.isend``)
  needs no change. ``from torch.distributed import isend`` done before
  ``install()`` keeps the unthrottled function.

Environment: ``FXDISAG_THROTTLE`` selects this mode; ``install_from_env()``
reads it. Syntax, with rates and times in ``tc`` units::

    FXDISAG_THROTTLE=1gbit                       # rate only
    FXDISAG_THROTTLE=400mbit,latency=50us        # rate and one-way latency
    FXDISAG_THROTTLE=1gbit,egress=per_link       # a clock per destination
    FXDISAG_THROTTLE=unlimited                   # install nothing

Rates: ``bit kbit mbit gbit tbit`` (bits/s, powers of 1000) and ``bps kbps
mbps gbps tbps`` (bytes/s), as in tc(8); a bare number is bits/s, as in tc.
Times: ``s ms us`` (a bare number is seconds).
"""

from __future__ import annotations

import datetime
import os
import queue
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

ENV_VAR = "FXDISAG_THROTTLE"

Egress = Literal["shared", "per_link"]

_RATE_UNITS = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8, "tbit": 1e12 / 8,
    "bps": 1.0, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9, "tbps": 1e12,
}  # fmt: skip
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "msec": 1e-3, "us": 1e-6, "usec": 1e-6}


def parse_rate(text: str) -> float | None:
    """A tc-style rate ("1gbit", "400mbit", "50mbps") in bytes/s; None for
    "unlimited"."""
    s = text.strip().lower()
    if s in ("unlimited", "inf", "none"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", s)
    if not m or (m.group(2) and m.group(2) not in _RATE_UNITS):
        raise ValueError(
            f"rate {text!r}: expected a number with a tc unit "
            f"({', '.join(_RATE_UNITS)}), e.g. '1gbit', or 'unlimited'"
        )
    value = float(m.group(1)) * _RATE_UNITS[m.group(2) or "bit"]
    if value <= 0:
        raise ValueError(f"rate {text!r}: must be > 0 (use 'unlimited' for no limit)")
    return value


def parse_time(text: str) -> float:
    """A tc-style time ("100us", "2ms", "0.5s") in seconds."""
    s = text.strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)", s)
    if not m or (m.group(2) and m.group(2) not in _TIME_UNITS):
        raise ValueError(
            f"time {text!r}: expected a number with a unit ({', '.join(_TIME_UNITS)}), "
            "e.g. '50us'"
        )
    return float(m.group(1)) * _TIME_UNITS[m.group(2) or "s"]


@dataclass
class LinkStats:
    """Traffic through one destination link since the throttle was created."""

    messages: int = 0
    bytes: int = 0
    # Sum over messages of (real send issued - emulated arrival): how late the
    # link thread was; large values mean the emulation lost fidelity (CPU
    # starved, or the GIL held by long Python code).
    issue_lag_s: float = 0.0


class ThrottledWork:
    """Work-like handle of one throttled send (what ``dist.isend`` returns)."""

    def __init__(self, arrival: float) -> None:
        self.arrival = arrival  # emulated arrival time, time.monotonic() clock
        self._issued = threading.Event()
        self._real: Any = None
        self._error: BaseException | None = None

    def _set_issued(self, real: Any, error: BaseException | None) -> None:
        self._real, self._error = real, error
        self._issued.set()

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        """Block until the real send was issued and has completed. Re-raises
        an error raised by the real isend."""
        limit = None if timeout is None else timeout.total_seconds()
        if not self._issued.wait(limit):
            raise TimeoutError(
                f"throttled isend not issued within {limit} s (emulated arrival "
                f"{self.arrival - time.monotonic():+.3f} s from now)"
            )
        if self._error is not None:
            raise self._error
        if self._real is not None:
            return self._real.wait() if timeout is None else self._real.wait(timeout)
        return True

    def is_completed(self) -> bool:
        if not self._issued.is_set():
            return False
        if self._error is not None or self._real is None:
            return True
        return self._real.is_completed()

    def is_success(self) -> bool:
        return self.is_completed() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error


@dataclass
class _Message:
    tensor: torch.Tensor
    arrival: float
    send: Callable[[], Any]
    work: ThrottledWork


@dataclass
class _Link:
    """One destination: a FIFO drained by a daemon thread, plus its clock
    (used when egress is per_link)."""

    dst: int
    fifo: "queue.Queue[_Message | None]" = field(default_factory=queue.Queue)
    free_at: float = 0.0
    stats: LinkStats = field(default_factory=LinkStats)
    thread: threading.Thread | None = None


_installed: "LinkThrottle | None" = None
# The unpatched functions, captured at import (before any install()), so that
# a throttle never ends up calling a patched entry point.
_real_isend_at_import = c10d.isend
_real_send_at_import = c10d.send
_real_check_op = c10d._check_op


class LinkThrottle:
    """Paces this process's point-to-point sends at ``bandwidth_bytes_per_s``
    plus ``latency_s`` per message (see the module docstring)."""

    def __init__(
        self,
        bandwidth_bytes_per_s: float,
        latency_s: float = 0.0,
        egress: Egress = "shared",
    ) -> None:
        if not bandwidth_bytes_per_s > 0:
            raise ValueError(
                f"LinkThrottle: bandwidth_bytes_per_s must be > 0, got "
                f"{bandwidth_bytes_per_s!r} (for no limit, do not install a throttle)"
            )
        if latency_s < 0:
            raise ValueError(f"LinkThrottle: latency_s must be >= 0, got {latency_s!r}")
        if egress not in ("shared", "per_link"):
            raise ValueError(f"LinkThrottle: egress must be 'shared' or 'per_link', got {egress!r}")
        self.bandwidth = float(bandwidth_bytes_per_s)
        self.latency = float(latency_s)
        self.egress: Egress = egress
        self._lock = threading.Lock()
        self._nic_free_at = 0.0
        self._links: dict[int, _Link] = {}
        self._closed = False
        self._saved: dict[tuple[Any, str], Any] = {}

    def __repr__(self) -> str:
        return (
            f"LinkThrottle({self.bandwidth / 1e9:.4g} GB/s = {self.bandwidth * 8 / 1e9:.4g} "
            f"Gbit/s, latency={self.latency * 1e6:.0f} us, egress={self.egress})"
        )

    # -- sending ---------------------------------------------------------

    def isend(
        self,
        tensor: torch.Tensor,
        dst: int | None = None,
        group: dist.ProcessGroup | None = None,
        tag: int = 0,
        group_dst: int | None = None,
    ) -> ThrottledWork | Any:
        """Throttled ``torch.distributed.isend`` (same arguments). Sends to
        self, and calls on ranks outside ``group``, go straight to the real
        isend."""
        if self._closed:
            raise RuntimeError("LinkThrottle.isend: the throttle was closed")
        if (dst is None) == (group_dst is None):
            raise ValueError("LinkThrottle.isend: give exactly one of dst and group_dst")
        pg = group if group is not None else c10d._get_default_group()
        if dist.get_rank(pg) < 0:  # not a member: let the real isend warn and return None
            return _real_isend_at_import(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
        global_dst = dst if dst is not None else dist.get_global_rank(pg, group_dst)
        if global_dst == dist.get_rank():
            return _real_isend_at_import(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)

        nbytes = tensor.numel() * tensor.element_size()
        real_isend = _real_isend_at_import

        def send() -> Any:
            return real_isend(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)

        with self._lock:
            link = self._link(global_dst)
            work = ThrottledWork(self._reserve(link, nbytes, time.monotonic()))
            # enqueue under the lock: post order == FIFO order per link
            link.fifo.put(_Message(tensor, work.arrival, send, work))
        return work

    def _reserve(self, link: _Link, nbytes: int, now: float) -> float:
        """Advance the virtual clock for one message posted at ``now``;
        returns its arrival time. Caller holds the lock."""
        if self.egress == "shared":
            depart = max(now, self._nic_free_at)
            self._nic_free_at = depart + nbytes / self.bandwidth
            done = self._nic_free_at
        else:
            depart = max(now, link.free_at)
            link.free_at = depart + nbytes / self.bandwidth
            done = link.free_at
        link.stats.messages += 1
        link.stats.bytes += nbytes
        return done + self.latency

    def _link(self, dst: int) -> _Link:
        link = self._links.get(dst)
        if link is None:
            link = _Link(dst)
            link.thread = threading.Thread(
                target=self._drain, args=(link,), name=f"fxdisag-throttle-to-{dst}", daemon=True
            )
            self._links[dst] = link
            link.thread.start()
        return link

    def _drain(self, link: _Link) -> None:
        while True:
            msg = link.fifo.get()
            if msg is None:
                return
            delay = msg.arrival - time.monotonic()
            while delay > 0:
                time.sleep(delay)
                delay = msg.arrival - time.monotonic()
            link.stats.issue_lag_s += -delay
            try:
                real = msg.send()
            except BaseException as e:  # noqa: BLE001 - re-raised by wait()
                msg.work._set_issued(None, e)
            else:
                msg.work._set_issued(real, None)

    def batch_isend_irecv(self, p2p_op_list: list[dist.P2POp]) -> list[Any]:
        """``torch.distributed.batch_isend_irecv`` with the sends throttled and
        the receives posted at once, in list order."""
        c10d._check_p2p_op_list(p2p_op_list)
        works = []
        for op in p2p_op_list:
            if op.op is _real_isend_at_import or op.op is _throttled_isend_entry:
                w = self.isend(op.tensor, group=op.group, tag=op.tag, group_dst=op.group_peer)
            else:
                w = op.op(op.tensor, group=op.group, tag=op.tag, group_src=op.group_peer)
            if w is not None:
                works.append(w)
        return works

    def stats(self) -> dict[int, LinkStats]:
        """Per-destination traffic counters (global destination rank -> stats)."""
        with self._lock:
            return {d: LinkStats(**vars(link.stats)) for d, link in self._links.items()}

    # -- lifetime --------------------------------------------------------

    def close(self) -> None:
        """Issue every pending send (at its emulated time), then stop the link
        threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for link in self._links.values():
            link.fifo.put(None)
        for link in self._links.values():
            assert link.thread is not None
            link.thread.join()

    def install(self) -> "LinkThrottle":
        """Route ``torch.distributed.isend`` and ``batch_isend_irecv`` through
        this throttle in this process until ``uninstall()``."""
        global _installed
        if self._closed:
            raise RuntimeError("LinkThrottle.install: the throttle was closed; create a new one")
        if _installed is not None:
            raise RuntimeError(
                f"LinkThrottle.install: {_installed!r} is already installed in this "
                "process; uninstall() it first"
            )
        targets = {
            (dist, "isend"): _throttled_isend_entry,
            (c10d, "isend"): _throttled_isend_entry,
            (dist, "send"): _throttled_send_entry,
            (c10d, "send"): _throttled_send_entry,
            (dist, "batch_isend_irecv"): _throttled_batch_entry,
            (c10d, "batch_isend_irecv"): _throttled_batch_entry,
            # P2POp(op, ...) checks `op in [c10d.isend, c10d.irecv]`; accept
            # both the throttled entry point and an isend captured earlier.
            (c10d, "_check_op"): _check_op_accepting_both,
            (dist, "all_to_all_single"): _warn_unthrottled(c10d.all_to_all_single),
            (c10d, "all_to_all_single"): _warn_unthrottled(c10d.all_to_all_single),
            (dist, "all_to_all"): _warn_unthrottled(c10d.all_to_all),
            (c10d, "all_to_all"): _warn_unthrottled(c10d.all_to_all),
        }
        for (mod, name), new in targets.items():
            self._saved[(mod, name)] = getattr(mod, name)
            setattr(mod, name, new)
        _installed = self
        return self

    def uninstall(self) -> None:
        """Undo ``install()``; pending sends still go out (call ``close()`` to
        wait for them)."""
        global _installed
        if _installed is not self:
            raise RuntimeError("LinkThrottle.uninstall: this throttle is not installed")
        for (mod, name), old in self._saved.items():
            setattr(mod, name, old)
        self._saved.clear()
        _installed = None

    def __enter__(self) -> "LinkThrottle":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()
        self.close()


def _throttled_isend_entry(
    tensor: torch.Tensor,
    dst: int | None = None,
    group: dist.ProcessGroup | None = None,
    tag: int = 0,
    group_dst: int | None = None,
) -> Any:
    """Stands in for ``torch.distributed.isend`` while a throttle is installed."""
    if _installed is None:  # kept a reference past uninstall(): behave as the real one
        return _real_isend_at_import(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
    return _installed.isend(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)


_throttled_isend_entry.__name__ = "isend"  # P2POp.__repr__ looks for "send" in the name


def _throttled_send_entry(
    tensor: torch.Tensor,
    dst: int | None = None,
    group: dist.ProcessGroup | None = None,
    tag: int = 0,
    group_dst: int | None = None,
) -> None:
    """Stands in for the blocking ``torch.distributed.send`` while installed."""
    if _installed is None:
        return _real_send_at_import(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
    work = _installed.isend(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)
    if work is not None:
        work.wait()
    return None


_throttled_send_entry.__name__ = "send"


def _throttled_batch_entry(p2p_op_list: list[dist.P2POp]) -> list[Any]:
    """Stands in for ``torch.distributed.batch_isend_irecv`` while installed."""
    if _installed is None:
        return c10d.batch_isend_irecv(p2p_op_list)
    return _installed.batch_isend_irecv(p2p_op_list)


def _check_op_accepting_both(op: Any) -> None:
    if op is _throttled_isend_entry or op is _real_isend_at_import:
        return
    _real_check_op(op)


def _warn_unthrottled(real: Callable[..., Any]) -> Callable[..., Any]:
    warned = False

    def entry(*args: Any, **kwargs: Any) -> Any:
        nonlocal warned
        if not warned:
            warned = True
            warnings.warn(
                f"torch.distributed.{real.__name__} is not paced by the installed "
                f"{_installed!r}: its transfers run at loopback speed. Post irecvs and "
                "isends instead (they are paced), or use benchmarks/netns.py.",
                RuntimeWarning,
                stacklevel=2,
            )
        return real(*args, **kwargs)

    entry.__name__ = real.__name__
    entry.__doc__ = real.__doc__
    return entry


def installed() -> LinkThrottle | None:
    """The throttle installed in this process, if any."""
    return _installed


def throttle_from_spec(spec: str) -> LinkThrottle | None:
    """Build a throttle from ``FXDISAG_THROTTLE`` syntax (see the module
    docstring); None for ``unlimited``."""
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"{ENV_VAR}={spec!r}: empty; expected e.g. '1gbit' or '1gbit,latency=50us'")
    rate = parse_rate(parts[0])
    latency, egress = 0.0, "shared"
    for p in parts[1:]:
        key, sep, value = p.partition("=")
        if not sep or key not in ("latency", "egress"):
            raise ValueError(
                f"{ENV_VAR}={spec!r}: unknown option {p!r}; options are latency=TIME, "
                "egress=shared|per_link"
            )
        if key == "latency":
            latency = parse_time(value)
        else:
            egress = value
    if rate is None:
        return None
    return LinkThrottle(rate, latency, egress)  # type: ignore[arg-type]


def install_from_env(environ: dict[str, str] | None = None) -> LinkThrottle | None:
    """Install a throttle as ``FXDISAG_THROTTLE`` says; None if it is unset or
    ``unlimited``. Call once per process, before the first send."""
    spec = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not spec:
        return None
    throttle = throttle_from_spec(spec)
    return throttle.install() if throttle is not None else None
