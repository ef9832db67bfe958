"""Execute one AF-pipe training step: a rank's action list, forward and backward.

Contract: a worker runs the slice of its rank's ``Schedule`` actions it is given, in
order (see ``schedule.py`` for their meaning): ``AttentionWorker.step(batch)`` /
``ExpertWorker.step()`` the forward slice (the attention worker returns its share of the
loss; ``DisaggregatedModel`` sums it over ranks), ``_run_actions()`` the backward slice.
Afterwards every local parameter's ``.grad`` holds its gradient of the global loss:

* attention parameters: summed over the attention group (``GradSync``), each
  micro-batch's loss weighted by its share of the global batch's label tokens, so the
  result equals one process computing the mean loss over the whole batch;
* expert parameters: accumulated on the rank that holds the expert, and summed over
  the replicas when several expert ranks hold it.

Stage bookkeeping (the same as torch.distributed.pipelining's stage backward):
every floating tensor entering a stage that needs a gradient enters as a fresh leaf;
``B(s, i)`` calls ``torch.autograd.backward`` on the stage's outputs with the gradients
that later stages (and the expert ranks) sent back, then hands the leaves' ``.grad``
upstream. Nothing crosses ranks except the boundary rows of ``insert_dispatch``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from fxdisag.codegen.split_stages import StagedProgram
from fxdisag.runtime.grads import GradSync, RowGroup
from fxdisag.runtime.mailbox import Mailbox, Receive, byte_size, pack_bytes, unpack_bytes
from fxdisag.runtime.schedule import Action, ActionKind, Schedule
from fxdisag.runtime.timeline import Span

__all__ = ["AttentionWorker", "ExpertWorker", "IGNORE_INDEX"]

IGNORE_INDEX = -100
_CHANNEL = {"D": 0, "C": 1, "GC": 2, "GD": 3}


def _tag(channel: str, layer: int, microbatch: int) -> int:
    # Distinct per message (gloo matches on tags; NCCL ignores them and relies on FIFO order).
    return ((_CHANNEL[channel] * 256 + layer) * 4096 + microbatch) * 2


def _row_messages(peers: list[int], counts: list[int], tensors: list[torch.Tensor], tag: int) -> list:
    """One message per peer: its consecutive block of ``counts[k]`` rows of every tensor."""
    messages, start = [], 0
    for peer, n in zip(peers, counts):
        messages.append((peer, tag, pack_bytes([t[start : start + n] for t in tensors]), None))
        start += n
    return messages


class _Worker:
    def __init__(self, schedule: Schedule, rank: int, device: torch.device, trace: bool):
        self.schedule = schedule
        self.rank = rank
        self.device = device
        self.mailbox = Mailbox(device)
        self.actions = schedule.actions[rank]
        self.action_offset = 0  # index of self.actions[0] in the rank's full list
        self.trace_enabled = trace
        self.spans: list[Span] = []  # wall-clock (time.time()) spans of the current step

    def _run_actions(self) -> None:
        for index, action in enumerate(self.actions):
            start = time.time()
            waited = self.mailbox.wait_seconds
            try:
                self.execute(action)
            except Exception as exc:
                from fxdisag.runtime.schedule import format_grid, grid_step

                where = f"rank {self.rank} failed at action {self.action_offset + index} ({action})"
                if set(self.schedule.attention_ranks) & set(self.schedule.expert_ranks):  # EP: no A/E grid
                    raise RuntimeError(f"{where}: {type(exc).__name__}: {exc}") from exc
                step = grid_step(self.schedule, self.rank, self.action_offset + index)
                mark = (step, self.rank) if step is not None else None
                raise RuntimeError(
                    f"{where}, grid step {step} (marked !!): {type(exc).__name__}: {exc}\n"
                    + format_grid(self.schedule, mark=mark)
                ) from exc
            if self.trace_enabled:
                self._record(action, start, time.time(), self.mailbox.wait_seconds - waited)

    def _record(self, action: Action, start: float, end: float, waited: float) -> None:
        kind = action.kind
        if kind.is_compute:
            if waited > 0:
                self.spans.append(Span(self.rank, action, start, start + waited, "recv-wait"))
            self.spans.append(Span(self.rank, action, min(start + waited, end), end, "compute"))
        elif kind.is_send:
            # The post, not the transfer: gloo moves the bytes in the background.
            self.spans.append(Span(self.rank, action, start, end, "send"))
        elif kind is ActionKind.REDUCE:
            self.spans.append(Span(self.rank, action, start, end, "reduce"))

    def execute(self, action: Action) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def begin_backward(self) -> None:
        """Set earlier gradients aside, so REDUCE sums only this step's (see grads.py)."""
        self.grad_sync.begin()


