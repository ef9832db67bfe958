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

from fxdisag.runtime.attention import row_messages
from fxdisag.runtime.dispatch import expert_rows
from fxdisag.runtime.grads import GradSync, RowGroup
from fxdisag.runtime.mailbox import Mailbox, Receive, byte_size, message_tag, unpack_bytes
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
    ):
        """``attention_ranks``: one attention group (its size sizes the dispatch receives);
        ``top_k``: per MoE layer this rank holds, its top_k (the width of the routing slots
        of a dispatched row); ``replica_groups``: (local ids of the shared experts, process
        group) per replica set; ``compile_stages``: run each layer's experts call through
        ``torch.compile`` (dynamic shapes: the row count changes every step)."""
        self.experts = experts
        self.attention_ranks = list(attention_ranks)
        self.num_microbatches = num_microbatches
        self.hidden = hidden_size
        self.xdtype, self.wdtype = dtypes
        self.top_k = dict(top_k)
        self.mailbox = mailbox
        self.recompute = recompute
        self.hops = hops
        self.run_experts = {j: partial(expert_rows, torch.compile(mod, dynamic=True) if compile_stages else mod)
                            for j, mod in experts.items()}
        seen: dict[int, nn.Parameter] = {}
        for mod in experts.values():
            for p in mod.parameters():
                seen.setdefault(id(p), p)
        self.params = list(seen.values())
        # Tokens each local expert computed in training steps, per MoE layer, and the seconds
        # the expert calls took for how many (row, expert) pairs: what a balancer reads
        # between steps (fxdisag.balance). A bincount per call: no collective, no sync.
        self.token_counts = {j: torch.zeros(next(mod.parameters()).shape[0], dtype=torch.long)
                             for j, mod in experts.items()}
        self.compute_seconds, self.computed_pairs = 0.0, 0
        # Expert weights are [E_local, ...]: a replica set sums the rows of its shared experts.
        self.grad_sync = GradSync(self.params, [RowGroup(self.params, g, rows, mailbox.timeout)
                                                    for rows, g in replica_groups])

    def handlers(self) -> dict[ActionKind, Handler]:
        K = ActionKind
        return {
            K.RECV_D: self._post_dispatch,
            K.EF: self._forward,
            K.SEND_C: lambda st, a: self._send(st, "C", a, [st.results.pop((a.stage, a.microbatch))]),
            K.RECV_GC: self._post_grad_combine,
            K.EB: self._backward,
            K.SEND_GD: lambda st, a: self._send(st, "GD", a, list(st.results.pop((a.stage, a.microbatch)))),
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

    def _post_dispatch(self, state: StepState, action: Action) -> None:
        j, i = action.stage, action.microbatch
        capacity = byte_size(self._dispatch_layout(j, state.capacity_rows))
        tag = message_tag("D", j, i)
        rs = [Receive(a, tag, size_of=lambda n: byte_size(self._dispatch_layout(j, n)), capacity=capacity)
              for a in action.peers]
        state.recvs[("D", j, i)] = rs
        self.mailbox.post(rs)

    def _forward(self, state: StepState, action: Action) -> None:
        j, i = action.stage, action.microbatch
        xs, ws, ids, counts = [], [], [], []
        for r in state.recvs.pop(("D", j, i)):
            self.mailbox.wait(r)
            n = r.header_value  # the row count
            x, w, e = unpack_bytes(r.payload, self._dispatch_layout(j, n))
            xs.append(x)
            ws.append(w)
            ids.append(e)
            counts.append(n)
        x = torch.cat(xs).requires_grad_(state.grad_enabled)
        w = torch.cat(ws).requires_grad_(state.grad_enabled)
        e = torch.cat(ids).long()
        t0 = time.perf_counter()
        if self.recompute and state.grad_enabled:
            y = checkpoint(self.run_experts[j], x, e, w, use_reentrant=False)
        else:
            y = self.run_experts[j](x, e, w)
        if state.grad_enabled:
            valid = e[e >= 0]
            self.token_counts[j] += torch.bincount(valid.cpu(), minlength=self.token_counts[j].numel())
            self.compute_seconds += time.perf_counter() - t0
            self.computed_pairs += valid.numel()
        if state.grad_enabled:
            state.saved[(j, i)] = (x, w, y)
        state.recv_counts[(j, i)] = counts
        state.results[(j, i)] = y.detach()

    def _post_grad_combine(self, state: StepState, action: Action) -> None:
        j, i = action.stage, action.microbatch
        tag = message_tag("GC", j, i)
        rs = [Receive(a, tag, nbytes=byte_size([((n, self.hidden), self.xdtype)]))
              for a, n in zip(action.peers, state.recv_counts[(j, i)])]
        state.recvs[("GC", j, i)] = rs
        self.mailbox.post(rs)

    def _backward(self, state: StepState, action: Action) -> None:
        j, i = action.stage, action.microbatch
        parts = []
        for r, n in zip(state.recvs.pop(("GC", j, i)), state.recv_counts[(j, i)]):
            self.mailbox.wait(r)
            parts.append(unpack_bytes(r.payload, [((n, self.hidden), self.xdtype)])[0])
        x, w, y = state.saved.pop((j, i))
        torch.autograd.backward([y], [torch.cat(parts)])
        state.results[(j, i)] = (x.grad, w.grad)

    def _send(self, state: StepState, channel: str, action: Action, tensors: list[torch.Tensor]) -> None:
        j, i = action.stage, action.microbatch
        self.mailbox.send(row_messages(list(action.peers), state.recv_counts[(j, i)], tensors,
                                       message_tag(channel, j, i), with_counts=channel == "C" and j in self.hops))
