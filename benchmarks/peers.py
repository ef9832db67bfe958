"""The peers a HuggingFace MoE user runs without fxdisag: DDP and FSDP2 on the whole model.

Contract: ``build_peer(kind, model, **options) -> Peer`` (``kind`` in :data:`KINDS`, after
``dist.init_process_group``; ``options`` go to ``DistributedDataParallel`` /
``fully_shard``) wraps the HF model so that the benchmark's ``timed_step`` drives it
exactly like a ``DisaggregatedModel``:

* ``peer(**batch)`` takes the *global* batch (the same on every rank), runs this rank's
  contiguous shard (``batch // world`` sequences; a batch that does not split is a
  ValueError) and returns an object whose ``.loss`` has the value of the global mean loss
  (over every label token != -100 of the global batch, HF's shift included) on every
  rank, and whose ``.loss.backward()`` leaves on every rank the gradient of that global
  loss: the local loss is scaled by ``world x local_tokens / global_tokens``, because DDP
  and FSDP2 both average gradients over the ranks;
* ``parameters()`` (DDP: full tensors; FSDP2: DTensor shards), ``attention_parameters()``
  (``[]``: the benchmark adds an attention all-reduce for fxdisag only; the peers'
  collective bytes are all in ``step_sent_bytes``);
* ``step_sent_bytes()``: ``{rank: bytes}`` this rank sent in the last step, payload only.
  Collectives cannot be counted at a mailbox, so the bytes come from the collectives the
  peer really issues and what gloo sends for each. Measured in torch 2.13 on CPU (bytes
  written to the sockets, ``/proc/self/io`` ``wchar``, at 2 and 3 ranks; each socket's TCP
  ``bytes_sent``, ``ss -ti``, at 3 ranks for the destination), P = bytes of the input:

  =================================  ===================================  ===========
  collective                         bytes each rank sends                to
  =================================  ===================================  ===========
  ``all_reduce`` (ring)              2 (n-1)/n x P                        rank - 1
  ``all_gather_single`` (ring)       (n-1) x P (P: the local shard)       rank + 1
  ``reduce_scatter_single``          2 (n-1)/n x P: gloo runs a *full*    rank - 1
                                     all-reduce of the input and keeps
                                     its chunk (NCCL: (n-1)/n x P)
  =================================  ===================================  ===========

  DDP: one all-reduce of every gradient per step (its buckets add up to every parameter
  that requires grad), computed. FSDP2: the peer *counts* the collectives FSDP2 issues
  (``set_custom_all_gather`` / ``set_custom_reduce_scatter`` on every ``fully_shard``
  module, with FSDP2's default implementations subclassed only to record each call's
  buffer, dim-0 padding included): per group (each decoder layer, then the root:
  embeddings, final norm, LM head) an all-gather in forward, another in backward for the
  groups that reshard after forward (all but the root, by FSDP2's default), and a
  reduce-scatter of the gradients. At 2 ranks that is P/2 + (P - P_root)/2 + P =
  2 P - P_root/2 (P: all parameter bytes), where the first version of this module
  computed 1.5 P (two all-gathers and a reduce-scatter of (n-1)/n x P each).
  ``tests/test_peers.py`` checks both peers' figures against ``wchar`` on real steps. Not
  counted, as with fxdisag: the 4-byte all-reduce of the loss value, and one-off set-up
  traffic (DDP's parameter broadcast at construction and its bucket rebuild after the
  first step).
* ``step_spans()`` (collective): per rank, as ``fxdisag.runtime.timeline.Span`` in
  wall-clock seconds from the step's first span (as the runner's): a ``compute`` span
  ``F0.0`` for the forward call (FSDP2: its all-gathers included), a ``compute`` span
  ``B0.0`` from the start of backward until autograd has run every node (DDP's bucket
  all-reduces and FSDP2's collectives overlap it), and a ``reduce`` span ``R`` for the
  exposed tail, until DDP / FSDP2 finished their end-of-backward wait for the last
  gradient collectives (autograd runs final callbacks in the order queued: the peer
  queues the first, at the start of backward, so DDP's and FSDP2's run after it and the
  one it queues then runs last). ``afpipe_analysis.compute_busy`` counts F and B as
  compute: for a peer that is the whole model on its shard *plus the communication it did
  not hide*, an upper estimate; so the roofline of a peer comes from :func:`roofline` and
  :func:`shard_compute_seconds` instead.
* :func:`shard_compute_seconds` (collective): forward + backward of the plain model on
  this rank's shard of the global batch, no communication, slowest rank;
  :func:`roofline`: the peer's lower bound, max(that compute, busiest NIC direction /
  bandwidth), because DDP and FSDP2 overlap their collectives with compute.

Configuration (torch 2.13, CPU / gloo): DDP with ``forward_sync_buffers=False`` (2.13's
name for ``broadcast_buffers=False``; buffers are still synced once, at construction):
the HF models' buffers are constants (rotary ``inv_freq``), identical on every rank, so
the default re-broadcast before every forward would only add a collective per step.
FSDP2: ``fully_shard`` on every decoder layer, then on the model, one mesh of all ranks,
default ``reshard_after_forward``; gloo has ``all_gather_single``,
``reduce_scatter_single`` and ``ReduceOp.AVG``, nothing needed a workaround. The loss must
be the plain LM loss: a model with ``config.output_router_logits`` (a router auxiliary loss
per shard, not a token mean) is refused.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxdisag.runtime.timeline import Span
from fxdisag.schedule import Action, ActionKind

__all__ = ["KINDS", "Peer", "DDPPeer", "FSDP2Peer", "build_peer", "ring_allreduce_bytes", "ring_allgather_bytes",
           "shard_compute_seconds", "roofline"]

KINDS = ("ddp", "fsdp2")
IGNORE_INDEX = -100


def ring_allreduce_bytes(nbytes: int, world: int) -> int:
    """Bytes each rank sends in gloo's ring all-reduce (and reduce-scatter) of ``nbytes``:
    2 (n-1)/n x nbytes."""
    return 0 if world < 2 else round(2 * (world - 1) * nbytes / world)


def ring_allgather_bytes(shard_bytes: int, world: int) -> int:
    """Bytes each rank sends in gloo's ring all-gather of a ``shard_bytes`` shard: (n-1) x shard."""
    return (world - 1) * shard_bytes if world > 1 else 0


