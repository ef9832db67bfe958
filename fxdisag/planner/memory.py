"""Per-device memory (bytes) of AF-pipe layouts and plans (the baseline's: ``cost_megatron.py``).

Contract
--------
:func:`afpipe_memory` gives ``{"attention": bytes per attention device, "experts": bytes
on the fullest expert device (most experts held, most rows)}``, as MEMORY of ACTIVATIONS
(``formulas.py``)::

    MEMORY          M = P (w + g) + P o / s + A                   params P, bytes/param of weights
                    w, grads g, optimizer o (sharded s ways), activations A
    ACTIVATIONS     A = n keep + transient                        n sequences / rows in flight

with (w, g, o) from :func:`param_bytes` (weights and gradients in the training dtype;
optimizer state from ``workload.optimizer_bytes_per_param``) and the optimizer state
sharded over the data-parallel replicas when ``shard_optimizer``. At pipeline depth
p > 1 (``share``: :meth:`Workload.group_share`) a device holds only its group's stages
(attention) or MoE layers (experts), and the result is the fullest group's. The
activations kept are those of the micro-batches the schedule keeps in flight: all m of
a round under GPipe, k under 1F1B, where the last stage's (final norm, head, loss: the
logits) are kept for one micro-batch only, since 1F1B runs that stage's backward right
after its forward.

:func:`rank_parameter_bytes` gives the weight bytes each rank of a runnable plan holds,
from a measured profile: an attention rank the attention-side parameters of its group's
stages (``profile.stage_params``), an expert rank its experts' slices in its group's MoE
layers. The runtime holds exactly these (tested). :func:`rank_activation_bytes` gives the
activations each rank of a plan keeps, as the search counts them (compared with the
measured peak in ``benchmarks/bench_schedules.py``).

Expert activations count the routed (token, expert) pairs (``GroupLayout.max_load``:
the expert computation saves per-pair activations); what the expert side keeps of its
received messages counts message rows (one per token and expert rank,
``GroupLayout.max_received_rows``, ROWS_PER_RANK).

Activation recomputation (searched per group): a group that recomputes keeps only each
decoder layer's input (attention side: S x H per sequence and layer) or the message rows
it received (experts: per row its hidden row, routing weights and expert ids, the
dispatch's bytes per row), and re-runs the forward of that layer during backward
(backward = 3 x forward for those regions instead of 2 x; the recomputed unit's full
activations, its pairs', are a transient). Nothing is re-sent over the network: the
expert side keeps its received rows.
"""

from __future__ import annotations

from fxdisag.planner.formulas import ACTIVATIONS, MEMORY
from fxdisag.planner.placement import GroupLayout
from fxdisag.planner.workload import GroupShare, Workload, optimizer_bytes_per_param

__all__ = ["afpipe_memory", "param_bytes", "rank_activation_bytes", "rank_parameter_bytes"]


def param_bytes(optimizer: str, dtype_bytes: int) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per parameter."""
    return float(dtype_bytes), float(dtype_bytes), optimizer_bytes_per_param(optimizer, dtype_bytes)


def _attention_activations(work: Workload, seqs_in_flight: float, seqs_per_unit: float, recompute: bool,
                           recorder=None, label: str = "activations", share: GroupShare | None = None,
                           group: int = 0, tail_in_flight: float | None = None) -> float:
    """Activations an attention-side device keeps: ``seqs_in_flight`` sequences of its own
    stages; ``tail_in_flight`` (default the same) of the last stage's (head and loss)."""
    if share is None:
        share = work.group_share(1)
    if recompute:
        keep, tail = share.recompute_keep_per_seq[group], share.tail_keep_per_seq[group]
        transient = seqs_per_unit * work.attention_saved_layer_max
    else:
        keep, tail, transient = share.saved_per_seq[group], share.tail_saved_per_seq[group], 0.0
    if tail_in_flight is None or tail == 0.0:
        return ACTIVATIONS(recorder, label, n=seqs_in_flight, keep=keep, transient=transient)
    return (ACTIVATIONS(recorder, label + ", own stages but the last", n=seqs_in_flight, keep=keep - tail,
                        transient=transient)
            + ACTIVATIONS(recorder, label + ", last stage (head, loss)", n=tail_in_flight, keep=tail, transient=0.0))


