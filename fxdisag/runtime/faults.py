"""Faults and bad inputs: a hung or lost peer, or a bad batch on one rank, becomes a clear
error on every rank instead of a hang or a silent mix.

Contract:

* every wait of the runtime is bounded by the model's ``timeout`` (seconds;
  ``disaggregate(..., timeout=)``, default :data:`DEFAULT_TIMEOUT`): the mailbox's
  point-to-point receives and sends (``Work.wait(timeout)``), and the collectives
  fxdisag issues (the loss and gradient all-reduces, the input check, consolidation),
  which run on groups fxdisag makes with ``new_group(timeout=)`` and wait with the same
  bound; when fxdisag initialises the default group itself it passes ``timeout=`` too;
* a wait that runs out raises :class:`PeerTimeoutError`, one that fails because the peer
  went away (connection closed or reset) :class:`PeerLostError`; both name the waiting
  rank, the peer rank(s), what was awaited and, once the step runner re-raises them, the
  action and grid step. A gloo pair that timed out is closed: the model cannot be used
  afterwards (the process group is broken; restart the job);
* inputs (:func:`agree_on_inputs`): before the first message of a checked step every rank
  runs its local checks (batch size, labels, a pending backward) and hashes its batch
  (:func:`batch_digest`); one ``all_gather_object`` over the world shares (digest, error)
  and every rank raises the same error: the failing ranks' message naming them, or which
  ranks passed a different batch from which. ``check_inputs``: ``"first"`` (default:
  the first step only), ``"always"`` (every step: one small collective and one pass over
  the batch's bytes), ``"never"`` (a local check failure is then raised on that rank
  only, and its peers see a lost peer or a timeout).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "CHECK_INPUTS",
    "DEFAULT_TIMEOUT",
    "PeerError",
    "PeerLostError",
    "PeerTimeoutError",
    "agree_on_inputs",
    "as_timedelta",
    "batch_digest",
    "check_options",
    "collective",
    "inputs_verdict",
    "peer_error",
    "wait_work",
]

# Long enough for a slow first step (compilation, a cold page cache, a large model's
# first all-reduce), short enough that a hung job does not hold a cluster for gloo's 30 min.
DEFAULT_TIMEOUT = 300.0
CHECK_INPUTS = ("first", "always", "never")

# gloo's wording when the peer's socket went away (crash, exit, SIGKILL).
_LOST_MARKERS = ("closed by peer", "reset by peer", "broken pipe", "connection refused", "remote worker")


def check_options(timeout: float, check_inputs: str) -> None:
    """Refuse a bad ``timeout`` / ``check_inputs`` before any communication (every rank alike)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds (the longest fxdisag waits for a peer), "
                         f"got {timeout!r}")
    if check_inputs not in CHECK_INPUTS:
        raise ValueError(f"check_inputs must be one of {CHECK_INPUTS} (when the ranks compare their batches), "
                         f"got {check_inputs!r}")


def as_timedelta(timeout: float) -> timedelta:
    return timedelta(seconds=float(timeout))


class PeerError(RuntimeError):
    """A wait on peer(s) that failed. ``rank`` waited ``waited`` s for ``peers`` (``what``:
    the message or collective); ``where`` is filled in by the step runner (the action)."""

    kind = "failed"

    def __init__(self, rank: int, peers: Sequence[int], what: str, detail: str, waited: float, timeout: float,
                 where: str = "", grid: str = ""):
        self.rank, self.peers, self.what, self.detail = rank, list(peers), what, detail
        self.waited, self.timeout, self.where, self.grid = waited, timeout, where, grid
        super().__init__(self._message())

    def __reduce__(self):  # picklable (multiprocessing, elastic error files) despite the extra fields
        return type(self), (self.rank, self.peers, self.what, self.detail, self.waited, self.timeout, self.where,
                            self.grid)

    def located(self, where: str, grid: str = "") -> "PeerError":
        """The same error, placed at ``where`` (e.g. " at action 3 (...), grid step 4")."""
        return type(self)(self.rank, self.peers, self.what, self.detail, self.waited, self.timeout, where, grid)

    def _peer_text(self) -> str:
        return f"rank {self.peers[0]}" if len(self.peers) == 1 else f"ranks {self.peers}"

    def _message(self) -> str:
        raise NotImplementedError


class PeerTimeoutError(PeerError):
    """Nothing arrived (or nobody took a message) within ``timeout``: the peer is hung or gone."""

    def _message(self) -> str:
        text = (f"rank {self.rank} waited {self.waited:.1f} s for {self._peer_text()}{self.where}: {self.what}; "
                f"{'the peer is' if len(self.peers) == 1 else 'one of them is'} hung or gone "
                f"(timeout={self.timeout:g} s: raise it with "
                "disaggregate(..., timeout=...) if the peer is only slow)")
        return text + ("\n" + self.grid if self.grid else "")


class PeerLostError(PeerError):
    """The connection to the peer closed while waiting: it crashed or exited."""

    def _message(self) -> str:
        text = (f"rank {self.rank} lost {self._peer_text()}{self.where} after {self.waited:.1f} s ({self.what}): "
                f"{self.detail}. The peer crashed or exited: its own error says why")
        return text + ("\n" + self.grid if self.grid else "")


