"""``fxdisag.disaggregate``: one call from an HF MoE model to a disaggregated training module.

Contract::

    dmodel = fxdisag.disaggregate(model, example_inputs, plan=Plan | "auto")
    out = dmodel(input_ids=ids, labels=labels)   # every rank, the same global batch
    out.loss.backward()                           # runs the pipeline's backward half
    opt.step()                                    # opt built on dmodel.parameters()

* every rank runs the same code under ``torchrun`` (``torch.distributed`` is initialised
  from the environment when it is not yet: gloo on CPU, NCCL when CUDA is available);
* ``dmodel.parameters()`` are the rank's own parameters: attention ranks hold everything
  but the routed experts (replicated, data parallel), expert ranks hold their experts;
* ``out.loss`` is the loss of the whole global batch, identical on every rank; after
  ``backward`` each local parameter's ``.grad`` equals the single-process gradient;
* ``consolidated_state_dict()`` / ``consolidated_grads()`` return full tensors under the
  model's original parameter names (a collective: call it on every rank).

Pipeline: capture -> plan -> insert_dispatch -> split_stages -> ``Plan.schedule()`` ->
a :class:`~fxdisag.runtime.runner.StepRunner` with the rank's handler sets. The forward
call runs the schedule's forward phase; ``loss.backward()`` runs the backward phase.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from fxdisag.capture import CapturedModel, capture
from fxdisag.dump import maybe_dump_graph, maybe_dump_text
from fxdisag.codegen.insert_dispatch import insert_dispatch
from fxdisag.codegen.split_stages import StagedProgram, split_stages
from fxdisag.planner.plan import Plan
from fxdisag.runtime import dispatch
from fxdisag.runtime.attention import AttentionHandlers
from fxdisag.runtime.expert import ExpertHandlers
from fxdisag.runtime.experts import WithSharedExpert, expert_tensors, local_experts, model_experts
from fxdisag.runtime.faults import DEFAULT_TIMEOUT, agree_on_inputs, as_timedelta, check_options, collective, wait_work
from fxdisag.runtime.mailbox import Mailbox
from fxdisag.runtime.routing import Routing, SlotRouting
from fxdisag.runtime.runner import StepRunner
from fxdisag.schedule import Schedule, format_grid
from fxdisag.weights import HFCheckpoint, SeededInit, WeightSource, is_meta_model, materialize, materialize_experts

__all__ = ["DisaggregatedModel", "DisaggregatedOutput", "build", "disaggregate"]


@dataclass
class DisaggregatedOutput:
    loss: torch.Tensor
    logits: None = None


def _init_distributed(timeout: float = DEFAULT_TIMEOUT) -> None:
    if not dist.is_initialized():
        _init_process_group(timeout)


def _init_process_group(timeout: float = DEFAULT_TIMEOUT) -> None:
    if "RANK" not in os.environ:
        raise RuntimeError(
            "fxdisag.disaggregate needs torch.distributed: launch with torchrun "
            "(e.g. `torchrun --nproc-per-node 2 train.py`) or call dist.init_process_group first"
        )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # The default group's timeout bounds what fxdisag does not wait on itself (the plan's
    # broadcast, cluster measurement): a hung peer fails the job in `timeout`, not gloo's 30 min.
    dist.init_process_group(backend, timeout=as_timedelta(timeout))


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _resolve_plan(plan, captured: CapturedModel, example_inputs, cluster):
    if not isinstance(plan, str):
        return plan
    if plan != "auto":
        raise ValueError(f"plan must be a Plan or 'auto', got {plan!r}")
    from fxdisag.planner.auto import auto_plan

    return auto_plan(captured, example_inputs, cluster=cluster)


class _PipelineBackward(torch.autograd.Function):
    """Makes ``loss.backward()`` run the backward half of the schedule on this rank."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, loss: torch.Tensor, owner: "DisaggregatedModel") -> torch.Tensor:
        ctx.owner = owner
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.owner._run_backward(float(grad))
        return None, None, None


