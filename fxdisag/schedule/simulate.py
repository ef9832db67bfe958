"""Discrete-event simulation of one training step of a :class:`Schedule`.

Contract
--------
``simulate(schedule, compute_time, message_bytes, link)`` executes every rank's action
list in order, with the runtime semantics of ``schedule.py``, and returns the step
time, per-rank busy fractions, bubble fractions, exposed communication and the spans.
It is deterministic and exact for its model (no sampling); ``validate`` runs first.

Model
-----
* A rank runs one action at a time, in list order. Posting a SEND or RECV takes no
  rank time (non-blocking); a compute takes ``compute_time(rank, action)`` seconds and
  starts when the rank reaches it *and* every message it consumes has arrived (the
  wait is a ``recv-wait`` span and counts in ``exposed_comm``).
* A SEND to peers ``p1..pk`` posts one message per peer, in that order, carrying
  ``message_bytes(src, action, dst)`` bytes.
* A message is eligible once both its send and its receive are posted (rendezvous,
  as NCCL and gloo do for non-trivial sizes). It starts when it is eligible, the
  sender's egress is idle and the receiver's ingress is idle (one message at a time
  per NIC direction, unless the link model turns serialisation off); among eligible
  messages, the earliest-posted send goes first, and a message waiting for a busy
  receiver does not hold up the sender's messages to idle receivers. It lasts
  bytes / bandwidth(src, dst) and arrives ``latency(src, dst)`` after it ends. So
  many-to-many contention (incast at an expert rank) shows.
* REDUCE is a collective over its peers: it starts when the last member reaches it and
  lasts max over members of ``compute_time(member, its REDUCE)``; return 0 to ignore.
* step_time = the time the last rank finishes its list or the last transfer ends.

Pseudo-code::

    heap = [(0, r) for r in ranks]
    loop:
        if an event is due at `now`: pop it; if it is a rank r, advance r from clock[r]:
            SEND/RECV -> post (a message is eligible once both sides posted), continue
            compute   -> if all consumed messages have an arrival time: run from
                         max(clock, arrivals), push (end, r); else park r
            REDUCE    -> if every member is there: run all members, push their ends
        else: start eligible messages whose NICs are idle, in send-post order (each
              pushes a NIC-free event at its end); wake ranks whose data is on its way;
              now = next event time
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from fxdisag.schedule import Action, ActionKind, Schedule, ScheduleError, consumes, validate
from fxdisag.runtime.timeline import Span

Message = tuple[int, int, str, int, int, int]  # (src, dst, channel, stage, microbatch, chunk)
_NIC_FREE = -1  # heap entry that only re-runs the transfer starter


@dataclass(frozen=True, kw_only=True)
class LinkModel:
    """Network model: subclasses give ``bandwidth(src, dst)`` (bytes/s, may be inf) and
    ``latency(src, dst)`` (s). ``serialize_egress`` / ``serialize_ingress``: a rank's NIC
    sends / receives one message at a time (FIFO)."""
    serialize_egress: bool = True
    serialize_ingress: bool = True

    def bandwidth(self, src: int, dst: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define bandwidth(src, dst)")

    def latency(self, src: int, dst: int) -> float:
        raise NotImplementedError(f"{type(self).__name__} must define latency(src, dst)")


@dataclass(frozen=True)
class UniformLink(LinkModel):
    """Every ordered pair has the same bandwidth (bytes/s) and latency (s)."""
    bytes_per_s: float
    latency_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0:
            raise ValueError(f"UniformLink bandwidth={self.bytes_per_s!r}; must be > 0 bytes/s "
                             "(math.inf for an ideal network)")
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ValueError(f"UniformLink latency={self.latency_s!r}; must be finite and >= 0 s")

    def bandwidth(self, src: int, dst: int) -> float:
        return self.bytes_per_s

    def latency(self, src: int, dst: int) -> float:
        return self.latency_s


@dataclass
class SimResult:
    step_time: float
    busy_fraction: dict[int, float]      # rank -> compute time / step_time
    bubble_fraction: dict[str, float]    # "attention" | "expert" | "all": mean of 1 - busy
    exposed_comm: dict[int, float]       # rank -> seconds waiting for data (recv-wait)
    spans: list[Span] = field(repr=False)
    attention_ranks: tuple[int, ...] = ()
    expert_ranks: tuple[int, ...] = ()

    def __str__(self) -> str:
        lines = [f"step time {self.step_time:.6g} s; bubble: attention "
                 f"{self.bubble_fraction['attention']:.1%}, expert "
                 f"{self.bubble_fraction['expert']:.1%}, all {self.bubble_fraction['all']:.1%}",
                 "rank role   busy  exposed comm (s)"]
        for r in sorted(self.busy_fraction):
            role = "A" if r in self.attention_ranks else "E"
            lines.append(f"{r:4d}    {role} {self.busy_fraction[r]:6.1%}  "
                         f"{self.exposed_comm[r]:.6g}")
        return "\n".join(lines)


def _checked(value: float, what: str) -> float:
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{what} returned {value!r}; must be finite and >= 0")
    return float(value)


def simulate(schedule: Schedule, compute_time: Callable[[int, Action], float],
             message_bytes: Callable[[int, Action, int], float], link: LinkModel,
             *, check: bool = True) -> SimResult:
    """Time one step of ``schedule`` (see module docstring). ``check=False`` skips
    :func:`validate` (for searches that simulate many schedules already validated)."""
    if check:
        validate(schedule)
    S, J = schedule, schedule.num_moe_layers
    ranks = list(S.actions)
    lists = S.actions
    pc = {r: 0 for r in ranks}
    clock = {r: 0.0 for r in ranks}          # time the rank reached its current action
    spans: list[Span] = []
    heap: list[tuple[float, int, int]] = []
    seq = 0

    def push(t: float, r: int) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, seq, r))
        seq += 1

    send_posted: dict[Message, tuple[float, int, Action]] = {}  # -> (time, post order, SEND)
    recv_posted: set[Message] = set()
    eligible: list[tuple[float, int, Message]] = []  # both sides posted, not started; sorted
    arrival: dict[Message, float] = {}
    egress_busy = {r: 0.0 for r in ranks}    # until when the rank's NIC is sending
    ingress_busy = {r: 0.0 for r in ranks}   # until when it is receiving
    waiting: dict[int, list[Message]] = {}   # parked rank -> messages its compute needs
    at_reduce: dict[frozenset[int], dict[int, float]] = {}
    recv_action: dict[int, dict[tuple, Action]] = {r: {} for r in ranks}

    def post(msg: Message) -> None:
        if msg in send_posted and msg in recv_posted:
            t, order, _ = send_posted[msg]
            bisect.insort(eligible, (t, order, msg))

    def start_transfers(now: float) -> None:
        """Start, in send-post order, every eligible message whose sender's egress and
        receiver's ingress are idle at ``now``; wake ranks whose data is all on its way."""
        started: list[int] = []
        for n, (_, _, msg) in enumerate(eligible):
            src, dst = msg[0], msg[1]
            if (link.serialize_egress and egress_busy[src] > now) or \
               (link.serialize_ingress and ingress_busy[dst] > now):
                continue
            action = send_posted[msg][2]
            nbytes = _checked(message_bytes(src, action, dst),
                              f"message_bytes({src}, {action}, {dst})")
            bw = link.bandwidth(src, dst)
            if not bw > 0:
                raise ValueError(f"link.bandwidth({src}, {dst}) = {bw!r}; must be > 0")
            end = now + (nbytes / bw if nbytes else 0.0)
            if link.serialize_egress:
                egress_busy[src] = end
            if link.serialize_ingress:
                ingress_busy[dst] = end
            arrival[msg] = end + _checked(link.latency(src, dst), f"link.latency({src}, {dst})")
            spans.append(Span(src, action, now, end, "send", peer=dst))
            push(end, _NIC_FREE)
            started.append(n)
        for n in reversed(started):
            del eligible[n]
        if started:
            for r, need in list(waiting.items()):
                if all(m in arrival for m in need):
                    del waiting[r]
                    push(now, r)

    def advance(r: int) -> None:
        # Posts happen at clock[r], the time the rank got past its last compute or
        # REDUCE (a parked rank is at a compute, so it posts nothing until it runs).
        while pc[r] < len(lists[r]):
            a = lists[r][pc[r]]
            k = a.kind
            if k.is_send or k.is_recv:
                for p in a.peers:
                    msg = (r, p, k.channel, a.stage, a.microbatch, a.chunk) if k.is_send else \
                          (p, r, k.channel, a.stage, a.microbatch, a.chunk)
                    if k.is_send:
                        send_posted[msg] = (clock[r], len(send_posted), a)
                    else:
                        recv_posted.add(msg)
                    post(msg)
                if k.is_recv:
                    recv_action[r][a.key] = a
                pc[r] += 1
                continue
            if k is ActionKind.REDUCE:
                group = frozenset(a.peers)
                there = at_reduce.setdefault(group, {})
                there[r] = clock[r]
                if set(there) != group:
                    return
                start = max(there.values())
                length = max(_checked(compute_time(q, lists[q][pc[q]]),
                                      f"compute_time({q}, R)") for q in group)
                for q, reached in there.items():
                    spans.append(Span(q, lists[q][pc[q]], reached, start + length, "reduce"))
                    pc[q] += 1
                    clock[q] = start + length
                    if q != r:
                        push(start + length, q)
                del at_reduce[group]
                continue
            need: list[Message] = []
            for key in consumes(a, J, S.hops, S.chunks):
                recv = recv_action[r].get(key)
                if recv is None:  # validate() rules this out; reached only with check=False
                    raise ScheduleError(f"rank {r}: `{a}` runs before its receive is posted")
                need += [(p, r, key[0].channel, recv.stage, recv.microbatch, recv.chunk) for p in recv.peers]
            if not all(m in arrival for m in need):
                waiting[r] = need
                return
            start = max([clock[r]] + [arrival[m] for m in need])
            if start > clock[r]:
                spans.append(Span(r, a, clock[r], start, "recv-wait"))
            end = start + _checked(compute_time(r, a), f"compute_time({r}, {a})")
            spans.append(Span(r, a, start, end, "compute"))
            pc[r] += 1
            clock[r] = end
            push(end, r)
            return

    for r in ranks:
        push(0.0, r)
    now = 0.0
    while True:
        if heap and heap[0][0] <= now:
            _, _, r = heapq.heappop(heap)
            if r != _NIC_FREE:
                advance(r)
            continue
        # Every event at `now` is handled, so all posts of this instant are in: start
        # what can go, in send order (not in the order the ranks happened to run).
        if eligible:
            start_transfers(now)
        if not heap:
            break
        now = max(now, heap[0][0])
    stuck = [r for r in ranks if pc[r] < len(lists[r])]
    if stuck:  # validate() rules this out; reached only with check=False
        raise ScheduleError(f"simulation stuck: ranks {stuck} at "
                            f"{[str(lists[r][pc[r]]) for r in stuck]} (run validate(schedule))")

    step = max([clock[r] for r in ranks] + [s.end for s in spans] + [0.0])
    busy = {r: 0.0 for r in ranks}
    exposed = {r: 0.0 for r in ranks}
    for s in spans:
        if s.kind == "compute":
            busy[s.rank] += s.duration
        elif s.kind == "recv-wait":
            exposed[s.rank] += s.duration
    # A zero-length step has nothing idle: count it as fully busy.
    frac = {r: (busy[r] / step if step > 0 else 1.0) for r in ranks}

    def mean_bubble(group: tuple[int, ...]) -> float:
        return sum(1.0 - frac[r] for r in group) / len(group)

    bubble = {"attention": mean_bubble(S.attention_ranks), "expert": mean_bubble(S.expert_ranks),
              "all": mean_bubble(tuple(ranks))}
    spans.sort(key=lambda s: (s.start, s.rank, s.kind))
    return SimResult(step, frac, bubble, exposed, spans, S.attention_ranks, S.expert_ranks)
