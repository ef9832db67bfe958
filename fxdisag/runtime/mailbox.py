"""Point-to-point messages of the AF-pipe: packed rows, receives posted early.

Contract:

* all traffic is ``torch.distributed`` async point-to-point (``batch_isend_irecv``):
  gloo on CPU, NCCL on GPU; no other transport;
* a message is one flat ``uint8`` buffer holding several tensors back to back
  (:func:`pack_bytes` / :func:`unpack_bytes`), so one exchange costs one message per peer
  whatever the number of tensors. When the receiver cannot know the row count (the
  forward dispatch) the sender also sends that count;
* sends are fire-and-forget until :meth:`Mailbox.drain`, which waits for all of them
  (their buffers are kept alive until then);
* a message to the rank itself (expert parallelism keeps some rows local) never touches
  the network: it is handed over in memory, matched by tag;
* tags are made here only (:func:`message_tag`): one per (channel, MoE layer,
  micro-batch), always even, because in ``ordered`` mode a message with a header sends
  the header on the tag and its payload on tag + 1;
* :attr:`Mailbox.sent_bytes` counts the bytes posted to each peer over the network
  (headers included, messages to itself excluded) since :meth:`Mailbox.reset_counters`;
* every wait is bounded by ``timeout`` seconds (gloo: ``Work.wait(timeout)``; NCCL: the
  group's timeout, see :func:`~fxdisag.runtime.faults.wait_work`): a message that does not arrive, or a send the
  peer does not take, raises :class:`~fxdisag.runtime.faults.PeerTimeoutError` naming the
  peer and the message (:func:`describe_tag`); a peer whose connection closed raises
  :class:`~fxdisag.runtime.faults.PeerLostError`. The step runner adds the action.

Two ways to receive a message of unknown size, chosen by the backend:

* ``tagged`` (gloo): every receive is posted the moment it is asked for. gloo matches a
  message by (source, tag) and accepts one shorter than the posted buffer, so a
  variable-size message goes into a buffer of its ``capacity`` with its row count in an
  8-byte prefix. This matters for speed: gloo moves a send's bytes only once the
  matching receive is posted, so a receive posted late leaves the link idle
  (benchmarks/gloo_late_irecv.py);
* ``ordered`` (NCCL): messages between a pair match in FIFO order and sizes must agree,
  so the count travels as a separate header message and the payload's receive is posted
  once the header arrived; later receives from that peer queue behind it, keeping the
  FIFO order on both sides.

A *sized* message (:meth:`Mailbox.send_sized`, ``Receive(sized=True)``: the pipeline hop,
whose layout only the sender knows) always goes as a byte-count header on the tag and
its payload on tag + 1, in both modes: there is no capacity to post a buffer of.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fxdisag.runtime.faults import DEFAULT_TIMEOUT, peer_error, wait_work
from fxdisag.schedule.actions import MAX_CHUNKS  # message tags encode the chunk (they stay below 2**31)

__all__ = ["Mailbox", "Receive", "byte_size", "describe_tag", "message_tag", "pack_bytes", "unpack_bytes"]

_CHANNELS = ("D", "C", "GC", "GD", "H", "GH")
MAX_LAYERS = 256
MAX_MICROBATCHES = 4096


def message_tag(channel: str, layer: int, microbatch: int, chunk: int = 0) -> int:
    """The tag of the message of ``channel`` (``_CHANNELS``) for one (layer or cut, micro-batch,
    chunk of a chunked layer: ``Schedule.chunks``).

    Distinct per message: gloo matches on (source, tag); NCCL ignores tags and relies on
    the per-pair FIFO order the schedule guarantees. Even, so ``tag + 1`` is free for the
    payload that follows a header (``ordered`` mode).
    """
    if channel not in _CHANNELS:
        raise ValueError(f"channel {channel!r} is not one of {_CHANNELS}")
    if not 0 <= layer < MAX_LAYERS:
        raise ValueError(f"MoE layer {layer} out of range: message tags encode at most {MAX_LAYERS} layers")
    if not 0 <= microbatch < MAX_MICROBATCHES:
        raise ValueError(f"micro-batch {microbatch} out of range: message tags encode at most "
                         f"{MAX_MICROBATCHES} micro-batches")
    if not 0 <= chunk < MAX_CHUNKS:
        raise ValueError(f"chunk {chunk} out of range: message tags encode at most {MAX_CHUNKS} chunks")
    return (((_CHANNELS.index(channel) * MAX_LAYERS + layer) * MAX_MICROBATCHES + microbatch) * MAX_CHUNKS
            + chunk) * 2


def describe_tag(tag: int) -> str:
    """``message_tag``'s inverse, for errors: ``"D layer 0, micro-batch 1"`` (``+ payload`` for tag + 1)."""
    half, payload = divmod(tag, 2)
    half, chunk = divmod(half, MAX_CHUNKS)
    rest, microbatch = divmod(half, MAX_MICROBATCHES)
    channel, layer = divmod(rest, MAX_LAYERS)
    if channel >= len(_CHANNELS):
        return f"tag {tag}"
    what = "cut" if _CHANNELS[channel] in ("H", "GH") else "layer"
    return (f"{_CHANNELS[channel]} {what} {layer}, micro-batch {microbatch}" + (f", chunk {chunk}" if chunk else "")
            + (" (payload)" if payload else ""))