def _expert_activations(work: Workload, pairs_in_flight: float, pairs_per_unit: float, recompute: bool,
                        recorder=None, label: str = "activations", received_in_flight: float | None = None) -> float:
    """Activations an expert device keeps: without recomputation, the saved activations of
    ``pairs_in_flight`` routed (token, expert) pairs; with it, the ``received_in_flight``
    message rows it received (as sent: ``dispatch_per_row`` bytes each), plus one unit's
    (``pairs_per_unit``) full activations while it is recomputed."""
    if recompute:
        if received_in_flight is None:
            raise ValueError("_expert_activations: recomputation keeps the received message rows; pass "
                             "received_in_flight")
        return ACTIVATIONS(recorder, label, n=received_in_flight, keep=work.dispatch_per_row,
                           transient=pairs_per_unit * work.expert_saved_per_row)
    return ACTIVATIONS(recorder, label, n=pairs_in_flight, keep=work.expert_saved_per_row, transient=0.0)


def afpipe_memory(work: Workload, layout: GroupLayout, seqs_per_mb: int, m: int, optimizer: str,
                  shard_optimizer: bool, recorder=None, recompute: tuple[bool, bool] = (False, False),
                  share: GroupShare | None = None, tail_microbatches: int | None = None,
                  shared: bool = False) -> dict[str, float]:
    """``m``: micro-batches whose activations a device keeps at once (GPipe: all of a
    round's; 1F1B: those in flight); ``tail_microbatches`` of them for the last stage's
    (head and loss; default m: 1F1B runs its backward right after its forward, so 1).
    ``share`` (pipeline depth p > 1): ``layout`` is one
    group pair, and a device holds only its group's stages and MoE layers; the result is
    the fullest group's (:meth:`Workload.group_share`), its optimizer state sharded over
    the group's replicas. ``shared`` (depth 1, ``Plan.shared_expert_ranks``): the shared
    experts' weights, gradients and optimizer state (``Workload.shared_params`` per MoE
    layer, not sharded) move from the attention devices to the expert device."""
    share = share or work.group_share(1)
    groups = range(share.depth)
    att = [_afpipe_attention_memory(work, layout, seqs_per_mb, m, optimizer, shard_optimizer, None, recompute, share,
                                    g, tail_microbatches, shared) for g in groups]
    exp = [_afpipe_expert_memory(work, layout, seqs_per_mb, m, optimizer, shard_optimizer, None, recompute, share, g,
                                 shared) for g in groups]
    attention, experts = max(att), max(exp)
    if recorder is not None:  # the formulas of the fullest groups
        g_a, g_e = att.index(attention), exp.index(experts)
        _afpipe_attention_memory(work, layout, seqs_per_mb, m, optimizer, shard_optimizer, recorder, recompute,
                                 share, g_a, tail_microbatches, shared)
        _afpipe_expert_memory(work, layout, seqs_per_mb, m, optimizer, shard_optimizer, recorder, recompute, share,
                              g_e, shared)
    return {"attention": attention, "experts": experts}


def _afpipe_attention_memory(work, layout, seqs_per_mb, m, optimizer, shard_optimizer, recorder, recompute, share,
                             group, tail_microbatches=None, shared=False) -> float:
    w, g, o = param_bytes(optimizer, work.dtype_bytes)
    moved = work.shared_params * work.num_moe_layers if shared else 0.0
    A = len(layout.attention_ranks)
    where = f" (group {group})" if share.depth > 1 else ""
    tail = None if tail_microbatches is None else tail_microbatches * seqs_per_mb
    act_a = _attention_activations(work, m * seqs_per_mb, seqs_per_mb, recompute[0], recorder,
                                   f"activations per attention device{where}", share, group, tail)
    return MEMORY(recorder, f"memory per attention device{where}", P=share.attention_params[group] - moved, w=w,
                  grad=g, opt=o, shard=A if shard_optimizer else 1, act=act_a)