class DisaggregatedModel(nn.Module):
    def __init__(
        self,
        captured: CapturedModel,
        program: StagedProgram,
        schedule: Schedule,
        plan: Plan,
        routing: Routing,
        device: torch.device,
        groups: dict,
        trace: bool,
        release_unused: bool = True,
        *,
        expert_weights: str = "slices",
        compile_stages: bool = False,
        weights: WeightSource | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        check_inputs: str = "first",
    ):
        super().__init__()
        self.plan = plan
        self.schedule = schedule
        self.layout = captured.layout
        self.program = program
        self.rank = dist.get_rank()
        self.device = device
        self.mode = plan.kind
        self.compile_stages = compile_stages
        self.role = "EP" if plan.kind == "ep" else schedule.role(self.rank)
        self.__dict__["_model"] = captured.model
        self._anchor = torch.zeros((), requires_grad=True)
        self._pending_backward = False
        roles = schedule.roles(self.rank)
        self.has_attention = "A" in roles
        self.has_experts = "E" in roles
        self.timeout = timeout  # seconds any wait on a peer may take (fxdisag.runtime.faults)
        self.check_inputs = check_inputs
        self._inputs_checked = False  # check_inputs="first": whether a step has passed the check
        self._world = groups["world"]  # fxdisag's collectives over every rank, with `timeout`
        self.mailbox = Mailbox(device, timeout=timeout)
        self.runner = StepRunner(schedule, self.rank, self.mailbox, trace)
        self.materialized_bytes = 0  # a meta-device build: bytes this rank gave storage to
        recompute = plan.recompute
        self._attention: AttentionHandlers | None = None
        self._experts: ExpertHandlers | None = None
        self.shared_modules: dict[int, nn.Module] = {}  # MoE layer -> shared experts this rank hosts
        multi = plan.pipeline_depth > 1
        stage_map = schedule.stages if multi else None
        self.stage_map = stage_map
        first = captured.model.get_submodule(self.layout.moe[0].experts)
        dtype = next(first.parameters()).dtype
        # Shared experts placed on expert ranks (Plan.shared_expert_ranks): MoE layer -> FQN.
        self.shared_hosts = list(plan.shared_expert_ranks)
        self.shared_on_experts = {b.index: b.shared_fqn for b in program.boundaries if b.shared_fqn is not None}
        if (not self.shared_hosts) != (not self.shared_on_experts):
            raise ValueError("the split program's shared experts do not match the plan's shared_expert_ranks "
                             f"({self.shared_hosts}); build the program from this plan")
        if self.has_attention:
            if multi:
                _check_parameters_stay_in_group(program, schedule)
                group = stage_map.attention_slot(self.rank)[0]
                mine, own_group = stage_map.stages_of(group), sorted(stage_map.attention_groups[group])
            else:
                mine, own_group = range(len(program.stages)), list(schedule.attention_ranks)
            stages = nn.ModuleList([program.stages[s].module for s in mine])
            if weights is not None:  # a meta-device model: give this rank's stages their tensors
                self.materialized_bytes += materialize(captured.model, list(stages.parameters()) + list(
                    stages.buffers()), weights)
            self.stages = stages.to(device)
            for s in mine:
                maybe_dump_graph(f"attention_stage{s}", program.stages[s].module)
            owner, local_ids = routing.owner_slot(self.rank), routing.local_id(self.rank)
            for host in self.shared_hosts:  # the shared experts: id E (+ slot), on its host, after its routed ids
                owner = owner + [list(plan.expert_ranks).index(host)]
                local_ids = local_ids + [len(routing.held(host))]
            self._attention = AttentionHandlers(
                program, self.rank, own_group, list(schedule.expert_ranks),
                schedule.num_microbatches, owner, local_ids,
                self.mailbox, device, groups["attention"], recompute=recompute.get("attention", False),
                stages=stage_map, row_format=(self.layout.hidden_size, dtype), compile_stages=compile_stages,
                chunks=schedule.chunks, shared_layers=frozenset(self.shared_on_experts),
            )
            self.runner.register(self._attention)
        if self.has_experts:
            mine = routing.held(self.rank)
            model = captured.model
            self.expert_layers = stage_map.layers_of(stage_map.expert_group_of(self.rank)) if multi \
                else list(range(len(self.layout.moe)))
            build_experts = model_experts if expert_weights == "model" else local_experts
            local = [build_experts(model.get_submodule(self.layout.moe[j].experts), mine) for j in self.expert_layers]
            if weights is not None:
                for j, mod in zip(self.expert_layers, local):
                    self.materialized_bytes += materialize_experts(model, self.layout.moe[j].experts, mod, weights)
            # The host computes the shared experts with the model's own modules (they train in place).
            self.shared_modules = {j: model.get_submodule(fqn) for j, fqn in self.shared_on_experts.items()
                                   if self.rank in self.shared_hosts and j in self.expert_layers}
            if weights is not None and self.shared_modules:
                mods = list(self.shared_modules.values())
                self.materialized_bytes += materialize(
                    model, [t for m in mods for t in list(m.parameters()) + list(m.buffers())], weights)
            local = [WithSharedExpert(mod, self.shared_modules[j], len(mine)) if j in self.shared_modules else mod
                     for j, mod in zip(self.expert_layers, local)]
            self.local_experts = nn.ModuleList(local).to(device)
            self.expert_ids = mine
            for j in self.expert_layers:
                maybe_dump_graph(f"expert_boundary{j}", program.boundaries[j].module)
            # Rows of the expert tensors the rank computes with: local slots, or global ids.
            row_of = (lambda e: e) if expert_weights == "model" else mine.index
            replica_groups = [
                ([row_of(e) for e in shared], groups[ranks])
                for ranks, shared in routing.replica_sets
                if self.rank in ranks
            ]
            one_group = sorted(stage_map.attention_groups[0]) if multi else list(schedule.attention_ranks)
            self._experts = ExpertHandlers(
                dict(zip(self.expert_layers, self.local_experts)), one_group, schedule.num_microbatches,
                self.layout.hidden_size, (dtype, dtype),
                {j: self.layout.moe[j].top_k + (j in self.shared_on_experts) for j in self.expert_layers},
                self.mailbox,
                replica_groups, recompute=recompute.get("experts", False),
                hops=stage_map.hops if multi else frozenset(), compile_stages=compile_stages,
                chunks=schedule.chunks, shared_group=groups.get("shared"),
            )
            self.runner.register(self._experts)
        # This rank's data-parallel replicas (its attention group) and, per set of experts it
        # shares with replicas, (local indices, process group); None / [] where not a member.
        self.attention_group = groups["attention"] if self.has_attention else None
        self.expert_replica_groups = replica_groups if self.has_experts else []
        self.runner.check_complete()
        if release_unused:
            self._release_unused_parameters()

    def _release_unused_parameters(self) -> None:
        """Free what this rank never computes with: the full experts weights everywhere (expert
        ranks run their own slices), and the attention side's weights on expert-only ranks.

        Each such parameter is replaced, in the module that owns it, by a meta-device one of
        the same shape (modules are shared with the captured graph and the split program,
        so they see it too); shapes stay for checkpoint consolidation.
        """
        model = self._model
        experts = [model.get_submodule(m.experts) for m in self.layout.moe]
        drop = {id(p) for mod in experts for p in mod.parameters()}
        drop |= {id(p) for fqn in self.shared_on_experts.values() for p in model.get_submodule(fqn).parameters()}
        if not self.has_attention:
            drop |= {id(p) for p in model.parameters()}
        elif self.stage_map is not None:  # only this group's stages
            keep = {id(p) for p in self._attention.params}
            drop |= {id(p) for p in model.parameters() if id(p) not in keep}
        if self.has_experts:  # the shared experts this rank hosts
            drop -= {id(p) for mod in self.shared_modules.values() for p in mod.parameters()}
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and id(p) in drop and not p.is_meta:
                    module._parameters[name] = nn.Parameter(
                        torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                    )

    def attention_parameters(self) -> list[nn.Parameter]:
        """The parameters this rank all-reduces over the attention group (empty on expert ranks)."""
        return list(self._attention.params) if self._attention is not None else []

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's slices of the routed experts, every MoE layer it holds, and the shared
        experts it hosts (``Plan.shared_expert_ranks``; empty on attention-only ranks)."""
        return list(self.local_experts.parameters()) if self.has_experts else []

    def named_local_tensors(self) -> list[tuple[str, torch.Tensor, tuple[int, ...] | None, slice | list[int]]]:
        """What this rank holds, under the model's original names: ``(name, tensor, expert_ids, rows)``.

        Attention side (every replica lists it): parameters and persistent buffers, ``expert_ids``
        None, ``rows`` ``slice(None)``. Routed experts: the parameter the rank computes with,
        whose rows ``tensor[rows]`` are the global experts ``expert_ids`` in order. ``tensor``
        is the live parameter (checkpoints map optimizer state through its identity).
        """
        out: list[tuple[str, torch.Tensor, tuple[int, ...] | None, slice | list[int]]] = []
        experts = {m.experts for m in self.layout.moe}
        if self.has_attention:
            keep = {id(p) for p in self._attention.params}
            staged = {id(p) for st in self.program.stages for p in st.module.parameters()}
            for name, p in self._model.named_parameters():
                if name.rsplit(".", 1)[0] in experts or p.is_meta or self._moved(name):
                    continue
                if self.stage_map is not None and id(p) not in keep and (
                        id(p) in staged or self.stage_map.attention_slot(self.rank)[0] != 0):
                    continue  # as in _owned: another group's stage holds it
                out.append((name, p, None, slice(None)))
            persistent = set(self._model.state_dict(keep_vars=True))
            for name, b in self._model.named_buffers():
                if name in persistent and not b.is_meta and name.rsplit(".", 1)[0] not in experts:
                    out.append((name, b, None, slice(None)))
        if self.has_experts:
            for m, mod in zip([self.layout.moe[j] for j in self.expert_layers], self.local_experts):
                for pname, p, rows in expert_tensors(mod):
                    out.append((f"{m.experts}.{pname}", p, tuple(mod.fxdisag_expert_ids), rows))
            for j, mod in self.shared_modules.items():
                out += [(f"{self.shared_on_experts[j]}.{n}", p, None, slice(None)) for n, p in mod.named_parameters()]
        return out

    def _moved(self, name: str) -> bool:
        """Whether parameter ``name`` belongs to shared experts an expert rank hosts."""
        return any(name.startswith(fqn + ".") for fqn in self.shared_on_experts.values())

    # ---- expert load (fxdisag.balance)
    def expert_token_counts(self) -> dict[int, dict[int, int]]:
        """Tokens each of this rank's experts computed in training steps since the last reset:
        {MoE layer: {global expert id: tokens}} (empty on attention-only ranks). Local: no collective."""
        if not self.has_experts:
            return {}
        out = {}
        for j, mod in zip(self.expert_layers, self.local_experts):
            counts = self._experts.token_counts[j].tolist()
            out[j] = dict(zip(mod.fxdisag_expert_ids, counts))
        return out

    def expert_seconds_per_pair(self) -> float | None:
        """Measured seconds of expert forward per (token, expert) pair since the last reset
        (CPU wall clock around the expert calls; None on attention-only ranks or before any)."""
        if not self.has_experts or not self._experts.computed_pairs:
            return None
        return self._experts.compute_seconds / self._experts.computed_pairs

    def sample_routes(self, cap: int) -> None:
        """Keep each token's routed experts, for at most ``cap`` tokens per MoE layer (0: off),
        until :meth:`reset_expert_counters` (attention ranks; a scatter per layer and micro-batch)."""
        if self._attention is not None:
            self._attention.route_sample_cap = int(cap)

    def routes_sample(self) -> dict[int, torch.Tensor]:
        """The sampled tokens' top_k global expert ids per MoE layer ([tokens, top_k]; empty on expert ranks)."""
        if self._attention is None:
            return {}
        return {j: torch.cat(ts) for j, ts in self._attention.route_samples.items() if ts}

    def reset_expert_counters(self) -> None:
        if self.has_experts:
            for t in self._experts.token_counts.values():
                t.zero_()
            self._experts.compute_seconds, self._experts.computed_pairs = 0.0, 0
        if self._attention is not None:
            self._attention.route_samples.clear()

    def rebind_placement(self, plan: Plan) -> None:
        """Route by ``plan``'s expert placement from the next step on (collective-free: every
        rank calls it with the same plan). Only the placement may differ from the current
        plan, and the rank's expert rows must already hold the experts the new placement
        gives it, ascending (``fxdisag.balance`` moves them first)."""
        if self.shared_hosts:
            raise NotImplementedError(f"rebind_placement: the shared experts run on expert ranks {self.shared_hosts} "
                                      "as entries of every routing table; re-placing around them is not supported")
        same = dataclasses.replace(plan, expert_placement=self.plan.expert_placement, expert_owners=self.plan.expert_owners)
        if same != self.plan:
            raise ValueError("rebind_placement: the new plan may change only expert_placement (and its owners)")
        num_experts = len(self.plan.expert_placement)
        routing = Routing.from_plan(plan, num_experts)
        if self.has_experts:
            held = routing.held(self.rank)
            for mod in self.local_experts:
                if list(mod.fxdisag_expert_ids) != held:
                    raise ValueError(f"rank {self.rank} holds experts {list(mod.fxdisag_expert_ids)}; the new placement "
                                     f"gives it {held}: move the rows first")
            self.expert_ids = held
        if self._attention is not None:
            owner = routing.owner_slot(self.rank)
            self._attention.owner = torch.tensor(owner, dtype=torch.long)
            self._attention.local_ids = torch.tensor(routing.local_id(self.rank), dtype=torch.long)
            for stage in self.program.stages:  # the owner table pack() was given at build time
                gm = stage.module
                changed = False
                for node in gm.graph.nodes:
                    if node.op == "call_function" and node.target is dispatch.pack:
                        node.args = (*node.args[:3], tuple(owner), *node.args[4:])
                        changed = True
                if changed:
                    gm.recompile()
        self.plan = plan

    def step_sent_bytes(self) -> dict[int, int]:
        """Bytes this rank posted to each peer over the network in the last step (headers included)."""
        return dict(self.mailbox.sent_bytes)

    # ---- training step
    def _check_batch(self, batch: Mapping[str, torch.Tensor]) -> None:
        if "labels" not in batch:
            raise ValueError("fxdisag trains with a loss: pass labels=... (input_ids are fine as labels for an LM)")
        b = self.plan.microbatch_size
        if b is None:
            return
        n_attn, m = len(self.plan.attention_ranks) // self.plan.pipeline_depth, self.schedule.num_microbatches
        for name, value in batch.items():
            if value.shape[0] != n_attn * m * b:
                raise ValueError(
                    f"{name} has batch size {value.shape[0]}, but the plan binds micro-batches of {b} sequence(s): "
                    f"{n_attn} attention rank(s) x {m} micro-batches x {b} = {n_attn * m * b} sequences per call. "
                    "Pass batches of that size, or make the plan with microbatch_size=None to take it from the batch"
                )

    def _check_step(self, batch: Mapping[str, torch.Tensor]) -> None:
        """The step's checks, on every rank before any message; on a checked step
        (``check_inputs``) the ranks agree on their outcome and compare batch hashes in one
        collective, so every rank raises the same error (not a lost peer on the others)."""
        error: Exception | None = None
        try:
            if self._pending_backward:
                raise RuntimeError(
                    "the previous step's loss.backward() was never called; fxdisag runs the pipeline's backward "
                    "half from it. Call loss.backward() after every forward (or run the forward under "
                    "torch.no_grad()).")
            self._check_batch(batch)
        except (ValueError, RuntimeError) as exc:
            error = exc
        if self.check_inputs == "always" or (self.check_inputs == "first" and not self._inputs_checked):
            agree_on_inputs(batch, error, self._world, self.timeout)
            self._inputs_checked = True
        elif error is not None:
            raise error

    def forward(self, **batch: torch.Tensor) -> DisaggregatedOutput:
        self._check_step(batch)
        self.runner.start(batch)
        self.runner.run("forward")
        loss = self.runner.local_loss().to(self.device).reshape(())
        wait_work(dist.all_reduce(loss, group=self._world, async_op=True), self.rank,
                  [r for r in range(dist.get_world_size()) if r != self.rank],
                  "the loss all-reduce did not complete", self.timeout)
        if torch.is_grad_enabled():
            self._pending_backward = True
            loss = _PipelineBackward.apply(self._anchor, loss.cpu(), self)
        else:
            self.runner.finish_without_backward()
        return DisaggregatedOutput(loss=loss)

    def _run_backward(self, loss_grad: float) -> None:
        try:
            self.runner.run("backward", loss_grad=loss_grad)
        finally:
            self._pending_backward = False

    # ---- checkpoints
    def _owned(self, grads: bool) -> dict[str, tuple[tuple[int, ...] | None, torch.Tensor]]:
        owned: dict[str, tuple[tuple[int, ...] | None, torch.Tensor]] = {}
        experts = {m.experts for m in self.layout.moe}
        if self.has_attention and self._writes_attention():
            keep = {id(p) for p in self._attention.params}
            staged = {id(p) for st in self.program.stages for p in st.module.parameters()}
            for name, p in self._model.named_parameters():
                if name.rsplit(".", 1)[0] in experts or self._moved(name):
                    continue
                if self.stage_map is not None and id(p) not in keep and (
                        id(p) in staged or self.stage_map.attention_slot(self.rank)[0] != 0):
                    continue  # another group's stage holds it (a parameter in no stage: group 0 writes it)
                t = p.grad if grads else p.detach()
                owned[name] = (None, None if t is None else t.detach().cpu())
        if self.has_experts:
            for m, mod in zip([self.layout.moe[j] for j in self.expert_layers], self.local_experts):
                ids = mod.fxdisag_expert_ids
                for pname, p, rows in expert_tensors(mod):
                    t = p.grad if grads else p.detach()
                    owned[f"{m.experts}.{pname}"] = (ids, None if t is None else t.detach()[rows].cpu())
            for j, mod in self.shared_modules.items():
                for pname, p in mod.named_parameters():
                    t = p.grad if grads else p.detach()
                    owned[f"{self.shared_on_experts[j]}.{pname}"] = (None, None if t is None else t.detach().cpu())
        return owned

    def _writes_attention(self) -> bool:
        """Whether this rank contributes the attention side to a consolidated dict: the first
        rank of its attention group (every group at p > 1: each holds other stages)."""
        if self.stage_map is None:
            return self.rank == self.schedule.attention_ranks[0]
        g, slot = self.stage_map.attention_slot(self.rank)
        return slot == 0

    def _consolidate(self, grads: bool) -> dict[str, torch.Tensor | None]:
        pieces: list[Any] = [None] * dist.get_world_size()
        with collective(self.rank, [r for r in range(len(pieces)) if r != self.rank],
                        "the consolidation's all_gather_object did not complete", self.timeout):
            dist.all_gather_object(pieces, self._owned(grads), group=self._world)
        full: dict[str, torch.Tensor | None] = {}
        for owned in pieces:
            for name, (ids, t) in owned.items():
                if ids is None:
                    full[name] = t
                    continue
                shape = dict(self._model.named_parameters())[name].shape
                if full.get(name) is None:
                    full[name] = None if t is None else torch.zeros(shape, dtype=t.dtype)
                if t is not None:
                    full[name][list(ids)] = t
        order = [n for n, _ in self._model.named_parameters()]
        return {n: full.get(n) for n in order}

    # ---- timeline
    def step_spans(self) -> list:
        """The last step's spans of every rank, seconds from the step's first span (collective).

        Needs ``disaggregate(..., trace=True)``.
        """
        if not self.runner.trace:
            raise RuntimeError("no timeline recorded: build the model with fxdisag.disaggregate(..., trace=True)")
        gathered: list[Any] = [None] * dist.get_world_size()
        with collective(self.rank, [r for r in range(len(gathered)) if r != self.rank],
                        "the timeline's all_gather_object did not complete", self.timeout):
            dist.all_gather_object(gathered, self.runner.spans, group=self._world)
        spans = [s for rank_spans in gathered for s in rank_spans]
        t0 = min((s.start for s in spans), default=0.0)
        return [dataclasses.replace(s, start=s.start - t0, end=s.end - t0) for s in spans]

    def write_timeline(self, trace_json: str | None = None, png: str | None = None, title: str | None = None) -> list:
        """Write the last step as a Chrome trace and/or a PNG Gantt chart titled ``title``
        (collective; rank 0 writes)."""
        from fxdisag.runtime.timeline import chrome_trace, gantt_png

        spans = self.step_spans()
        if self.rank == 0:
            if trace_json:
                chrome_trace(spans, trace_json)
            if png:
                what = "expert-parallel" if self.mode == "ep" else "AF-pipe"
                gantt_png(spans, png, title=title or f"fxdisag {what} step ({len(self.schedule.ranks)} ranks)")
        return spans

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        return self._consolidate(grads=False)

    def consolidated_grads(self) -> dict[str, torch.Tensor | None]:
        return self._consolidate(grads=True)