_ALIGN = 8  # every part starts 8-byte aligned, so it can be viewed as int64/float64


def _padded(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def byte_size(shapes_dtypes: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of the message :func:`pack_bytes` makes of tensors with these shapes/dtypes."""
    return sum(_padded(_nbytes(shape, dtype)) for shape, dtype in shapes_dtypes)


def pack_bytes(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    parts = []
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        pad = _padded(raw.numel()) - raw.numel()
        if pad:
            parts.append(raw.new_zeros(pad))
    if not parts:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def unpack_bytes(buf: torch.Tensor, layout: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    out, offset = [], 0
    for shape, dtype in layout:
        n = _nbytes(shape, dtype)
        out.append(buf[offset : offset + n].view(dtype).view(shape))
        offset += _padded(n)
    if offset != buf.numel():
        raise RuntimeError(f"message of {buf.numel()} bytes does not match the expected layout ({offset} bytes)")
    return out


_PREFIX = 8  # int64 row count in front of a variable-size message (tagged mode)


def _identity(n: int) -> int:
    return n


@dataclass
class Receive:
    """A receive from one peer; ``payload`` (and ``header_value``) once done.

    ``nbytes`` known up front, or ``size_of(count)`` turning the sender's row count into
    the payload's byte count, with ``capacity`` the largest payload the sender may send.
    """

    peer: int
    tag: int
    nbytes: int = 0
    size_of: Callable[[int], int] | None = None
    capacity: int = 0
    header: torch.Tensor | None = None
    header_value: int | None = None
    payload: torch.Tensor | None = None
    work: list = field(default_factory=list)
    stage: str = "new"  # new -> header -> payload -> done
    sized: bool = False  # header = the payload's byte count, in both modes (send_sized)

    def __post_init__(self) -> None:
        if self.sized:
            self.size_of = _identity

    @property
    def done(self) -> bool:
        return self.stage == "done"


class Mailbox:
    """Posts receives (early, or in per-peer FIFO order) and sends asynchronously."""

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None, ordered: bool | None = None,
                 timeout: float = DEFAULT_TIMEOUT):
        self.device = device
        self.group = group
        self.timeout = timeout  # seconds, per wait (disaggregate(..., timeout=))
        if ordered is None:
            # FXDISAG_P2P_ORDERED=1 forces the NCCL discipline on gloo (to test it on CPU).
            forced = os.environ.get("FXDISAG_P2P_ORDERED", "") == "1"
            ordered = forced or (dist.is_initialized() and dist.get_backend(group) != "gloo")
        self.ordered = ordered
        self._queues: dict[int, deque[Receive]] = {}
        self._sends: list[tuple[list, list[torch.Tensor], list[tuple[int, int]]]] = []  # works, buffers, (peer, tag)
        self.wait_seconds = 0.0  # time blocked in wait(): the timeline's recv-wait
        self.rank = dist.get_rank() if dist.is_initialized() else -1
        self._local: dict[int, tuple[int | None, torch.Tensor]] = {}  # tag -> (header, payload) sent to self
        self.sent_bytes: dict[int, int] = {}  # peer -> bytes posted to it over the network

    def reset_counters(self) -> None:
        """Start a new count of :attr:`sent_bytes` and :attr:`wait_seconds` (each step)."""
        self.sent_bytes = {}
        self.wait_seconds = 0.0

    # ---- receives
    def post(self, receives: Sequence[Receive]) -> None:
        """Queue receives; post every one that is now at the head of its peer's queue."""
        ops = []
        for r in receives:
            if r.peer == self.rank:
                continue  # filled from self._local in wait()
            if not self.ordered:
                ops += self._start(r) if r.sized else self._start_tagged(r)
                continue
            q = self._queues.setdefault(r.peer, deque())
            q.append(r)
            if len(q) == 1:
                ops += self._start(r)
        self._launch(ops)

    def wait(self, receive: Receive) -> None:
        """Block until ``receive`` has its payload (earlier receives from that peer finish first)."""
        if receive.peer == self.rank:
            if receive.tag not in self._local:
                raise RuntimeError(f"rank {self.rank} waits for a message to itself (tag {receive.tag}) never sent")
            receive.header_value, receive.payload = self._local.pop(receive.tag)
            receive.nbytes = receive.payload.numel()
            receive.stage = "done"
            return
        t0 = time.perf_counter()
        if not self.ordered:
            while not receive.done:
                for w in receive.work:
                    self._wait_recv(w, receive)
                if receive.sized:
                    self._launch(self._advance(receive))
                else:
                    self._finish_tagged(receive)
            self.wait_seconds += time.perf_counter() - t0
            return
        q = self._queues[receive.peer]
        while not receive.done:
            head = q[0]
            for w in head.work:
                self._wait_recv(w, head)
            ops = self._advance(head)
            if head.done:
                q.popleft()
                if q:
                    ops += self._start(q[0])
            self._launch(ops)
        self.wait_seconds += time.perf_counter() - t0

    def _wait_recv(self, work, r: Receive) -> None:
        tag = r.tag + 1 if r.stage == "payload" and r.header is not None else r.tag
        wait_work(work, self.rank, [r.peer], f"no message ({describe_tag(tag)})", self.timeout)

    def _start_tagged(self, r: Receive) -> list[dist.P2POp]:
        size = _PREFIX + r.capacity if r.size_of is not None else r.nbytes
        r.payload = torch.empty(size, dtype=torch.uint8, device=self.device)
        r.stage = "payload"
        return [self._op(dist.irecv, r.payload, r.peer, r.tag, r)]

    def _finish_tagged(self, r: Receive) -> None:
        if r.size_of is not None:
            r.header_value = int(r.payload[:_PREFIX].view(torch.int64).item())
            r.nbytes = r.size_of(r.header_value)
            if r.nbytes > r.capacity:
                raise RuntimeError(
                    f"message from rank {r.peer} holds {r.header_value} rows ({r.nbytes} bytes), more than the "
                    f"{r.capacity} bytes posted for it"
                )
            r.payload = r.payload[_PREFIX : _PREFIX + r.nbytes]
        r.stage = "done"

    def _start(self, r: Receive) -> list[dist.P2POp]:
        if r.size_of is not None:
            r.header = torch.empty(1, dtype=torch.int64, device=self.device)
            r.stage = "header"
            return [self._op(dist.irecv, r.header, r.peer, r.tag, r)]
        r.payload = torch.empty(r.nbytes, dtype=torch.uint8, device=self.device)
        r.stage = "payload"
        return [self._op(dist.irecv, r.payload, r.peer, r.tag, r)]

    def _advance(self, r: Receive) -> list[dist.P2POp]:
        r.work = []
        if r.stage == "header":
            r.header_value = int(r.header.item())
            r.nbytes = r.size_of(r.header_value)
            r.payload = torch.empty(r.nbytes, dtype=torch.uint8, device=self.device)
            r.stage = "payload"
            return [self._op(dist.irecv, r.payload, r.peer, r.tag + 1, r)]
        r.stage = "done"
        return []

    def _op(self, fn, tensor: torch.Tensor, peer: int, tag: int, owner: Receive | None) -> dist.P2POp:
        op = dist.P2POp(fn, tensor, peer, self.group, tag)
        op._fxdisag_owner = owner  # type: ignore[attr-defined]
        return op

    def _launch(self, ops: list[dist.P2POp]) -> None:
        # Empty messages are still sent: matching stays static (every peer gets one).
        if not ops:
            return
        works = self._post(ops, "post receives")
        for op, w in zip(ops, works):
            owner = op._fxdisag_owner  # type: ignore[attr-defined]
            if owner is not None:
                owner.work.append(w)

    # ---- sends
    def send(self, messages: Sequence[tuple[int, int, torch.Tensor, int | None]]) -> None:
        """``(peer, tag, payload_uint8, header)`` for each peer, posted together.

        ``header`` (e.g. a row count) is sent first when not None; the receiver's
        ``size_of(header)`` turns it into the payload's byte count.
        """
        ops, keep = [], []
        for peer, tag, payload, header_value in messages:
            payload = payload.to(self.device)
            if peer == self.rank:
                self._local[tag] = (header_value, payload)
                continue
            if tag % 2:
                raise ValueError(f"tag {tag} is odd: make tags with message_tag()")
            nbytes = payload.numel() + (_PREFIX if header_value is not None else 0)
            self.sent_bytes[peer] = self.sent_bytes.get(peer, 0) + nbytes
            if header_value is not None and not self.ordered:
                count = torch.tensor([header_value], dtype=torch.int64, device=self.device).view(torch.uint8)
                payload = torch.cat([count, payload])
            elif header_value is not None:
                header = torch.tensor([header_value], dtype=torch.int64, device=self.device)
                ops.append(dist.P2POp(dist.isend, header, peer, self.group, tag))
                keep.append(header)
                tag += 1
            ops.append(dist.P2POp(dist.isend, payload, peer, self.group, tag))
            keep.append(payload)
        if ops:
            self._sends.append((self._post(ops, "post messages"), keep, [(op.peer, op.tag) for op in ops]))

    def send_sized(self, peer: int, tag: int, payload: torch.Tensor) -> None:
        """Send ``payload`` (uint8) to ``peer``, its byte count first (see ``Receive(sized=True)``)."""
        if peer == self.rank:
            raise ValueError("send_sized is for messages between ranks; a rank never sends a hop to itself")
        if tag % 2:
            raise ValueError(f"tag {tag} is odd: make tags with message_tag()")
        payload = payload.to(self.device)
        header = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        self.sent_bytes[peer] = self.sent_bytes.get(peer, 0) + payload.numel() + _PREFIX
        ops = [dist.P2POp(dist.isend, header, peer, self.group, tag),
               dist.P2POp(dist.isend, payload, peer, self.group, tag + 1)]
        self._sends.append((self._post(ops, "post messages"), [header, payload], [(peer, tag), (peer, tag + 1)]))

    def _post(self, ops: list[dist.P2POp], what: str) -> list:
        # Posting to a peer whose connection closed fails at once: name the peers.
        t0 = time.perf_counter()
        try:
            return dist.batch_isend_irecv(ops)
        except Exception as exc:
            peers = sorted({op.peer for op in ops})
            tags = ", ".join(sorted({describe_tag(op.tag) for op in ops}))
            raise peer_error(self.rank, peers, f"could not {what}: {tags}", exc, time.perf_counter() - t0,
                             self.timeout) from exc

    def drain(self) -> None:
        for works, _, targets in self._sends:
            for w, (peer, tag) in zip(works, targets):
                wait_work(w, self.rank, [peer], f"its message ({describe_tag(tag)}) was never taken", self.timeout)
        self._sends.clear()
        pending = {p: len(q) for p, q in self._queues.items() if q}  # (ordered mode)
        if self._local:
            pending[self.rank] = len(self._local)
        if pending:
            raise RuntimeError(f"receives still pending at the end of the step: {pending} (peer: count)")
