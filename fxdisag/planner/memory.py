"""Per-device memory (bytes) of an AF-pipe layout and of the EP baseline.

Contract
--------
:func:`afpipe_memory` gives ``{"attention": bytes per attention device, "experts": bytes
on the fullest expert device (most experts held, most rows)}``; :func:`ep_memory` the
bytes per EP device. Both are MEMORY of ACTIVATIONS (``formulas.py``)::

    MEMORY          M = P (w + g) + P o / s + A                   params P, bytes/param of weights
                    w, grads g, optimizer o (sharded s ways), activations A
    ACTIVATIONS     A = n keep + transient                        n sequences / rows in flight

with (w, g, o) from :func:`param_bytes` (weights and gradients in the training dtype;
optimizer state from ``workload.optimizer_bytes_per_param``), the optimizer state sharded
over the data-parallel replicas when ``shard_optimizer``, and the activations kept for
backward: of all m in-flight micro-batches for AF-pipe (GPipe-style), of one micro-step
for EP.

:func:`rank_parameter_bytes` gives the weight bytes each rank of a runnable plan holds,
from a measured profile: an attention rank the attention-side parameters of its group's
stages (``profile.stage_params``), an expert rank its experts' slices in its group's MoE
layers. The runtime holds exactly these (tested).

Activation recomputation (searched per group, for AF-pipe and EP alike): a group that
recomputes keeps only each decoder layer's input (attention side: S x H per sequence and
layer) or each routed row's input (experts: H per row), and re-runs the forward of that
layer during backward (backward = 3 x forward for those regions instead of 2 x; the
recomputed unit's full activations are a transient). Nothing is re-sent over the network:
the expert side keeps its received rows.
"""

from __future__ import annotations

from fxdisag.planner.formulas import ACTIVATIONS, MEMORY
from fxdisag.planner.placement import GroupLayout
from fxdisag.planner.workload import Workload, optimizer_bytes_per_param

__all__ = ["afpipe_memory", "ep_memory", "param_bytes", "rank_parameter_bytes"]


def param_bytes(optimizer: str, dtype_bytes: int) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per parameter."""
    return float(dtype_bytes), float(dtype_bytes), optimizer_bytes_per_param(optimizer, dtype_bytes)


def _attention_activations(work: Workload, seqs_in_flight: float, seqs_per_unit: float, recompute: bool,
                           recorder=None, label: str = "activations") -> float:
    if recompute:
        keep = work.num_decoder_layers * work.layer_input_bytes + work.attention_saved_unlayered
        transient = seqs_per_unit * work.attention_saved_layer_max
    else:
        keep, transient = work.attention_saved_bytes, 0.0
    return ACTIVATIONS(recorder, label, n=seqs_in_flight, keep=keep, transient=transient)


def _expert_activations(work: Workload, rows_in_flight: float, rows_per_unit: float, recompute: bool,
                        recorder=None, label: str = "activations") -> float:
    if recompute:
        keep, transient = work.expert_input_per_row, rows_per_unit * work.expert_saved_per_row
    else:
        keep, transient = work.expert_saved_per_row, 0.0
    return ACTIVATIONS(recorder, label, n=rows_in_flight, keep=keep, transient=transient)


def afpipe_memory(work: Workload, layout: GroupLayout, seqs_per_mb: int, m: int, optimizer: str,
                  shard_optimizer: bool, recorder=None, recompute: tuple[bool, bool] = (False, False)) -> dict[str, float]:
    w, g, o = param_bytes(optimizer, work.dtype_bytes)
    A = len(layout.attention_ranks)
    S, L = work.seq_len, work.num_moe_layers
    act_a = _attention_activations(work, m * seqs_per_mb, seqs_per_mb, recompute[0], recorder,
                                   "activations per attention device")
    attention = MEMORY(recorder, "memory per attention device", P=work.attention_params, w=w, grad=g, opt=o,
                       shard=A if shard_optimizer else 1, act=act_a)
    rows = seqs_per_mb * S * work.top_k * layout.max_load  # per micro-batch and layer, busiest device
    act_e = _expert_activations(work, m * L * rows, rows, recompute[1], recorder, "activations per expert device")
    # optimizer state of an expert is sharded over its replicas; use the least replicated one held
    held = layout.experts_per_device
    replicas = layout.min_replicas
    experts = MEMORY(recorder, "memory per expert device", P=held * work.params_per_expert * L, w=w, grad=g, opt=o,
                     shard=replicas if shard_optimizer else 1, act=act_e)
    return {"attention": attention, "experts": experts}


def ep_memory(work: Workload, cluster, ep: int, seqs: int, optimizer: str, shard_optimizer: bool,
              recorder=None, recompute: tuple[bool, bool] = (False, False)) -> float:
    w, g, o = param_bytes(optimizer, work.dtype_bytes)
    W = cluster.world_size
    S, L = work.seq_len, work.num_moe_layers
    act_a = _attention_activations(work, seqs, seqs, recompute[0], recorder, "EP activations: attention part")
    attention = MEMORY(recorder, "EP memory: attention part", P=work.attention_params, w=w, grad=g, opt=o,
                       shard=W if shard_optimizer else 1, act=act_a)
    rows = seqs * S * work.top_k
    act_e = _expert_activations(work, L * rows, rows, recompute[1], recorder, "EP activations: experts part")
    experts = MEMORY(recorder, "EP memory: experts part", P=work.num_experts // ep * work.params_per_expert * L,
                     w=w, grad=g, opt=o, shard=W // ep if shard_optimizer else 1, act=act_e)
    return attention + experts


def rank_parameter_bytes(profile, plan) -> dict[int, int]:
    """Weight bytes (at ``profile.dtype``) of the parameters each rank of ``plan`` holds.

    Attention rank of group g: the attention-side parameters of the stages group g runs.
    Expert rank of group g: for each MoE layer of group g, one expert's parameters for every
    expert the rank holds. Expert-parallel plans: every rank holds every stage and its own
    experts of every layer.
    """
    if not profile.stage_params:
        raise ValueError(f"the profile of {profile.model} has no per-stage parameter counts (a synthetic or older "
                         "profile): profile the captured model with fxdisag.planner.profile")
    J = len(profile.moe)
    if len(profile.stage_params) != J + 1:
        raise ValueError(f"profile.stage_params has {len(profile.stage_params)} stages; {J} MoE layers need {J + 1}")
    size = profile.dtype_bytes
    per_expert = [m.params_per_expert for m in profile.moe]
    out: dict[int, int] = {}
    if plan.kind == "ep":
        for r in plan.attention_ranks:
            held = sum(r in ranks for ranks in plan.expert_placement)
            out[r] = size * (sum(profile.stage_params) + held * sum(per_expert))
        return out
    stages = plan.stages(J)
    for g, ranks in enumerate(stages.attention_groups):
        own = sum(profile.stage_params[s] for s in stages.stages_of(g))
        for r in ranks:
            out[r] = size * own
    for g, ranks in enumerate(stages.expert_groups):
        layers = stages.layers_of(g)
        placement = plan.group_placement(g) if plan.pipeline_depth > 1 else plan.expert_placement
        for r in ranks:
            held = sum(r in replicas for replicas in placement)
            out[r] = size * held * sum(per_expert[j] for j in layers)
    return out