def _check_parameters_stay_in_group(program: StagedProgram, schedule: Schedule) -> None:
    """A parameter read by stages of two attention groups would need its gradient summed
    across groups (tied input and output embeddings, for one): not built."""
    stage_map = schedule.stages
    where: dict[int, set[int]] = {}
    for stage in program.stages:
        for p in stage.module.parameters():
            where.setdefault(id(p), set()).add(stage_map.stage_group[stage.index])
    shared = [pid for pid, gs in where.items() if len(gs) > 1]
    if shared:
        names = [n for st in program.stages for n, p in st.module.named_parameters() if id(p) in shared]
        raise NotImplementedError(
            f"parameter(s) {sorted(set(names))[:4]} are read by stages on different attention groups "
            f"(groups {sorted(where[shared[0]])}); pipeline_depth > 1 does not sum a gradient across groups. "
            "Untie them (e.g. tie_word_embeddings=False), or use pipeline_depth=1")


def _group_routing(plan: Plan, num_experts: int) -> tuple[Routing, dict[int, int]]:
    """p > 1: the routing tables of group 0 (every group has the same slot pattern, which
    the plan checks), and for every rank the rank of the same slot in group 0."""
    att0, exp0 = sorted(plan.attention_groups()[0]), sorted(plan.expert_groups()[0])
    sub = Plan(att0, exp0, plan.group_placement(0), plan.num_microbatches)
    same_slot: dict[int, int] = {}
    for groups, first in ((plan.attention_groups(), att0), (plan.expert_groups(), exp0)):
        for g in groups:
            for t, r in enumerate(sorted(g)):
                same_slot[r] = first[t]
    return Routing.from_plan(sub, num_experts), same_slot