def _afpipe_expert_memory(work, layout, seqs_per_mb, m, optimizer, shard_optimizer, recorder, recompute, share,
                          group, shared=False) -> float:
    w, g, o = param_bytes(optimizer, work.dtype_bytes)
    L = share.moe_layers[group]
    where = f" (group {group})" if share.depth > 1 else ""
    tokens = seqs_per_mb * work.seq_len  # per attention device, micro-batch and layer
    pairs = tokens * work.top_k * layout.max_load  # routed pairs on the busiest device
    received = tokens * layout.max_received_rows(work.top_k)  # message rows on the device receiving the most
    act_e = _expert_activations(work, m * L * pairs, pairs, recompute[1], recorder,
                                f"activations per expert device{where}", received_in_flight=m * L * received)
    # optimizer state of an expert is sharded over its replicas; use the least replicated one held
    total = MEMORY(recorder, f"memory per expert device{where}", P=layout.experts_per_device * work.params_per_expert * L,
                   w=w, grad=g, opt=o, shard=layout.min_replicas if shard_optimizer else 1, act=act_e)
    if shared:  # a host of the shared experts: their weights, gradients and optimizer state besides
        total += MEMORY(recorder, f"shared experts on an expert device{where}", P=work.shared_params * L, w=w, grad=g,
                        opt=o, shard=1, act=0.0)
    return total


def rank_parameter_bytes(profile, plan) -> dict[int, int]:
    """Weight bytes (at ``profile.dtype``) of the parameters each rank of ``plan`` holds.

    Attention rank of group g: the attention-side parameters of the stages group g runs.
    Expert rank of group g: for each MoE layer of group g, one expert's parameters for every
    expert the rank holds. Expert-parallel plans: every rank holds every stage and its own
    experts of every layer. ``plan.shared_expert_ranks``: the shared experts
    (``MoELayerProfile.shared_params``) count on each of those ranks instead of the attention ranks.
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
    if plan.shared_expert_ranks:  # depth 1: the shared experts move off every attention rank, to each host
        moved = size * sum(m.shared_params for m in profile.moe)
        for r in plan.attention_ranks:
            out[r] -= moved
        for r in plan.shared_expert_ranks:
            out[r] += moved
    return out


def rank_activation_bytes(profile, plan, batch_size: int) -> dict[int, float]:
    """Peak bytes of activations each rank of ``plan`` keeps for backward in one step of
    ``batch_size`` sequences (at ``profile.seq_len``), as the search predicts them
    (:func:`afpipe_memory`'s activation terms): an attention rank of group g, its stages'
    saved activations for the micro-batches its schedule keeps (GPipe: m; 1F1B:
    ``in_flight``, the last stage's for one); an expert rank, its routed rows (uniform
    routing over ``plan.expert_owner``) in its group's layers for as many micro-batches.
    Without recomputation; expert-parallel plans are not covered."""
    if plan.kind != "afpipe":
        raise ValueError("rank_activation_bytes: AF-pipe plans only (an EP rank keeps one micro-step)")
    if any(plan.recompute.values()):
        raise ValueError("rank_activation_bytes: plans without recomputation only")
    from fxdisag.planner.workload import Workload

    work = Workload.from_profile(profile, profile.seq_len)
    J = work.num_moe_layers
    stages = plan.stages(J)
    a = len(stages.attention_groups[0])
    m = plan.num_microbatches
    b = plan.microbatch_size or batch_size // (a * m)
    if plan.schedule_kind == "gpipe":
        n, n_tail = m, m
    else:
        n, n_tail = min(plan.in_flight or (2 if plan.pipeline_depth == 1 else 3 * plan.pipeline_depth), m), 1
    saved = work.stage_saved
    out: dict[int, float] = {}
    for g, ranks in enumerate(stages.attention_groups):
        own = stages.stages_of(g)
        body = sum(saved[s] for s in own if s != J)
        tail = saved[J] if J in own else 0.0
        for r in ranks:
            out[r] = b * (n * body + n_tail * tail)
    S, K, E = work.seq_len, work.top_k, work.num_experts
    for g, ranks in enumerate(stages.expert_groups):
        layers = len(stages.layers_of(g))
        for r in ranks:
            rows = sum(b * S * K * sum(1 for x in plan.expert_owner(i, g) if x == r) / E
                       for i in stages.attention_groups[g])
            out[r] = n * layers * rows * work.expert_saved_per_row
    return out