class _MarkBackward(torch.autograd.Function):
    """Identity on the loss; its backward (the first node autograd runs) starts the
    backward spans."""

    @staticmethod
    def forward(ctx, loss, peer):
        ctx.peer = peer
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        ctx.peer._backward_started()
        return grad, None


class _Output:
    def __init__(self, loss: torch.Tensor):
        self.loss = loss


class Peer:
    """What DDP and FSDP2 share: the batch shard, the global loss, the spans, the byte count."""

    kind = "peer"

    def __init__(self, model: nn.Module):
        if not dist.is_initialized():
            raise RuntimeError("build_peer needs torch.distributed initialised (torchrun, init_process_group)")
        if getattr(getattr(model, "config", None), "output_router_logits", False):
            raise ValueError(f"{self.kind} peer: config.output_router_logits=True adds a router auxiliary loss per "
                             "shard, so the loss would not be the global token mean; build the model with "
                             "output_router_logits=False")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.model = model
        self.grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        self.module: nn.Module = model
        self.spans: list[Span] = []
        self._sent: dict[int, int] = {}
        self._backward_start = 0.0

    def __call__(self, **batch: torch.Tensor) -> _Output:
        labels = batch.get("labels")
        if labels is None:
            raise ValueError("the peers train with a loss: pass labels=...")
        n = labels.shape[0]
        if n % self.world:
            raise ValueError(f"batch of {n} sequences does not split over {self.world} ranks; use a multiple")
        per = n // self.world
        shard = {k: v[self.rank * per : (self.rank + 1) * per] for k, v in batch.items()}
        total = int((labels[:, 1:] != IGNORE_INDEX).sum())
        local_tokens = int((shard["labels"][:, 1:] != IGNORE_INDEX).sum())
        if total == 0:
            raise ValueError("labels has no token other than -100: the loss is undefined")
        self.spans = []
        self._sent = {}
        t0 = time.time()
        loss = self.module(**shard, use_cache=False).loss
        share = local_tokens / total
        value = (loss.detach() * share).reshape(1)
        dist.all_reduce(value)  # the global mean loss, reported on every rank
        scaled = loss * (self.world * share)  # DDP / FSDP2 average over ranks
        self.spans.append(Span(self.rank, Action(ActionKind.F, 0, 0), t0, time.time(), "compute"))
        marked = _MarkBackward.apply(scaled, self)
        return _Output(marked + (value[0] - marked.detach()))  # value: global loss; gradient: scaled's

    # ---- spans
    def _backward_started(self) -> None:
        self._backward_start = time.time()
        self._on_backward()
        torch.autograd.Variable._execution_engine.queue_callback(self._graph_done)

    def _graph_done(self) -> None:
        t = time.time()
        self.spans.append(Span(self.rank, Action(ActionKind.B, 0, 0), self._backward_start, t, "compute"))
        # queued now, so it runs after DDP's / FSDP2's end-of-backward callbacks (queued during backward)
        torch.autograd.Variable._execution_engine.queue_callback(
            lambda: self.spans.append(Span(self.rank, Action(ActionKind.REDUCE, 0, 0), t, time.time(), "reduce")))

    def _on_backward(self) -> None:
        pass

    # ---- bytes
    def _record(self, dst: int, nbytes: int) -> None:
        if dst != self.rank and nbytes:
            self._sent[dst] = self._sent.get(dst, 0) + nbytes

    # ---- what the benchmark reads
    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.model.named_parameters()

    def attention_parameters(self) -> list:
        return []

    def step_sent_bytes(self) -> dict[int, int]:
        """Bytes this rank sent to each rank in the last step (module docstring)."""
        return dict(self._sent)

    def step_spans(self) -> list[Span]:
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, self.spans)
        spans = [s for rank_spans in gathered for s in rank_spans]
        t0 = min((s.start for s in spans), default=0.0)
        return [dataclasses.replace(s, start=s.start - t0, end=s.end - t0) for s in spans]