def _check_schedule(schedule: Schedule, plan: Plan, num_moe_layers: int) -> None:
    from fxdisag.schedule import validate

    want = (tuple(sorted(plan.attention_ranks)), tuple(sorted(plan.expert_ranks)), num_moe_layers,
            plan.num_microbatches)
    got = (tuple(sorted(schedule.attention_ranks)), tuple(sorted(schedule.expert_ranks)), schedule.num_moe_layers,
           schedule.num_microbatches)
    if got != want:
        raise ValueError(f"schedule= has (attention ranks, expert ranks, MoE layers, micro-batches) {got}; the plan "
                         f"and model give {want}")
    validate(schedule)


def disaggregate(
    model: nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    plan: Plan | str = "auto",
    cluster: Any = None,
    *,
    sync_params: bool = True,
    trace: bool = False,
    release_unused: bool = True,
    schedule: Schedule | None = None,
    compile_stages: bool = False,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
    check_inputs: str = "first",
) -> DisaggregatedModel:
    """Capture ``model``, plan it (or take ``plan``), and build this rank's part of the pipeline.

    A ``model`` built on the meta device (``with torch.device("meta"): ...from_config(cfg)``)
    is built only where it runs: each rank materializes the tensors it computes with (its
    stages, its experts' rows), reading them from ``weights`` (an HF ``save_pretrained``
    directory of safetensors; each rank reads only its own tensors and expert rows) or,
    without ``weights``, initialising them with the model's own ``_init_weights`` under
    ``seed`` (equal to ``fxdisag.init_weights(eager_model, seed)``; see
    :mod:`fxdisag.weights`). ``weights`` needs a meta-device model.

    ``compile_stages`` runs every attention stage program and experts call on this rank
    through ``torch.compile`` (inductor).

    ``sync_params`` broadcasts every parameter from rank 0 first (as DDP does), so ranks
    that built the model with different random seeds still train the same model.

    ``release_unused`` frees the weights this rank never computes with (moved to the meta
    device, in place: ``model`` is partly meta afterwards, as with other sharding
    wrappers): the full experts on every rank, the attention side on expert ranks. Use
    ``consolidated_state_dict()`` for the full weights.

    ``schedule`` runs a hand-written :class:`~fxdisag.schedule.Schedule` instead of the
    plan's (same groups, MoE layers and micro-batches as the plan; it is validated).

    ``plan=Plan.expert_parallel(world, E, m)`` builds the expert-parallel baseline
    instead: every rank runs attention on its share of the batch and ``E/W`` experts,
    with all-to-all dispatch and combine.

    ``timeout`` (seconds, default 300) bounds every wait on a peer: a message, a send, a
    collective fxdisag issues, the default group when fxdisag initialises it. A hung or
    lost peer makes every other rank raise ``PeerTimeoutError`` / ``PeerLostError``
    (:mod:`fxdisag.runtime.faults`) naming the peer and the action, instead of blocking.

    ``check_inputs`` (``"first"``, ``"always"``, ``"never"``): on which steps the ranks
    compare a hash of their batches and agree on the batch checks in one collective, so a
    different batch, or a batch one rank refuses, raises the same error on every rank.
    """
    check_options(timeout, check_inputs)
    _init_distributed(timeout)
    captured = capture(model, example_inputs)
    return build(captured, example_inputs, plan, cluster, sync_params=sync_params, trace=trace,
                 release_unused=release_unused, schedule=schedule, compile_stages=compile_stages,
                 weights=weights, seed=seed, timeout=timeout, check_inputs=check_inputs)