def peer_error(rank: int, peers: Sequence[int], what: str, exc: BaseException, waited: float,
               timeout: float) -> PeerError:
    """Classify a backend error raised while waiting on ``peers``."""
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = detail.lower()
    if any(m in text for m in _LOST_MARKERS) and waited < timeout:
        return PeerLostError(rank, peers, what, detail, waited, timeout)
    if "timed out" in text or "timeout" in text or waited >= 0.9 * timeout:
        return PeerTimeoutError(rank, peers, what, detail, waited, timeout)
    return PeerLostError(rank, peers, what, detail, waited, timeout)


def wait_work(work: Any, rank: int, peers: Sequence[int], what: str, timeout: float) -> None:
    """``work.wait`` bounded by ``timeout``; a failure becomes a :class:`PeerError`."""
    t0 = time.perf_counter()
    try:
        # NCCL: a timed wait blocks the CPU until the GPU work is done, giving up CPU/GPU
        # overlap; the untimed one only orders the current stream after it, and the group's
        # own timeout (new_group(timeout=), enforced by NCCL's watchdog) bounds a hang.
        if dist.is_initialized() and dist.get_backend() == "nccl":
            done = work.wait()
        else:
            done = work.wait(as_timedelta(timeout))
    except Exception as exc:
        raise peer_error(rank, peers, what, exc, time.perf_counter() - t0, timeout) from exc
    if done is False:  # a backend that reports a timeout by returning False
        raise PeerTimeoutError(rank, peers, what, "wait() returned False", time.perf_counter() - t0, timeout)


@contextlib.contextmanager
def collective(rank: int, peers: Sequence[int], what: str, timeout: float) -> Iterator[None]:
    """A blocking collective (its group carries ``timeout``); a failure becomes a :class:`PeerError`."""
    t0 = time.perf_counter()
    try:
        yield
    except PeerError:
        raise
    except Exception as exc:
        raise peer_error(rank, peers, what, exc, time.perf_counter() - t0, timeout) from exc


# ---- inputs
def batch_digest(batch: Mapping[str, Any]) -> str:
    """A hash of every input's name, shape, dtype and bytes (blake2b: one fast pass over the batch)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(batch):
        value = batch[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach()
            h.update(f"{tuple(t.shape)}|{t.dtype}".encode())
            raw = t.cpu().contiguous().reshape(-1).view(torch.uint8) if t.numel() else None
            if raw is not None:
                h.update(memoryview(raw.numpy()))
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def _summary(batch: Mapping[str, Any]) -> str:
    parts = []
    for name in sorted(batch):
        v = batch[name]
        parts.append(f"{name} {tuple(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                     if isinstance(v, torch.Tensor) else f"{name}={v!r}")
    return ", ".join(parts)


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {list(ranks)}"


def agree_on_inputs(batch: Mapping[str, Any], error: BaseException | None, group: dist.ProcessGroup | None,
                    timeout: float) -> None:
    """Share this rank's (batch digest, local check error) with every rank in one
    ``all_gather_object`` over ``group`` (the world); raise the same error on every rank
    (:func:`inputs_verdict`)."""
    rank, world = dist.get_rank(), dist.get_world_size(group)
    mine = (None, None, type(error).__name__, str(error)) if error is not None else (
        batch_digest(batch), _summary(batch), None, None)
    gathered: list[Any] = [None] * world
    with collective(rank, [r for r in range(world) if r != rank],
                    "the input check's all_gather_object of every rank's batch hash did not complete", timeout):
        dist.all_gather_object(gathered, mine, group=group)
    verdict = inputs_verdict(gathered)
    if verdict is None:
        return
    if error is not None and type(error) is type(verdict):
        raise verdict from error
    raise verdict


def inputs_verdict(gathered: Sequence[tuple[str | None, str | None, str | None, str | None]]) -> Exception | None:
    """Every rank's ``(digest, summary, error type, error message)`` -> the error all raise, or None.

    Local check errors win over a batch mismatch (a rank that refused its batch hashed
    nothing); their message and type are the (first) failing rank's, prefixed with the
    ranks that found it.
    """
    failed: dict[tuple[str, str], list[int]] = {}
    for r, (_, _, kind, message) in enumerate(gathered):
        if kind is not None:
            failed.setdefault((kind, message), []).append(r)
    if failed:
        (kind, message), ranks = next(iter(failed.items()))
        others = [rs for key, rs in failed.items() if key != (kind, message)]
        text = f"{_ranks(ranks)} refused the step's inputs: {message}"
        if others:
            text += f" (and {', '.join(_ranks(rs) for rs in others)} with another error: see their logs)"
        cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
        return cls(text)
    by_digest: dict[str, list[int]] = {}
    for r, (digest, _, _, _) in enumerate(gathered):
        by_digest.setdefault(digest, []).append(r)
    if len(by_digest) == 1:
        return None
    groups = list(by_digest.values())  # in rank order: the first holds rank 0
    lines = [f"  {_ranks(rs)}: {gathered[rs[0]][1]}" for rs in groups]
    same_shapes = len({gathered[rs[0]][1] for rs in groups}) == 1
    verb = "differs" if len(groups) == 2 and len(groups[1]) == 1 else "differ"
    how = "same shapes and dtypes, different values" if same_shapes else "different shapes or dtypes"
    return ValueError(
        f"the ranks passed different global batches: {', '.join(_ranks(rs) for rs in groups[1:])} {verb} from "
        f"{_ranks(groups[0])} ({how}):\n"
        + "\n".join(lines)
        + "\nEvery rank must pass the same global batch (fxdisag splits it over the attention ranks itself): "
        "load it with the same seed / sampler on every rank. check_inputs='never' skips this check")