class AttentionWorker(_Worker):
    """Runs the attention stages of the program for this rank's share of the batch."""

    def __init__(
        self,
        program: StagedProgram,
        schedule: Schedule,
        rank: int,
        owner: list[int],
        local_ids: list[int],
        device: torch.device,
        attention_group: dist.ProcessGroup | None,
        trace: bool = False,
    ):
        super().__init__(schedule, rank, device, trace)
        self.program = program
        self.owner = torch.tensor(owner, dtype=torch.long)  # expert -> slot in expert_ranks
        self.local_ids = torch.tensor(local_ids, dtype=torch.long)  # expert -> id on that slot's rank
        self.expert_ranks = list(schedule.expert_ranks)
        self.attention_ranks = list(schedule.attention_ranks)
        self.constants = self._constants()
        seen: dict[int, nn.Parameter] = {}
        for stage in program.stages:
            for p in stage.module.parameters():
                seen.setdefault(id(p), p)
        self.params = list(seen.values())
        self.grad_sync = GradSync(self.params, [RowGroup(self.params, attention_group)])

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

    # ---- step
    def step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        m = self.schedule.num_microbatches
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
        self.env: list[dict[str, object]] = []
        self.loss_scale: list[float] = []
        for i in range(m):
            env = dict(self.constants)
            for name in self.program.inputs:
                if name not in shards:
                    raise ValueError(f"the program expects input {name!r}; got {sorted(shards)}")
                env[name] = shards[name][i]
            self.env.append(env)
            if labels is not None:
                n = int((shards["labels"][i][:, 1:] != IGNORE_INDEX).sum())
                self.loss_scale.append(n / total_tokens)
            else:
                self.loss_scale.append(1.0 / (m * n_attn))
        self.leaves: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.outs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self.grads: list[dict[str, torch.Tensor]] = [{} for _ in range(m)]
        self.counts: dict[tuple[int, int], list[int]] = {}
        self.recvs: dict[tuple[str, int, int], list[Receive]] = {}
        self.losses: list[torch.Tensor] = []
        self.spans = []
        self._run_actions()
        local = torch.stack(self.losses).sum() if self.losses else torch.zeros(())
        return local.detach()

    def clear(self) -> None:
        """Drop the step's activations and buffers (after its backward, or after a no-grad forward)."""
        for name in ("env", "leaves", "outs", "grads", "recvs", "losses"):
            self.__dict__.pop(name, None)

    def execute(self, action: Action) -> None:
        K = ActionKind
        j, i = action.stage, action.microbatch
        if action.kind is K.F:
            self._forward(j, i)
        elif action.kind is K.SEND_D:
            self._send_dispatch(j, i)
        elif action.kind is K.RECV_C:
            self._post_rows("C", j, i)
        elif action.kind is K.B:
            self._backward(j, i)
        elif action.kind is K.SEND_GC:
            self._send_rows("GC", j, i, self.grads[i].pop(self.program.boundaries[j].ys))  # set by B(j+1, i)
        elif action.kind is K.RECV_GD:
            self._post_rows("GD", j, i)
        elif action.kind is K.REDUCE:
            self.mailbox.drain()
            self.grad_sync.finish()
        else:
            raise RuntimeError(f"attention rank {self.rank} cannot run {action}")

    def _forward(self, s: int, i: int) -> None:
        stage = self.program.stages[s]
        env = self.env[i]
        if s > 0:
            b = self.program.boundaries[s - 1]
            parts = self._wait_all(("C", s - 1, i))
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
        outputs = stage.module(*args)
        outs = {}
        for name, value in zip(stage.outputs, outputs):
            env[name] = value
            if isinstance(value, torch.Tensor) and value.requires_grad:
                outs[name] = value
        self.leaves[(s, i)] = leaves
        self.outs[(s, i)] = outs
        if s == len(self.program.stages) - 1 and self.program.outputs:
            loss = env[self.program.outputs[0]]
            self.losses.append(loss.detach() * self.loss_scale[i])

    def _counts(self, j: int, i: int) -> list[int]:
        """Rows micro-batch i sends each expert rank at MoE layer j (known once F(j, i) ran)."""
        counts = self.counts.get((j, i))
        if counts is None:
            b = self.program.boundaries[j]
            ids = self.env[i][b.ids]
            slot = self.owner.to(ids.device)[ids.view(-1)]
            counts = torch.bincount(slot, minlength=len(self.expert_ranks)).tolist()
            self.counts[(j, i)] = counts
            xs, ws = self.env[i][b.xs], self.env[i][b.ws]
            self.row_shape = (xs.shape[1], xs.dtype, ws.dtype)
        return counts

    def _send_dispatch(self, j: int, i: int) -> None:
        b = self.program.boundaries[j]
        env = self.env[i]
        xs, ids, ws = env[b.xs], env[b.ids], env[b.ws]
        counts = self._counts(j, i)
        local_ids = self.local_ids.to(ids.device)[ids.view(-1)].view(-1, 1)
        messages, start = [], 0
        for r, n in zip(self.expert_ranks, counts):
            sl = slice(start, start + n)
            messages.append((r, _tag("D", j, i), pack_bytes([xs[sl], ws[sl], local_ids[sl]]), n))
            start += n
        self.mailbox.send(messages)

    def _post_rows(self, channel: str, j: int, i: int) -> None:
        counts = self._counts(j, i)
        hidden, xdtype, wdtype = self.row_shape
        receives = []
        for r, n in zip(self.expert_ranks, counts):
            layout = [((n, hidden), xdtype)] + ([((n, 1), wdtype)] if channel == "GD" else [])
            receives.append(Receive(r, _tag(channel, j, i), nbytes=byte_size(layout)))
            receives[-1].layout = layout  # type: ignore[attr-defined]
        self.recvs[(channel, j, i)] = receives
        self.mailbox.post(receives)

    def _wait_all(self, key: tuple[str, int, int]) -> list[torch.Tensor] | list[list[torch.Tensor]]:
        out = []
        for r in self.recvs.pop(key):
            self.mailbox.wait(r)
            parts = unpack_bytes(r.payload, r.layout)  # type: ignore[attr-defined]
            out.append(parts[0] if len(parts) == 1 else parts)
        return out

    def _send_rows(self, channel: str, j: int, i: int, rows: torch.Tensor) -> None:
        self.mailbox.send(_row_messages(self.expert_ranks, self.counts[(j, i)], [rows], _tag(channel, j, i)))

    def _backward(self, s: int, i: int) -> None:
        outs = self.outs.pop((s, i))
        leaves = self.leaves.pop((s, i))
        grads = self.grads[i]
        tensors, seeds = [], []
        last = s == len(self.program.stages) - 1
        if s < len(self.program.boundaries):
            b = self.program.boundaries[s]
            parts = self._wait_all(("GD", s, i))
            gx = torch.cat([p[0] for p in parts])
            gw = torch.cat([p[1] for p in parts])
            grads[b.xs] = gx
            grads[b.ws] = gw
        for name, value in outs.items():
            if last and name == self.program.outputs[0]:
                tensors.append(value)
                seeds.append(torch.full_like(value, self.loss_scale[i]))
            elif name in grads:
                tensors.append(value)
                seeds.append(grads.pop(name))
        if tensors:
            torch.autograd.backward(tensors, seeds)
        for name, leaf in leaves.items():
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            grads[name] = grads[name] + g if name in grads else g
        for name in list(self.env[i]):
            if name in outs:
                del self.env[i][name]


