"""Attention handlers: the attention stages of the split program, for this rank's share.

Contract: :class:`AttentionHandlers` registers F, B, SEND_D, RECV_C, SEND_GC and RECV_GD
on a :class:`~fxdisag.runtime.runner.StepRunner` (see ``fxdisag/schedule/actions.py``
for their meaning). After the step every attention parameter's ``.grad`` is summed over
the attention group (``GradSync``), each micro-batch's loss weighted by its share of the
global batch's label tokens, so the result equals one process computing the mean loss
over the whole batch.

Stage bookkeeping (the same as torch.distributed.pipelining's stage backward): every
floating tensor entering a stage that needs a gradient enters as a fresh leaf;
``B(s, i)`` calls ``torch.autograd.backward`` on the stage's outputs with the gradients
that later stages (and the expert ranks) sent back, then hands the leaves' ``.grad``
upstream. With ``recompute`` a stage keeps only its inputs in the forward and runs its
forward again inside ``B(s, i)`` (``torch.utils.checkpoint``, non-reentrant). Nothing
crosses ranks except the boundary rows of ``insert_dispatch``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from fxdisag.codegen.split_stages import StagedProgram
from fxdisag.runtime.grads import GradSync, RowGroup
from fxdisag.runtime.mailbox import Mailbox, Receive, byte_size, message_tag, pack_bytes, unpack_bytes
from fxdisag.runtime.runner import Handler, StepState
from fxdisag.schedule import Action, ActionKind

__all__ = ["AttentionHandlers", "IGNORE_INDEX", "row_messages"]

IGNORE_INDEX = -100


def row_messages(peers: list[int], counts: list[int], tensors: list[torch.Tensor], tag: int) -> list:
    """One message per peer: its consecutive block of ``counts[k]`` rows of every tensor."""
    messages, start = [], 0
    for peer, n in zip(peers, counts):
        messages.append((peer, tag, pack_bytes([t[start : start + n] for t in tensors]), None))
        start += n
    return messages


class AttentionHandlers:
    role = "A"

    def __init__(
        self,
        program: StagedProgram,
        rank: int,
        attention_ranks: list[int],
        expert_ranks: list[int],
        num_microbatches: int,
        owner: list[int],
        local_ids: list[int],
        mailbox: Mailbox,
        device: torch.device,
        attention_group: dist.ProcessGroup | None,
        recompute: bool = False,
    ):
        self.program = program
        self.rank = rank
        self.attention_ranks = list(attention_ranks)
        self.expert_ranks = list(expert_ranks)
        self.num_microbatches = num_microbatches
        self.owner = torch.tensor(owner, dtype=torch.long)  # expert -> slot in expert_ranks
        self.local_ids = torch.tensor(local_ids, dtype=torch.long)  # expert -> id on that slot's rank
        self.mailbox = mailbox
        self.device = device
        self.recompute = recompute
        self.constants = self._constants()
        seen: dict[int, nn.Parameter] = {}
        for stage in program.stages:
            for p in stage.module.parameters():
                seen.setdefault(id(p), p)
        self.params = list(seen.values())
        self.grad_sync = GradSync(self.params, [RowGroup(self.params, attention_group)])

    def handlers(self) -> dict[ActionKind, Handler]:
        K = ActionKind
        return {
            K.F: self._forward,
            K.SEND_D: self._send_dispatch,
            K.RECV_C: lambda st, a: self._post_rows(st, "C", a.stage, a.microbatch),
            K.B: self._backward,
            K.SEND_GC: self._send_grad_combine,
            K.RECV_GD: lambda st, a: self._post_rows(st, "GD", a.stage, a.microbatch),
        }

    def _constants(self) -> dict[str, object]:
        top = self.program.graph_module
        out = {}
        for node in top.graph.nodes:
            if node.op == "get_attr":
                obj = top
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                out[node.name] = obj
        return out

    # ---- per step
    def prepare(self, state: StepState, batch: Mapping[str, torch.Tensor]) -> None:
        """Shard the global batch: this rank's micro-batches, and each one's share of the loss."""
        m = self.num_microbatches
        a = self.attention_ranks.index(self.rank)
        n_attn = len(self.attention_ranks)
        labels = batch.get("labels")
        total_tokens = None
        if labels is not None:
            total_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if total_tokens == 0:
                raise ValueError("labels has no token other than -100: the loss is undefined")
        shards = {}
        for name, value in batch.items():
            if value.shape[0] % (n_attn * m):
                raise ValueError(
                    f"{name} has batch size {value.shape[0]}, which the {n_attn} attention rank(s) x "
                    f"{m} micro-batches cannot split evenly; use a multiple of {n_attn * m}"
                )
            per = value.shape[0] // (n_attn * m)
            shards[name] = [value[(a * m + i) * per : (a * m + i + 1) * per].to(self.device) for i in range(m)]
        for i in range(m):
            env = dict(self.constants)
            for name in self.program.inputs:
                if name not in shards:
                    raise ValueError(f"the program expects input {name!r}; got {sorted(shards)}")
                env[name] = shards[name][i]
            state.env.append(env)
            if labels is not None:
                n = int((shards["labels"][i][:, 1:] != IGNORE_INDEX).sum())
                state.loss_scale.append(n / total_tokens)
            else:
                state.loss_scale.append(1.0 / (m * n_attn))
        state.grads = [{} for _ in range(m)]

    # ---- handlers
    def _forward(self, state: StepState, action: Action) -> None:
        s, i = action.stage, action.microbatch
        stage = self.program.stages[s]
        env = state.env[i]
        if s > 0:
            b = self.program.boundaries[s - 1]
            parts = self._wait_all(state, ("C", s - 1, i))
            env[b.ys] = torch.cat(parts) if len(parts) > 1 else parts[0]
        leaves = {}
        args = []
        for name in stage.inputs:
            value = env[name]
            if isinstance(value, torch.Tensor) and value.is_floating_point() and (
                value.requires_grad or name == (self.program.boundaries[s - 1].ys if s > 0 else None)
            ):
                value = value.detach().requires_grad_(True)
                leaves[name] = value
            args.append(value)
        if self.recompute and state.grad_enabled:
            outputs = checkpoint(stage.module, *args, use_reentrant=False)
        else:
            outputs = stage.module(*args)
        outs = {}
        for name, value in zip(stage.outputs, outputs):
            env[name] = value
            if isinstance(value, torch.Tensor) and value.requires_grad:
                outs[name] = value
        state.leaves[(s, i)] = leaves
        state.outs[(s, i)] = outs
        if s == len(self.program.stages) - 1 and self.program.outputs:
            loss = env[self.program.outputs[0]]
            state.losses.append(loss.detach() * state.loss_scale[i])

    def _counts(self, state: StepState, j: int, i: int) -> list[int]:
        """Rows micro-batch i sends each expert rank at MoE layer j (known once F(j, i) ran)."""
        counts = state.sent_counts.get((j, i))
        if counts is None:
            b = self.program.boundaries[j]
            ids = state.env[i][b.ids]
            slot = self.owner.to(ids.device)[ids.view(-1)]
            counts = torch.bincount(slot, minlength=len(self.expert_ranks)).tolist()
            state.sent_counts[(j, i)] = counts
            xs, ws = state.env[i][b.xs], state.env[i][b.ws]
            state.row_shape = (xs.shape[1], xs.dtype, ws.dtype)
        return counts

    def _send_dispatch(self, state: StepState, action: Action) -> None:
        j, i = action.stage, action.microbatch
        b = self.program.boundaries[j]
        env = state.env[i]
        xs, ids, ws = env[b.xs], env[b.ids], env[b.ws]
        counts = self._counts(state, j, i)
        local_ids = self.local_ids.to(ids.device)[ids.view(-1)].view(-1, 1)
        tag = message_tag("D", j, i)
        messages, start = [], 0
        for r, n in zip(self.expert_ranks, counts):
            sl = slice(start, start + n)
            messages.append((r, tag, pack_bytes([xs[sl], ws[sl], local_ids[sl]]), n))
            start += n
        self.mailbox.send(messages)

    def _post_rows(self, state: StepState, channel: str, j: int, i: int) -> None:
        counts = self._counts(state, j, i)
        hidden, xdtype, wdtype = state.row_shape
        tag = message_tag(channel, j, i)
        receives = []
        for r, n in zip(self.expert_ranks, counts):
            layout = [((n, hidden), xdtype)] + ([((n, 1), wdtype)] if channel == "GD" else [])
            receives.append(Receive(r, tag, nbytes=byte_size(layout)))
            receives[-1].layout = layout  # type: ignore[attr-defined]
        state.recvs[(channel, j, i)] = receives
        self.mailbox.post(receives)

    def _wait_all(self, state: StepState, key: tuple[str, int, int]) -> list:
        out = []
        for r in state.recvs.pop(key):
            self.mailbox.wait(r)
            parts = unpack_bytes(r.payload, r.layout)  # type: ignore[attr-defined]
            out.append(parts[0] if len(parts) == 1 else parts)
        return out

    def _send_grad_combine(self, state: StepState, action: Action) -> None:
        j, i = action.stage, action.microbatch
        rows = state.grads[i].pop(self.program.boundaries[j].ys)  # set by B(j+1, i)
        self.mailbox.send(row_messages(self.expert_ranks, state.sent_counts[(j, i)], [rows], message_tag("GC", j, i)))

    def _backward(self, state: StepState, action: Action) -> None:
        s, i = action.stage, action.microbatch
        outs = state.outs.pop((s, i))
        leaves = state.leaves.pop((s, i))
        grads = state.grads[i]
        tensors, seeds = [], []
        last = s == len(self.program.stages) - 1
        if s < len(self.program.boundaries):
            b = self.program.boundaries[s]
            parts = self._wait_all(state, ("GD", s, i))
            grads[b.xs] = torch.cat([p[0] for p in parts])
            grads[b.ws] = torch.cat([p[1] for p in parts])
        for name, value in outs.items():
            if last and name == self.program.outputs[0]:
                tensors.append(value)
                seeds.append(torch.full_like(value, state.loss_scale[i] * state.loss_grad))
            elif name in grads:
                tensors.append(value)
                seeds.append(grads.pop(name))
        if tensors:
            torch.autograd.backward(tensors, seeds)
        for name, leaf in leaves.items():
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            grads[name] = grads[name] + g if name in grads else g
        for name in list(state.env[i]):
            if name in outs:
                del state.env[i][name]
