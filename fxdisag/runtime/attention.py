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
crosses ranks except the boundary rows of ``insert_dispatch`` and, with several attention
groups (``stages``, p > 1), the pipeline hop: the rank holds only its group's stages;
across a hop it sends the live values of the cut (:mod:`fxdisag.runtime.hop`) to the
same slot of the next stage's group (H) and gets their gradients back (GH), and the
combine that crosses the hop carries its row counts (the rank did not route those rows).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from fxdisag.codegen.split_stages import StagedProgram
from fxdisag.runtime import dispatch, hop
from fxdisag.runtime.chunking import RowChunks
from fxdisag.runtime.grads import GradSync, RowGroup
from fxdisag.runtime.mailbox import Mailbox, Receive, byte_size, message_tag, pack_bytes, unpack_bytes
from fxdisag.runtime.runner import Handler, StepState
from fxdisag.schedule import Action, ActionKind, Stages

__all__ = ["AttentionHandlers", "IGNORE_INDEX"]

IGNORE_INDEX = -100


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
        stages: Stages | None = None,
        row_format: tuple[int, torch.dtype] | None = None,
        compile_stages: bool = False,
        chunks: Mapping[int, tuple[int, int]] | None = None,
        shared_layers: frozenset[int] = frozenset(),
    ):
        """``attention_ranks``: this rank's attention group (its slot is its index);
        ``expert_ranks``: the expert group (p = 1); ``stages``: which group runs which
        stage (None: p = 1, every stage here); ``row_format``: (hidden size, row dtype)
        to size a combine that crosses a hop; ``compile_stages``: run each stage program
        through ``torch.compile`` (inductor; one static-shape graph per stage); ``chunks``:
        MoE layer -> (forward, backward) chunks (``Schedule.chunks``; rows per chunk:
        ``runtime/chunking.py``); ``shared_layers``: the MoE layers whose shared experts an
        expert rank runs (their rows carry one more slot, the last; ``owner`` and
        ``local_ids`` have one more entry per host: id E for one, E + slot for copies)."""
        self.program = program
        self.rank = rank
        self.attention_ranks = list(attention_ranks)
        self.num_microbatches = num_microbatches
        self.owner = torch.tensor(owner, dtype=torch.long)  # expert -> slot in expert_ranks
        self.local_ids = torch.tensor(local_ids, dtype=torch.long)  # expert -> id on that slot's rank
        self.mailbox = mailbox
        self.device = device
        self.recompute = recompute
        self.constants = self._constants()
        self.run_stage = {st.index: (torch.compile(st.module, dynamic=False) if compile_stages else st.module)
                          for st in program.stages}
        J = len(program.boundaries)
        if stages is None:
            self.my_stages = list(range(J + 1))
            self.expert_peers = [list(expert_ranks)] * J
            self.hops: frozenset[int] = frozenset()
        else:
            self.my_stages = stages.stages_of(stages.attention_slot(rank)[0])
            self.expert_peers = [list(stages.expert_groups[stages.layer_group[j]]) for j in range(J)]
            self.hops = stages.hops
        self.hop_names = hop.hop_values(program) if self.hops else []
        self.row_format = row_format
        self.chunks = dict(chunks or {})
        self.shared_layers = frozenset(shared_layers)
        seen: dict[int, nn.Parameter] = {}
        for s in self.my_stages:
            for p in program.stages[s].module.parameters():
                seen.setdefault(id(p), p)
        self.params = list(seen.values())
        self.grad_sync = GradSync(self.params, [RowGroup(self.params, attention_group, timeout=mailbox.timeout)])
        # Each token's routed experts, sampled in training steps for the balancer (fxdisag.balance)
        # and the planner's profiling step (planner/calibrate.py): off (0) unless asked, then at
        # most this many tokens per MoE layer (dispatch.ROUTE_SAMPLE) until cleared.
        self.route_sample_cap = 0
        self.route_samples: dict[int, list[torch.Tensor]] = {}

    def handlers(self) -> dict[ActionKind, Handler]:
        K = ActionKind
        return {
            K.F: self._forward,
            K.SEND_D: self._send_dispatch,
            K.RECV_C: lambda st, a: self._post_rows(st, "C", a.stage, a.microbatch, a.chunk),
            K.B: self._backward,
            K.SEND_GC: self._send_grad_combine,
            K.RECV_GD: lambda st, a: self._post_rows(st, "GD", a.stage, a.microbatch, a.chunk),
            K.SEND_H: self._send_hop,
            K.RECV_H: lambda st, a: self._post(st, ("H", a.stage, a.microbatch),
                                               [Receive(a.peers[0], message_tag("H", a.stage, a.microbatch), sized=True)]),
            K.SEND_GH: self._send_hop_grads,
            K.RECV_GH: self._post_hop_grads,
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
        if self.row_format is not None and "input_ids" in batch:
            ids = batch["input_ids"]
            state.capacity_rows = ids.shape[0] // (n_attn * m) * ids.shape[1]  # one row per (token, rank) at most

    # ---- handlers
    def _forward(self, state: StepState, action: Action) -> None:
        s, i = action.stage, action.microbatch
        stage = self.program.stages[s]
        env = state.env[i]
        if s > 0 and s - 1 in self.hops:
            b = self.program.boundaries[s - 1]
            parts, counts = self._wait_counted(state, ("C", s - 1, i, 0))
            state.sent_counts[(s - 1, i)] = counts  # SEND_GC splits the gradient rows by them
            env[b.ys] = torch.cat(parts) if len(parts) > 1 else parts[0]
            r = state.recvs.pop(("H", s - 1, i))[0]
            self.mailbox.wait(r)
            values, state.hop_grads[(s - 1, i)] = hop.decode(r.payload)
            env.update(values)
        elif s > 0:
            b = self.program.boundaries[s - 1]
            chunks = [self._wait_all(state, ("C", s - 1, i, c)) for c in range(self._chunks(s - 1)[0])]
            parts = [p for peer in zip(*chunks) for p in peer]  # peer by peer, each in chunk order
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
            outputs = checkpoint(self.run_stage[s], *args, use_reentrant=False)
        else:
            outputs = self.run_stage[s](*args)
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
            slot = dispatch.row_ranks(ids, self.owner.to(ids.device))
            counts = torch.bincount(slot, minlength=len(self.expert_peers[j])).tolist()
            state.sent_counts[(j, i)] = counts
            if self.route_sample_cap and state.grad_enabled:
                self._sample_routes(state, j, i, ids)
            xs, ws = state.env[i][b.xs], state.env[i][b.ws]
            state.row_shape = (xs.shape[1], xs.dtype, ws.dtype)
        return counts

    def _sample_routes(self, state: StepState, j: int, i: int, ids: torch.Tensor) -> None:
        """Each token's top_k expert ids, from the packed rows (one per (token, rank); a slot
        holds its expert on the row of the rank that has it, -1 elsewhere)."""
        have = sum(t.shape[0] for t in self.route_samples.get(j, []))
        if have >= self.route_sample_cap:
            return
        env = state.env[i]
        if j in self.shared_layers:  # the routed slots only (the shared experts' slot is the last)
            ids = ids[:, :-1]
        token, num_tokens = env[f"token_{j}"], env[f"ntok_{j}"].shape[0]
        full = torch.full((num_tokens, ids.shape[1]), -1, dtype=ids.dtype, device=ids.device)
        full.scatter_reduce_(0, token.unsqueeze(1).expand(-1, ids.shape[1]), ids, "amax")
        self.route_samples.setdefault(j, []).append(full[: self.route_sample_cap - have].cpu())

    def _chunks(self, j: int) -> tuple[int, int]:
        return self.chunks.get(j, (1, 1))

    def _blocks(self, state: StepState, j: int, i: int, direction: int, c: int) -> list[range]:
        """Per expert peer, the rows of chunk ``c`` (``direction`` 0: forward, 1: backward) of
        micro-batch i's dispatch at layer j, as rows of the packed [rows, H] tensor."""
        out, start = [], 0
        for n in self._counts(state, j, i):
            geometry = RowChunks.of(n, *self._chunks(j))
            block = (geometry.forward, geometry.backward)[direction][c]
            out.append(range(start + block.start, start + block.stop))
            start += n
        return out

    def _send_dispatch(self, state: StepState, action: Action) -> None:
        j, i, c = action.stage, action.microbatch, action.chunk
        b = self.program.boundaries[j]
        env = state.env[i]
        xs, ids, ws = env[b.xs], env[b.ids], env[b.ws]
        # -1 (a slot routed to another rank) stays -1; int32 on the wire
        local = self.local_ids.to(ids.device)[ids.clamp(min=0)]
        local_ids = torch.where(ids >= 0, local, -1).to(torch.int32)
        tag = message_tag("D", j, i, c)
        messages = []
        for r, rows in zip(self.expert_peers[j], self._blocks(state, j, i, 0, c)):
            sl = slice(rows.start, rows.stop)
            messages.append((r, tag, pack_bytes([xs[sl], ws[sl], local_ids[sl]]), len(rows)))
        self.mailbox.send(messages)

    def _post_rows(self, state: StepState, channel: str, j: int, i: int, c: int = 0) -> None:
        if channel == "C" and j in self.hops:  # the rows of F(j, i), run on another group
            hidden, xdtype = self.row_format  # type: ignore[misc]
            tag = message_tag("C", j, i)
            self._post(state, ("C", j, i, 0), [
                Receive(r, tag, size_of=lambda n: byte_size([((n, hidden), xdtype)]),
                        capacity=byte_size([((state.capacity_rows, hidden), xdtype)]))
                for r in self.expert_peers[j]])
            return
        blocks = self._blocks(state, j, i, 1 if channel == "GD" else 0, c)
        hidden, xdtype, wdtype = state.row_shape
        top_k = state.env[i][self.program.boundaries[j].ws].shape[1]
        tag = message_tag(channel, j, i, c)
        receives = []
        for r, rows in zip(self.expert_peers[j], blocks):
            n = len(rows)
            layout = [((n, hidden), xdtype)] + ([((n, top_k), wdtype)] if channel == "GD" else [])
            receives.append(Receive(r, tag, nbytes=byte_size(layout)))
            receives[-1].layout = layout  # type: ignore[attr-defined]
        self._post(state, (channel, j, i, c), receives)

    def _post(self, state: StepState, key: tuple, receives: list[Receive]) -> None:
        state.recvs[key] = receives
        self.mailbox.post(receives)

    def _wait_counted(self, state: StepState, key: tuple) -> tuple[list, list[int]]:
        """Rows of a message that carried its row count, and the counts."""
        hidden, xdtype = self.row_format  # type: ignore[misc]
        parts, counts = [], []
        for r in state.recvs.pop(key):
            self.mailbox.wait(r)
            parts.append(unpack_bytes(r.payload, [((r.header_value, hidden), xdtype)])[0])
            counts.append(r.header_value)
        return parts, counts

    def _send_hop(self, state: StepState, action: Action) -> None:
        s, i = action.stage, action.microbatch
        env = state.env[i]
        payload, state.hop_sent[(s, i)] = hop.encode({n: env[n] for n in self.hop_names[s]})
        self.mailbox.send_sized(action.peers[0], message_tag("H", s, i), payload)

    def _send_hop_grads(self, state: StepState, action: Action) -> None:
        s, i = action.stage, action.microbatch
        grads = state.grads[i]
        tensors = []
        for name, shape, dtype in state.hop_grads.pop((s, i)):
            g = grads.pop(name, None)
            tensors.append(torch.zeros(shape, dtype=dtype, device=self.device) if g is None else g)
        self.mailbox.send([(action.peers[0], message_tag("GH", s, i), pack_bytes(tensors), None)])

    def _post_hop_grads(self, state: StepState, action: Action) -> None:
        s, i = action.stage, action.microbatch
        layout = [(shape, dtype) for _, shape, dtype in state.hop_sent[(s, i)]]
        r = Receive(action.peers[0], message_tag("GH", s, i), nbytes=byte_size(layout))
        r.layout = layout  # type: ignore[attr-defined]
        self._post(state, ("GH", s, i), [r])

    def _wait_all(self, state: StepState, key: tuple) -> list:
        out = []
        for r in state.recvs.pop(key):
            self.mailbox.wait(r)
            parts = unpack_bytes(r.payload, r.layout)  # type: ignore[attr-defined]
            out.append(parts[0] if len(parts) == 1 else parts)
        return out

    def _send_grad_combine(self, state: StepState, action: Action) -> None:
        j, i, c = action.stage, action.microbatch, action.chunk
        name = self.program.boundaries[j].ys
        rows = state.grads[i][name]  # set by B(j+1, i)
        if c == self._chunks(j)[1] - 1:
            del state.grads[i][name]
        tag = message_tag("GC", j, i, c)
        self.mailbox.send([(r, tag, pack_bytes([rows[block.start:block.stop]]), None)
                           for r, block in zip(self.expert_peers[j], self._blocks(state, j, i, 1, c))])

    def _backward(self, state: StepState, action: Action) -> None:
        s, i = action.stage, action.microbatch
        outs = state.outs.pop((s, i))
        leaves = state.leaves.pop((s, i))
        grads = state.grads[i]
        tensors, seeds = [], []
        last = s == len(self.program.stages) - 1
        if s in self.hops:  # gradients of the values this rank sent across cut s
            sent = state.hop_sent.pop((s, i))
            r = state.recvs.pop(("GH", s, i))[0]
            self.mailbox.wait(r)
            for (name, _, _), g in zip(sent, unpack_bytes(r.payload, r.layout)):  # type: ignore[attr-defined]
                grads[name] = grads[name] + g if name in grads else g
        if s < len(self.program.boundaries):
            b = self.program.boundaries[s]
            chunks = [self._wait_all(state, ("GD", s, i, c)) for c in range(self._chunks(s)[1])]
            parts = [p for peer in zip(*chunks) for p in peer]  # peer by peer, each in chunk order
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
