"""Expert handlers: the rank's local experts of every MoE layer, on the rows it receives.

Contract: :class:`ExpertHandlers` registers RECV_D, EF, SEND_C, RECV_GC, EB and SEND_GD on
a :class:`~fxdisag.runtime.runner.StepRunner`. A dispatched row is one token for this
rank (``dispatch.py``): its hidden row, and per top_k slot a routing weight and a local
expert id (-1 where the slot went to another rank). ``EF`` runs
``dispatch.expert_rows`` (the rank's experts on each valid slot, weighted, summed per
row), so the combine sends one row per token back, and ``EB`` returns the row's
gradient summed over the rank's experts with the weights' gradients ([n, K], 0 in
foreign slots). After the step every local expert
parameter's ``.grad`` holds its gradient accumulated over the rows it computed, summed
over the replicas when several expert ranks hold the expert (``replica_groups``). With
``recompute`` an expert call keeps only its inputs and runs again inside ``EB``.

Each message goes to the peers its action names (``Action.peers``, in slot order): the
dispatch comes from the attention group of layer j's stage, the combine goes to that of
stage j+1 (the same group at p = 1), slot t to slot t. ``experts`` maps each MoE layer
this rank's group holds to its local experts. A combine across a pipeline hop
(``hops``) carries its row counts: its receiver did not route those rows.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from fxdisag.runtime.chunking import RowChunks, split
from fxdisag.runtime.dispatch import expert_rows
from fxdisag.runtime.experts import WithSharedExpert, routed_experts
from fxdisag.runtime.grads import GradSync, RowGroup
from fxdisag.runtime.mailbox import Mailbox, Receive, byte_size, message_tag, pack_bytes, unpack_bytes
from fxdisag.runtime.runner import Handler, StepState
from fxdisag.schedule import Action, ActionKind

__all__ = ["ExpertHandlers"]


class ExpertHandlers:
    role = "E"

    def __init__(
        self,
        experts: dict[int, nn.Module],
        attention_ranks: list[int],
        num_microbatches: int,
        hidden_size: int,
        dtypes: tuple[torch.dtype, torch.dtype],
        top_k: Mapping[int, int],
        mailbox: Mailbox,
        replica_groups: list[tuple[list[int], dist.ProcessGroup]] = (),
        recompute: bool = False,
        hops: frozenset[int] = frozenset(),
        compile_stages: bool = False,
        chunks: Mapping[int, tuple[int, int]] | None = None,
        shared_group: dist.ProcessGroup | None = None,
    ):
        """``attention_ranks``: one attention group (its size sizes the dispatch receives);
        ``top_k``: per MoE layer this rank holds, its top_k (the width of the routing slots
        of a dispatched row); ``replica_groups``: (local ids of the shared experts, process
        group) per replica set; ``compile_stages``: run each layer's experts call through
        ``torch.compile`` (dynamic shapes: the row count changes every step); ``chunks``:
        MoE layer -> (forward, backward) chunks (``Schedule.chunks``); ``shared_group``: the
        expert ranks holding copies of the shared experts (``WithSharedExpert``), over which
        their gradients are summed."""
        self.experts = experts
        self.attention_ranks = list(attention_ranks)
        self.num_microbatches = num_microbatches
        self.hidden = hidden_size
        self.xdtype, self.wdtype = dtypes
        self.top_k = dict(top_k)
        self.mailbox = mailbox
        self.recompute = recompute
        self.hops = hops
        self.chunks = dict(chunks or {})
        self.run_experts = {j: partial(expert_rows, torch.compile(mod, dynamic=True) if compile_stages else mod)
                            for j, mod in experts.items()}
        seen: dict[int, nn.Parameter] = {}
        for mod in experts.values():
            for p in mod.parameters():
                seen.setdefault(id(p), p)
        self.params = list(seen.values())
        # Tokens each local (routed) expert computed in training steps, per MoE layer, and the
        # seconds the expert calls took for how many (row, expert) pairs: what a balancer reads
        # between steps (fxdisag.balance). A bincount per call: no collective, no sync. Ids
        # past the routed ones are the shared experts (runtime.experts.WithSharedExpert).
        self.token_counts = {j: torch.zeros(next(routed_experts(mod).parameters()).shape[0], dtype=torch.long)
                             for j, mod in experts.items()}
        self.shared_id = {j: mod.shared_id for j, mod in experts.items() if isinstance(mod, WithSharedExpert)}
        self.compute_seconds, self.computed_pairs = 0.0, 0
        # Expert weights are [E_local, ...]: a replica set sums the rows of its replicated experts.
        routed = list({id(p): p for mod in experts.values() for p in routed_experts(mod).parameters()}.values())
        sync = [RowGroup(routed, g, rows, mailbox.timeout) for rows, g in replica_groups]
        shared = [p for mod in experts.values() if isinstance(mod, WithSharedExpert) for p in mod.shared.parameters()]
        if shared and shared_group is not None:
            sync.append(RowGroup(shared, shared_group, None, mailbox.timeout))
        self.grad_sync = GradSync(self.params, sync)

    def handlers(self) -> dict[ActionKind, Handler]:
        K = ActionKind
        return {
            K.RECV_D: self._post_dispatch,
            K.EF: self._forward,
            K.SEND_C: lambda st, a: self._send(st, "C", a),
            K.RECV_GC: self._post_grad_combine,
            K.EB: self._backward,
            K.SEND_GD: lambda st, a: self._send(st, "GD", a),
        }

    def prepare(self, state: StepState, batch: Mapping[str, torch.Tensor]) -> None:
        """Size the dispatch receives: the most rows one attention rank sends per message
        (one per token at most: a token reaches a rank once)."""
        ids = batch.get("input_ids")
        if ids is None or ids.dim() != 2:
            raise ValueError("the batch needs input_ids of shape [batch, seq_len] (it sizes the expert receives)")
        per_message = ids.shape[0] // (len(self.attention_ranks) * self.num_microbatches)
        state.capacity_rows = per_message * ids.shape[1]

    def _dispatch_layout(self, j: int, n: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        k = self.top_k[j]  # rows, their routing weights and local expert ids (-1: another rank's slot)
        return [((n, self.hidden), self.xdtype), ((n, k), self.wdtype), ((n, k), torch.int32)]

    def _chunks(self, j: int) -> tuple[int, int]:
        return self.chunks.get(j, (1, 1))

    def _post_dispatch(self, state: StepState, action: Action) -> None:
        j, i, c = action.stage, action.microbatch, action.chunk
        capacity = byte_size(self._dispatch_layout(j, state.capacity_rows))
        tag = message_tag("D", j, i, c)
        rs = [Receive(a, tag, size_of=lambda n: byte_size(self._dispatch_layout(j, n)), capacity=capacity)
              for a in action.peers]
        state.recvs[("D", j, i, c)] = rs
        self.mailbox.post(rs)

    def _forward(self, state: StepState, action: Action) -> None:
        """Forward chunk c: each of its pieces (``runtime/chunking.py``) as its own graph, on
        the rows of every attention peer (peer by peer), so a backward chunk can run exactly
        its pieces' backward."""
        j, i, c = action.stage, action.microbatch, action.chunk
        per_f, _ = RowChunks.pieces_per(*self._chunks(j))
        peers = []  # per attention peer: (rows, weights, local ids), this chunk's rows
        for r in state.recvs.pop(("D", j, i, c)):
            self.mailbox.wait(r)
            peers.append(unpack_bytes(r.payload, self._dispatch_layout(j, r.header_value)))
        cuts = [split(x.shape[0], per_f) for x, _, _ in peers]
        outs: list[list[torch.Tensor]] = [[] for _ in peers]
        for t in range(per_f):
            rows = [cut[t] for cut in cuts]
            x = torch.cat([p[0][q.start:q.stop] for p, q in zip(peers, rows)]).requires_grad_(state.grad_enabled)
            w = torch.cat([p[1][q.start:q.stop] for p, q in zip(peers, rows)]).requires_grad_(state.grad_enabled)
            e = torch.cat([p[2][q.start:q.stop] for p, q in zip(peers, rows)]).long()
            t0 = time.perf_counter()
            if self.recompute and state.grad_enabled:
                y = checkpoint(self.run_experts[j], x, e, w, use_reentrant=False)
            else:
                y = self.run_experts[j](x, e, w)
            counts = [len(q) for q in rows]
            if state.grad_enabled:
                valid = e[(e >= 0) & (e < self.shared_id.get(j, self.token_counts[j].numel()))]
                self.token_counts[j] += torch.bincount(valid.cpu(), minlength=self.token_counts[j].numel())
                self.compute_seconds += time.perf_counter() - t0
                self.computed_pairs += valid.numel()
                state.saved[(j, i, c * per_f + t)] = (x, w, y, counts)
            for k, part in enumerate(y.detach().split(counts)):
                outs[k].append(part)
        state.results[("C", j, i, c)] = [torch.cat(o) if len(o) > 1 else o[0] for o in outs]

    def _pieces(self, j: int, b: int) -> range:
        """The pieces of backward chunk b (every forward chunk of the micro-batch ran before:
        ``required_before``)."""
        per_b = RowChunks.pieces_per(*self._chunks(j))[1]
        return range(b * per_b, (b + 1) * per_b)

    def _post_grad_combine(self, state: StepState, action: Action) -> None:
        j, i, b = action.stage, action.microbatch, action.chunk
        tag = message_tag("GC", j, i, b)
        rows = [sum(n) for n in zip(*(state.saved[(j, i, p)][3] for p in self._pieces(j, b)))]
        rs = [Receive(a, tag, nbytes=byte_size([((n, self.hidden), self.xdtype)])) for a, n in zip(action.peers, rows)]
        state.recvs[("GC", j, i, b)] = rs
        self.mailbox.post(rs)

    def _backward(self, state: StepState, action: Action) -> None:
        j, i, b = action.stage, action.microbatch, action.chunk
        pieces = self._pieces(j, b)
        saved = [state.saved.pop((j, i, p)) for p in pieces]
        grads_in: list[list[torch.Tensor]] = [[] for _ in saved]  # per piece, its rows peer by peer
        for k, r in enumerate(state.recvs.pop(("GC", j, i, b))):
            self.mailbox.wait(r)
            counts = [s_[3][k] for s_ in saved]
            g = unpack_bytes(r.payload, [((sum(counts), self.hidden), self.xdtype)])[0]
            for q, part in enumerate(g.split(counts)):
                grads_in[q].append(part)
        torch.autograd.backward([s_[2] for s_ in saved], [torch.cat(g) for g in grads_in])
        peers = len(saved[0][3])
        dx: list[list[torch.Tensor]] = [[] for _ in range(peers)]
        dw: list[list[torch.Tensor]] = [[] for _ in range(peers)]
        for x, w, _, counts in saved:
            for k, (gx, gw) in enumerate(zip(x.grad.split(counts), w.grad.split(counts))):
                dx[k].append(gx)
                dw[k].append(gw)
        state.results[("GD", j, i, b)] = [[torch.cat(gx), torch.cat(gw)] for gx, gw in zip(dx, dw)]

    def _send(self, state: StepState, channel: str, action: Action) -> None:
        j, i, c = action.stage, action.microbatch, action.chunk
        per_peer = state.results.pop((channel, j, i, c))
        counted = channel == "C" and j in self.hops  # the receiver did not route these rows
        tag = message_tag(channel, j, i, c)
        self.mailbox.send([(a, tag, pack_bytes(t if isinstance(t, list) else [t]),
                            (t.shape[0] if counted else None)) for a, t in zip(action.peers, per_peer)])