class ExpertWorker(_Worker):
    """Runs the local experts of every MoE layer on the rows the attention ranks send."""

    def __init__(
        self,
        experts: list[nn.Module],
        schedule: Schedule,
        rank: int,
        hidden_size: int,
        dtypes: tuple[torch.dtype, torch.dtype],
        device: torch.device,
        trace: bool = False,
        replica_groups: list[tuple[list[int], dist.ProcessGroup]] = (),
    ):
        """``replica_groups``: (local ids of the shared experts, process group) per replica set."""
        super().__init__(schedule, rank, device, trace)
        self.experts = experts
        self.attention_ranks = list(schedule.attention_ranks)
        self.hidden = hidden_size
        self.xdtype, self.wdtype = dtypes
        # The most rows one attention rank can send in one dispatch (tokens per micro-batch x
        # top-k); set per step from the batch shape. Receives are posted with this capacity.
        self.capacity_rows = 0
        seen: dict[int, nn.Parameter] = {}
        for mod in experts:
            for p in mod.parameters():
                seen.setdefault(id(p), p)
        self.params = list(seen.values())
        # Expert weights are [E_local, ...]: a replica set sums the rows of its shared experts.
        self.grad_sync = GradSync(self.params, [RowGroup(self.params, g, rows) for rows, g in replica_groups])

    def step(self) -> torch.Tensor:
        self.recvs: dict[tuple[str, int, int], list[Receive]] = {}
        self.saved: dict[tuple[int, int], tuple] = {}
        self.counts: dict[tuple[int, int], list[int]] = {}
        self.results: dict[tuple[int, int], torch.Tensor] = {}
        self.spans = []
        self._run_actions()
        return torch.zeros(())

    def _dispatch_layout(self, n: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [((n, self.hidden), self.xdtype), ((n, 1), self.wdtype), ((n, 1), torch.int64)]


    def execute(self, action: Action) -> None:
        K = ActionKind
        j, i = action.stage, action.microbatch
        if action.kind is K.RECV_D:
            capacity = byte_size(self._dispatch_layout(self.capacity_rows))
            rs = [
                Receive(a, _tag("D", j, i), size_of=lambda n: byte_size(self._dispatch_layout(n)), capacity=capacity)
                for a in self.attention_ranks
            ]
            self.recvs[("D", j, i)] = rs
            self.mailbox.post(rs)
        elif action.kind is K.EF:
            xs, ws, ids, counts = [], [], [], []
            for r in self.recvs.pop(("D", j, i)):
                self.mailbox.wait(r)
                n = r.header_value  # the row count
                x, w, e = unpack_bytes(r.payload, self._dispatch_layout(n))
                xs.append(x)
                ws.append(w)
                ids.append(e)
                counts.append(n)
            x = torch.cat(xs).requires_grad_(True)
            w = torch.cat(ws).requires_grad_(True)
            e = torch.cat(ids)
            y = self.experts[j](x, e, w)
            self.saved[(j, i)] = (x, w, y)
            self.counts[(j, i)] = counts
            self.results[(j, i)] = y.detach()
        elif action.kind is K.SEND_C:
            self._send(("C", j, i), [self.results.pop((j, i))])
        elif action.kind is K.RECV_GC:
            rs = []
            for a, n in zip(self.attention_ranks, self.counts[(j, i)]):
                rs.append(Receive(a, _tag("GC", j, i), nbytes=byte_size([((n, self.hidden), self.xdtype)])))
            self.recvs[("GC", j, i)] = rs
            self.mailbox.post(rs)
        elif action.kind is K.EB:
            parts = []
            for r, n in zip(self.recvs.pop(("GC", j, i)), self.counts[(j, i)]):
                self.mailbox.wait(r)
                parts.append(unpack_bytes(r.payload, [((n, self.hidden), self.xdtype)])[0])
            x, w, y = self.saved.pop((j, i))
            torch.autograd.backward([y], [torch.cat(parts)])
            self.results[(j, i)] = (x.grad, w.grad)
        elif action.kind is K.SEND_GD:
            gx, gw = self.results.pop((j, i))
            self._send(("GD", j, i), [gx, gw])
        elif action.kind is K.REDUCE:
            self.mailbox.drain()
            self.grad_sync.finish()
        else:
            raise RuntimeError(f"expert rank {self.rank} cannot run {action}")

    def _send(self, key: tuple[str, int, int], tensors: list[torch.Tensor]) -> None:
        channel, j, i = key
        self.mailbox.send(_row_messages(self.attention_ranks, self.counts[(j, i)], tensors, _tag(channel, j, i)))