def build(
    captured: CapturedModel,
    example_inputs: Mapping[str, torch.Tensor],
    plan: Plan | str = "auto",
    cluster: Any = None,
    *,
    sync_params: bool = True,
    trace: bool = False,
    release_unused: bool = True,
    schedule: Schedule | None = None,
    expert_weights: str = "slices",
    compile_stages: bool = False,
    weights: str | os.PathLike | None = None,
    seed: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
    check_inputs: str = "first",
) -> DisaggregatedModel:
    """This rank's part of the pipeline, from a captured model (either front door's).

    ``expert_weights``: ``"slices"`` gives expert ranks new parameters holding their
    experts' slices (``disaggregate``); ``"model"`` computes with the model's own full
    experts tensors, so the parameters a user's optimizer holds stay the ones that train
    (the torch.compile front door). ``compile_stages`` runs every stage program and
    experts call through ``torch.compile`` on the rank. ``weights`` / ``seed``: see
    :func:`disaggregate` (a meta-device model). ``timeout`` / ``check_inputs``: see
    :func:`disaggregate`.
    """
    check_options(timeout, check_inputs)
    if expert_weights not in ("slices", "model"):
        raise ValueError(f"expert_weights must be 'slices' or 'model', got {expert_weights!r}")
    device = _device()
    model = captured.model
    source = _weight_source(model, weights, seed, expert_weights)
    plan = _resolve_plan(plan, captured, example_inputs, cluster)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a fxdisag Plan or 'auto', got {type(plan).__name__}")
    world = dist.get_world_size()
    ranks = sorted(set(plan.attention_ranks) | set(plan.expert_ranks))
    covered = sorted(plan.attention_ranks) if plan.kind == "ep" else sorted(plan.attention_ranks + plan.expert_ranks)
    if covered != list(range(world)):
        raise ValueError(
            f"plan uses ranks {ranks} but the world has {world} ranks: attention_ranks + expert_ranks must "
            f"cover 0..{world - 1} exactly once" + (" (an expert-parallel plan: every rank once)" if plan.kind == "ep" else "")
        )
    # fxdisag's collectives over every rank run on a group of its own with `timeout` (a hung
    # peer fails them in `timeout`, whatever the default group's timeout is).
    world_group = dist.new_group(list(range(world)), timeout=as_timedelta(timeout))
    if sync_params:
        with collective(dist.get_rank(), [r for r in range(world) if r != dist.get_rank()],
                        "the parameter broadcast from rank 0 did not complete", timeout):
            for p in model.parameters():
                if p.device.type != "meta":
                    buf = p.detach().to(device)
                    dist.broadcast(buf, src=0, group=world_group)
                    p.data.copy_(buf.to(p.device))
    num_experts = {m.num_experts for m in captured.layout.moe}
    if len(num_experts) != 1:
        raise NotImplementedError(f"MoE layers with different expert counts {sorted(num_experts)}")
    rank = dist.get_rank()
    if plan.pipeline_depth > 1:
        base, same_slot = _group_routing(plan, num_experts.pop())
        routing = SlotRouting(base, rank, same_slot[rank])
        group_experts = len(base.expert_ranks)
    else:
        base = routing = Routing.from_plan(plan, num_experts.pop())
        group_experts = len(plan.expert_ranks)
    # An expert rank never runs pack(); any attention rank's table gives it a valid graph.
    router = rank if rank in plan.attention_ranks else base.attention_ranks[0]
    shared_slots = [list(plan.expert_ranks).index(r) for r in plan.shared_expert_ranks] or None
    gm = insert_dispatch(_graph_copy(captured.graph_module), captured.layout, routing.owner_slot(router), group_experts,
                         shared_slots=shared_slots)
    program = split_stages(gm)
    if schedule is None:
        schedule = plan.schedule(len(program.boundaries))
    else:
        _check_schedule(schedule, plan, len(program.boundaries))
    # new_group is collective: every rank creates every group, in the same order.
    groups: dict = {"world": world_group}
    td = as_timedelta(timeout)
    if plan.pipeline_depth > 1:
        for g in plan.attention_groups():
            pg = dist.new_group(sorted(g), timeout=td)
            if rank in g:
                groups["attention"] = pg
        for g in plan.expert_groups():  # the replica sets of group 0, slot for slot in every group
            slot_rank = {same_slot[r]: r for r in g}
            for ranks, _ in base.replica_sets:
                mapped = tuple(sorted(slot_rank[r] for r in ranks))
                pg = dist.new_group(list(mapped), timeout=td)
                if rank in mapped:
                    groups[routing.rename(ranks)] = pg  # the name the rank's view gives the set
        groups.setdefault("attention", None)
    else:
        groups["attention"] = dist.new_group(sorted(plan.attention_ranks), timeout=td)
        for ranks, _ in routing.replica_sets:
            groups[ranks] = dist.new_group(list(ranks), timeout=td)
        if len(plan.shared_expert_ranks) > 1:  # copies of the shared experts: their gradients summed
            pg = dist.new_group(sorted(plan.shared_expert_ranks), timeout=td)
            if rank in plan.shared_expert_ranks:
                groups["shared"] = pg
    maybe_dump_text("schedule", format_grid(schedule))
    maybe_dump_text("plan", str(plan))
    return DisaggregatedModel(captured, program, schedule, plan, routing, device, groups, trace, release_unused,
                              expert_weights=expert_weights, compile_stages=compile_stages, weights=source,
                              timeout=timeout, check_inputs=check_inputs)


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule on a copy of ``gm``'s graph, sharing its modules and parameters: the
    passes rewrite the copy in place, so the captured model builds again (a profiling
    step's probe, a re-plan) with the graph it was captured with."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # the pytree in/out spec
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph, class_name=type(gm).__name__)


def _weight_source(model: nn.Module, weights, seed: int, expert_weights: str) -> WeightSource | None:
    """Where a meta-device model's tensors come from (None: the model is real). Checked
    here, on every rank alike and before any communication."""
    if not is_meta_model(model):
        if weights is not None:
            raise ValueError(
                "weights= loads each rank's own tensors into a model built on the meta device, but this model's "
                "parameters are real. Build it with `with torch.device('meta'): "
                "AutoModelForCausalLM.from_config(cfg)`, or load it eagerly with from_pretrained and drop weights=")
        return None
    if expert_weights == "model":
        raise NotImplementedError(
            "the torch.compile front door computes with the model's own full expert tensors, so it cannot build a "
            "meta-device model rank by rank: use fxdisag.disaggregate(model, batch, weights=...)")
    source = HFCheckpoint(weights, model) if weights is not None else SeededInit(model, seed)
    source.check()
    return source