class DDPPeer(Peer):
    """``DistributedDataParallel`` on the whole model: every rank holds every expert."""

    kind = "ddp"

    def __init__(self, model: nn.Module, **options: Any):
        super().__init__(model)
        if "broadcast_buffers" not in options:
            options.setdefault("forward_sync_buffers", False)  # constant buffers (module docstring)
        self.module = nn.parallel.DistributedDataParallel(model, **options)

    def _on_backward(self) -> None:
        # one ring all-reduce of every gradient (its buckets add up to all of them), to rank - 1
        self._record((self.rank - 1) % self.world, ring_allreduce_bytes(self.grad_bytes, self.world))


def _counting_comms(peer: "FSDP2Peer"):
    """FSDP2's default all-gather / reduce-scatter, recording each call's bytes on the wire (gloo)."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    def neighbour(group, step: int) -> int:
        return dist.get_global_rank(group, (group.rank() + step) % group.size())

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            # ring: every rank forwards the other n - 1 shards, to rank + 1
            peer._record(neighbour(group, 1), ring_allgather_bytes(input_tensor.numel() * input_tensor.element_size(),
                                                                   group.size()))
            return super().__call__(output_tensor, input_tensor, group, async_op)

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            # gloo: a full ring all-reduce of the (padded) input, keeping the local chunk; to rank - 1
            peer._record(neighbour(group, -1), ring_allreduce_bytes(input_tensor.numel() * input_tensor.element_size(),
                                                                    group.size()))
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    return CountingAllGather(), CountingReduceScatter()


class FSDP2Peer(Peer):
    """FSDP2 (``fully_shard``) on each decoder layer, then on the whole model."""

    kind = "fsdp2"

    def __init__(self, model: nn.Module, **options: Any):
        super().__init__(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers):
            raise ValueError(f"fsdp2 peer: no decoder layers at {type(model).__name__}.model.layers; the peer "
                             "shards each decoder layer, then the root")
        mesh = init_device_mesh("cpu", (self.world,))
        for layer in layers:
            fully_shard(layer, mesh=mesh, **options)
        fully_shard(model, mesh=mesh, **options)
        all_gather, reduce_scatter = _counting_comms(self)
        for m in [*layers, model]:
            m.set_custom_all_gather(all_gather)
            m.set_custom_reduce_scatter(reduce_scatter)


def build_peer(kind: str, model: nn.Module, **options: Any) -> Peer:
    """Wrap ``model`` as ``kind`` (module docstring); every rank must pass the same weights."""
    if kind == "ddp":
        return DDPPeer(model, **options)
    if kind == "fsdp2":
        return FSDP2Peer(model, **options)
    raise ValueError(f"build_peer: kind {kind!r} is not one of {KINDS}")


# ---------------------------------------------------------------------------- roofline


def shard_compute_seconds(model: nn.Module, batch: Mapping[str, torch.Tensor], repeats: int = 3) -> float:
    """Seconds of forward + backward of the plain ``model`` (a fresh, unwrapped copy: its
    gradients are left on it) on this rank's shard of the global ``batch``, without any
    communication: the median of ``repeats`` after one warm-up, the slowest rank's
    (collective; every rank computes at the same time, as in a peer's step)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = batch["labels"].shape[0]
    if n % world:
        raise ValueError(f"batch of {n} sequences does not split over {world} ranks; use a multiple")
    per = n // world
    shard = {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}
    times = []
    dist.barrier()
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model(**shard, use_cache=False).loss.backward()
        if i:
            times.append(time.perf_counter() - t0)
    seconds = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)


def roofline(compute_seconds: float, sent: Mapping[tuple[int, int], int], ranks: Sequence[int], bandwidth: float):
    """A peer's lower bound as ``afpipe_analysis.Bound``: max(compute, busiest NIC direction /
    ``bandwidth``), DDP and FSDP2 overlapping the two. ``compute_seconds``: the whole model on
    one rank's shard (:func:`shard_compute_seconds`), carried as the attention side (a peer
    does not split it; experts 0, as ``compute_busy`` counts a peer's spans); ``sent``:
    ``{(src, dst): bytes}`` of the step (the benchmark's merged ``step_sent_bytes``).

    >>> b = roofline(0.2, {(0, 1): 50, (1, 0): 50}, [0, 1], 100.0)
    >>> (b.bound, b.limiter)
    (0.5, 'transfer')
    """
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from afpipe_analysis import Bound, nic_bytes

    if not bandwidth > 0:
        raise ValueError(f"roofline: bandwidth must be > 0 B/s, got {bandwidth!r}")
    egress, ingress = nic_bytes(sent, list(ranks))
    transfer = max(max(egress.values(), default=0.0), max(ingress.values(), default=0.0)) / bandwidth
    limiter = "compute" if compute_seconds >= transfer else "transfer"
    return Bound(compute_seconds, 0.0, compute_seconds, transfer, max(compute_seconds, transfer), limiter)
