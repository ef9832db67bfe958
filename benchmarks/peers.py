"""The peers a HuggingFace MoE user runs without fxdisag: DDP and FSDP2 on the whole model.

Contract: ``build_peer(kind, model) -> Peer`` (``kind`` in :data:`KINDS`, after
``dist.init_process_group``) wraps the HF model so that the benchmark's ``timed_step``
drives it exactly like a ``DisaggregatedModel``:

* ``peer(**batch)`` takes the *global* batch (the same on every rank), runs this rank's
  contiguous shard (``batch // world`` sequences) and returns an object whose ``.loss``
  has the value of the global mean loss (over every label token != -100 of the global
  batch, HF's shift included) on every rank, and whose ``.loss.backward()`` leaves on
  every rank the gradient of that global loss: the local loss is scaled by
  ``world x local_tokens / global_tokens``, because DDP and FSDP2 both average gradients
  over the ranks;
* ``parameters()``, ``attention_parameters()`` (``[]``: the peers' collective bytes are
  all in ``step_sent_bytes``);
* ``step_sent_bytes()``: bytes this rank sent in the last step, *computed* from the
  algorithms (collectives cannot be counted at a mailbox), keyed by the next rank of the
  ring: DDP all-reduces every gradient once, a ring all-reduce sending ``2 (n-1)/n``
  of the bytes per rank; FSDP2 (``reshard_after_forward=True``, the default) all-gathers
  the parameters in forward and again in backward and reduce-scatters the gradients,
  ``(n-1)/n`` of the bytes each. (gloo's CPU all-reduce picks its own algorithm; the
  ring figure is the bandwidth-optimal volume any of them moves at least.)
* ``step_spans()`` (collective): one ``F`` span (forward) and one ``B`` span (backward,
  until autograd's final callback, where DDP's last all-reduce has finished) per rank, as
  ``fxdisag.runtime.timeline.Span``; they include the peers' own communication, which
  overlaps their compute, so a roofline "efficiency" of a peer is not meaningful.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxdisag.runtime.timeline import Span
from fxdisag.schedule import Action, ActionKind

__all__ = ["KINDS", "Peer", "build_peer"]

KINDS = ("ddp", "fsdp2")
IGNORE_INDEX = -100


class _MarkBackward(torch.autograd.Function):
    """Identity on the loss; its backward stamps the start of the backward pass and queues
    a callback at its end (the hook DDP itself uses to finish its all-reduces)."""

    @staticmethod
    def forward(ctx, loss, peer):
        ctx.peer = peer
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad):
        peer = ctx.peer
        peer._backward_start = time.perf_counter()
        torch.autograd.Variable._execution_engine.queue_callback(peer._backward_done)
        return grad, None


class _Output:
    def __init__(self, loss: torch.Tensor):
        self.loss = loss


class Peer:
    def __init__(self, kind: str, model: nn.Module):
        if kind not in KINDS:
            raise ValueError(f"build_peer: kind {kind!r} is not one of {KINDS}")
        if not dist.is_initialized():
            raise RuntimeError("build_peer needs torch.distributed initialised (torchrun, init_process_group)")
        self.kind = kind
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.model = model
        self.param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if kind == "ddp":
            self.module: nn.Module = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (self.world,))
            for layer in model.model.layers:  # one unit per decoder layer, then the rest
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            self.module = model
        self.spans: list[Span] = []
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
        t0 = time.perf_counter()
        loss = self.module(**shard, use_cache=False).loss
        share = local_tokens / total
        value = (loss.detach() * share).reshape(1)
        dist.all_reduce(value)  # the global mean loss, reported on every rank
        scaled = loss * (self.world * share)  # DDP / FSDP2 average over ranks
        self.spans.append(Span(self.rank, Action(ActionKind.F, 0, 0), t0, time.perf_counter(), "compute"))
        marked = _MarkBackward.apply(scaled, self)
        return _Output(marked + (value[0] - marked.detach()))  # value: global loss; gradient: scaled's

    def _backward_done(self) -> None:
        self.spans.append(Span(self.rank, Action(ActionKind.B, 0, 0), self._backward_start,
                               time.perf_counter(), "compute"))

    def parameters(self):
        return self.module.parameters()

    def attention_parameters(self) -> list:
        return []

    def step_sent_bytes(self) -> dict[int, int]:
        n = self.world
        if n < 2:
            return {}
        factor = 2.0 if self.kind == "ddp" else 3.0  # all-reduce = 2 x (n-1)/n; FSDP2: 2 all-gathers + reduce-scatter
        return {(self.rank + 1) % n: int(factor * (n - 1) / n * self.param_bytes)}

    def step_spans(self) -> list[Span]:
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, self.spans)
        spans = [s for rank_spans in gathered for s in rank_spans]
        t0 = min((s.start for s in spans), default=0.0)
        return [dataclasses.replace(s, start=s.start - t0, end=s.end - t0) for s in spans]


def build_peer(kind: str, model: nn.Module) -> Peer:
    """Wrap ``model`` as ``kind`` (module docstring); every rank must pass the same weights."""
    return Peer(kind, model)
