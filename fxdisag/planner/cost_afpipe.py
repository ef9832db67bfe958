"""AF-pipe step time (seconds) from a :class:`Workload`, a cluster and a :class:`GroupLayout`.

Contract
--------
:func:`afpipe_times` gives the predicted step and its parts: per-micro-batch stage times
(:func:`afpipe_stage_times`), the gradient all-reduce (:func:`afpipe_sync`), then
:func:`afpipe_step` (ATTENTION_STAGE, PIPELINE_TIME per phase, STEP_TIME with o = 1),
with utilisation per group and the bubble. :func:`attention_times` and
:func:`expert_time` are the compute actions (COMPUTE_ACTION of REGION_TIMEs), shared
with the EP baseline (``cost_ep.py``). All formulas are in ``formulas.py``; times are
seconds per device, per micro-batch unless said otherwise.

The model:

* **AF-pipe**: attention group and expert group are the two compute resources, the
  dispatch and combine directions the two network resources; stages per MoE layer
  t_a (attention side, ATTENTION_STAGE), t_d (dispatch), t_e (experts), t_c (combine),
  so t_b = max(t_a, t_d, t_e, t_c), R = t_a + t_d + t_e + t_c; backward likewise with
  the gradient transfers. The experts compute top_k (token, expert) pairs per token
  (``GroupLayout.max_load``); the transfers move one message row per (token, expert rank
  holding >= 1 of its top_k) (ROWS_PER_RANK, ``placement.afpipe_transfer``).
* **Pipeline depth p > 1**: p group pairs, each on N / p whole nodes, layers dealt
  round robin. The stage times are one pair's (its sub-cluster); the dispatch and its
  gradient stay inside the pair, the combine and its gradient cross to the next pair's
  attention group (all bytes over NICs), and the hop (residual stream etc.,
  ``Workload.hop_per_seq``, plus the combine's row -> token index per message row:
  HOP_BYTES; its gradient one row of H per token) leaves with the
  dispatch and arrives with the combine over the same attention NICs. The cycle is the
  ring of p pairs: L = laps = ceil(J / p) MoE layers per group, R = p x one layer's
  round trip. GPipe: PIPELINE_TIME per phase; 1F1B with k in flight: PIPELINE_1F1B,
  the gradient all-reduce hidden behind the last micro-batch's backward chain. Every
  pair reduces its own group's gradients at the same time.

Activation recomputation (searched per group, for AF-pipe and EP alike): a group that
recomputes keeps only each decoder layer's input (attention side: S x H per sequence and
layer) or the message rows it received (experts: one per token and expert rank, its
hidden row, routing weights and ids), and re-runs the forward of that layer during
backward (backward = 3 x forward for those regions instead of 2 x; the recomputed unit's
full activations are a transient). Nothing is re-sent over the network: the expert side
keeps its received rows.

Assumptions: backward FLOPs and bytes are 2x forward (3x for the recomputed regions);
bytes per region = weights + activations read and written by the region's leaf modules
(no caching across regions); the optimizer update itself is not timed.
"""

from __future__ import annotations

from fxdisag.planner.formulas import (
    ALLREDUCE_TIME,
    ATTENTION_STAGE,
    CHUNKED_SEGMENT,
    COMPUTE_ACTION,
    HOP_BYTES,
    PIPELINE_1F1B,
    PIPELINE_TIME,
    REGION_TIME,
    ROWS_PER_RANK,
    SHARED_ROWS,
    STEP_TIME,
)
from fxdisag.planner.placement import GroupLayout, afpipe_transfer, group_span, ring_transfer
from fxdisag.planner.workload import GroupShare, RegionCost, Workload

__all__ = [
    "afpipe_stage_times",
    "afpipe_step",
    "afpipe_sync",
    "afpipe_sync_parts",
    "afpipe_times",
    "attention_busy",
    "attention_times",
    "chunked_stages",
    "hop_bytes_per_token",
    "expert_time",
    "shared_sync",
]


def _stage_time(cluster, dtype: str, regions: list[RegionCost], seqs: float, backward: bool,
                recompute: bool = False) -> float:
    peak, bw = cluster.peak(dtype), cluster.memory_bandwidth
    total = 0.0
    for r in regions:
        flops = seqs * (r.bwd_flops if backward else r.fwd_flops)
        # backward reads the weights and writes their gradients; activations: read + grad written
        moved = (2.0 if backward else 1.0) * (r.weight_bytes + seqs * r.io_bytes)
        if backward and recompute and r.layered:
            flops += seqs * r.fwd_flops
            moved += r.weight_bytes + seqs * r.io_bytes
        total += REGION_TIME(F=flops, peak=peak, B=moved, mem_bw=bw)
    return total


def attention_times(work: Workload, cluster, seqs: float, recorder=None, recompute: bool = False) -> dict[str, float]:
    """Attention-side compute per micro-batch of ``seqs`` sequences: pre, one MoE layer's
    stage (mean over layers) and post, forward and backward (+ recomputation).

    ``attn_*`` and ``post_*`` are COMPUTE_ACTIONs (each one stage action, with the per-action
    overhead); ``pre_*`` is pure work, since it runs inside the first layer's stage action."""
    out = {}
    overhead = cluster.action_overhead
    for bwd in (False, True):
        sfx = "b" if bwd else "f"
        direction = "bwd" if bwd else "fwd"
        out[f"pre_{sfx}"] = _stage_time(cluster, work.dtype, work.pre, seqs, bwd, recompute)
        post = _stage_time(cluster, work.dtype, work.post, seqs, bwd, recompute)
        per_layer = [_stage_time(cluster, work.dtype, regs, seqs, bwd, recompute) for regs in work.layers]
        out[f"attn_{sfx}"] = COMPUTE_ACTION(recorder, f"attention stage action (mean over layers), {direction}, "
                                            f"{seqs:g} seq", t_work=sum(per_layer) / len(per_layer),
                                            overhead=overhead)
        out[f"post_{sfx}"] = COMPUTE_ACTION(recorder, f"post stage action, {direction}, {seqs:g} seq",
                                            t_work=post, overhead=overhead)
    if recorder is not None:  # record one representative region evaluation per stage kind
        for name, regs in (("pre", work.pre), ("attention stage", work.layers[0]), ("post", work.post)):
            if regs:
                r = max(regs, key=lambda x: x.fwd_flops)
                REGION_TIME(recorder, f"largest region of {name}, fwd, {seqs:g} seq",
                            F=seqs * r.fwd_flops, peak=cluster.peak(work.dtype),
                            B=r.weight_bytes + seqs * r.io_bytes, mem_bw=cluster.memory_bandwidth)
    return out


def expert_time(work: Workload, cluster, rows: float, experts_held: int, backward: bool, recorder=None,
                label: str = "experts", recompute: bool = False) -> float:
    """One expert action (EF or EB) of one micro-batch and MoE layer: COMPUTE_ACTION of its
    roofline time."""
    k = (3.0 if recompute else 2.0) if backward else 1.0
    work_time = REGION_TIME(
        recorder, label,
        F=k * rows * work.expert_flops_per_row,
        peak=cluster.peak(work.dtype),
        B=k * (experts_held * work.expert_weight_bytes + rows * work.expert_io_per_row),
        mem_bw=cluster.memory_bandwidth,
    )
    return COMPUTE_ACTION(recorder, f"{label}, one action", t_work=work_time, overhead=cluster.expert_overhead)


def afpipe_stage_times(work: Workload, cluster, layout: GroupLayout, seqs_per_mb: float, recorder=None,
                       attn: dict | None = None, recompute: tuple[bool, bool] = (False, False),
                       depth: int = 1, shared: tuple[int, ...] = ()) -> dict[str, float]:
    """Per-micro-batch stage times of AF-pipe: attention side (pre, per layer, post), the
    busiest expert device, and the four transfers (slowest node), forward and backward.
    ``recompute`` = (attention side recomputes, experts recompute).

    ``shared`` (expert ranks of ``layout``, depth 1; ``Plan.shared_expert_ranks``): the
    shared experts (``Workload.shared_region``) run there instead of in each attention
    stage. One host: on every attention device's tokens; it is the busiest expert device
    (its routed pairs are the busiest's, uniform routing), and every message row carries
    one more routing slot, SHARED_ROWS / r rows as many (the host's extra rows spread over
    the transfer: its link is not priced apart). Every expert rank: each computes the
    tokens whose first routed expert it holds (the busiest: ``max held / E`` of them), and
    no row more crosses (the slot does).

    ``depth`` p > 1: ``cluster`` and ``layout`` are one group pair's nodes; the dispatch
    (and its gradient) stays inside the pair, the combine (and its gradient) crosses to
    the next pair's attention group, and the hop (``Workload.hop_per_seq``; its gradient
    one row of H per token) shares the attention NICs with both (``placement.ring_transfer``)."""
    S = work.seq_len
    t = dict(attn or attention_times(work, cluster, seqs_per_mb, recorder, recompute[0]))
    tokens = seqs_per_mb * S  # per attention device per micro-batch
    pairs = tokens * work.top_k * layout.max_load  # routed (token, expert) pairs on the busiest expert device
    held = layout.experts_per_device
    t["expert_f"] = expert_time(work, cluster, pairs, held, False, recorder, "experts fwd, busiest device")
    t["expert_b"] = expert_time(work, cluster, pairs, held, True, recorder, "experts bwd, busiest device",
                                recompute[1])
    if recorder is not None:
        layout.record_rows(recorder, work.top_k)
    # the fixed part of one chunk of each (CHUNKED_SEGMENT): a message's latency, an expert action's overhead
    t["fixed_transfer"], t["fixed_expert"] = cluster.inter_node_latency, cluster.expert_overhead
    K = work.top_k
    hop_f, hop_b = (hop_bytes_per_token(work, layout.rows_per_token(K), recorder) if depth > 1 else (0.0, 0.0))
    rows = dict(dispatch=work.dispatch_per_row, combine=work.combine_per_row,
                combine_grad=work.combine_grad_per_row, dispatch_grad=work.dispatch_grad_per_row)
    if shared:
        rows = _shared_on_experts(work, cluster, layout, seqs_per_mb, t, tuple(shared), rows, depth, recorder)
    for key, per_row, toward, hop, ring in (("dispatch", rows["dispatch"], True, hop_f, False),
                                            ("combine", rows["combine"], False, hop_f, True),
                                            ("combine_grad", rows["combine_grad"], True, hop_b, True),
                                            ("dispatch_grad", rows["dispatch_grad"], False, hop_b, False)):
        label = f"{key} per micro-batch (slowest node)" + (", with the hop" if depth > 1 else "")
        if ring and depth > 1:
            t[key] = ring_transfer(cluster, layout, tokens * per_row, tokens * hop, top_k=K, toward_experts=toward,
                                   recorder=recorder, label=label)
        else:
            t[key] = afpipe_transfer(cluster, layout, tokens * per_row, top_k=K, toward_experts=toward,
                                     recorder=recorder, label=label, hop=tokens * hop)
    return t


def _shared_on_experts(work: Workload, cluster, layout: GroupLayout, seqs: float, t: dict, hosts: tuple[int, ...],
                       rows: dict[str, float], depth: int, recorder=None) -> dict[str, float]:
    """Move the shared experts' time from the attention stages to their expert ranks (``t``
    in place) and return the bytes per message row of the four transfers with them there."""
    region = work.shared_region
    if region is None:
        raise ValueError("shared: the model has no shared experts an expert rank can run")
    every = sorted(hosts) == sorted(layout.expert_ranks)
    if depth != 1 or not (every or (len(hosts) == 1 and hosts[0] in layout.expert_ranks)):
        raise ValueError(f"shared={hosts}: one expert rank of the group pair {layout.expert_ranks}, or all of them, "
                         "at depth 1")
    peak, bw = cluster.peak(work.dtype), cluster.memory_bandwidth
    A = len(layout.attention_ranks)
    # the tokens the busiest host computes: all (one host), or those whose first expert it holds
    share = max(layout.experts_held[h] for h in hosts) / work.num_experts if every else 1.0
    where_on = "the busiest expert rank" if every else f"expert rank {hosts[0]}"
    k_attn, k_exp = work.shared_k  # a calibration's FLOP scale of each side (1: a priori)
    for bwd, a_key, e_key in ((False, "attn_f", "expert_f"), (True, "attn_b", "expert_b")):
        k = 2.0 if bwd else 1.0
        where = "bwd" if bwd else "fwd"
        flops = region.bwd_flops if bwd else region.fwd_flops
        off = REGION_TIME(recorder, f"shared experts on one attention device, {where}, {seqs:g} seq",
                          F=k_attn * seqs * flops, peak=peak,
                          B=k * (region.weight_bytes + seqs * region.io_bytes), mem_bw=bw)
        on = REGION_TIME(recorder, f"shared experts on {where_on}, {where}, {A * share:g} x {seqs:g} seq",
                         F=k_exp * A * share * seqs * flops, peak=peak,
                         B=k * (region.weight_bytes + A * share * seqs * region.io_bytes), mem_bw=bw)
        # the stage less their time, and at least the stage cut by their share of its FLOPs
        # (a calibration's fitted overhead may be negative: the difference alone could be too)
        t[a_key] = max(t[a_key] - off, t[a_key] * (1.0 - work.shared_fraction[bwd]))
        t[e_key] = t[e_key] + on
    r = layout.rows_per_token(work.top_k)
    r_s = r
    if not every:
        P_h = ROWS_PER_RANK(E=work.num_experts, K=work.top_k, g=layout.experts_held[hosts[0]])
        r_s = SHARED_ROWS(recorder, f"message rows per token, shared experts on expert rank {hosts[0]}", r=r, P_h=P_h)
    slot = work.dtype_bytes  # one more routing weight per row (and its gradient), and an int32 id
    return dict(dispatch=(rows["dispatch"] + slot + 4) * r_s / r, combine=rows["combine"] * r_s / r,
                combine_grad=rows["combine_grad"] * r_s / r, dispatch_grad=(rows["dispatch_grad"] + slot) * r_s / r)


def shared_sync(work: Workload, cluster, layout: GroupLayout, recorder=None) -> float:
    """The all-reduce of the shared experts' gradients over the expert ranks holding a copy
    of them (every expert rank of ``layout``), after their other gradients'."""
    g, k = group_span(layout.expert_ranks, cluster.devices_per_node)
    nics = min(n.nics_experts * g / n.experts for n in layout.nodes if n.experts)
    return ALLREDUCE_TIME(
        recorder, "all-reduce the shared experts' grads over the expert ranks",
        bytes=work.shared_params * work.num_moe_layers * work.dtype_bytes, g=g, k=k, nics=nics,
        bw_link=cluster.intra_node_bandwidth, bw_nic=cluster.nic_bandwidth, lat_link=cluster.intra_node_latency,
        lat_nic=cluster.inter_node_latency,
    )


def attention_busy(times: dict[str, float], num_layers: int, m: int) -> float:
    """One attention rank's compute per step (one round) from :func:`attention_times`: m
    micro-batches of pre + ``num_layers`` attention stages + post, forward and backward."""
    return m * (times["pre_f"] + times["post_f"] + times["pre_b"] + times["post_b"]
                + num_layers * (times["attn_f"] + times["attn_b"]))


def hop_bytes_per_token(work: Workload, rows_per_token: float, recorder=None) -> tuple[float, float]:
    """(hop, hop gradient) bytes per token at p > 1: HOP_BYTES (the profiled hop, plus the
    combine's row -> token index for each of the token's ``rows_per_token`` message rows,
    ``GroupLayout.rows_per_token``), and one row of H for the residual stream's gradient
    (the index needs none)."""
    hop = HOP_BYTES(recorder, "hop per token (live values + row -> token index per message row)",
                    h_live=work.hop_per_seq / work.seq_len, r=rows_per_token, b_index=work.hop_index_per_row)
    return hop, work.expert_input_per_row


def chunked_stages(stages: dict[str, float], chunks: tuple[int, int] = (1, 1), recorder=None
                   ) -> tuple[tuple[float, float], tuple[float, float]]:
    """((busiest resource, round trip) forward, (the same) backward) of one MoE layer's stage
    cycle with its dispatch -> experts -> combine in ``chunks`` = (forward r, backward r')
    chunks: the round trip is the attention stage plus CHUNKED_SEGMENT, and the expert device
    pays one action overhead per chunk (the links no more than before: a latency is not busy
    time). (1, 1): max and sum of the four stages."""
    out = []
    for sfx, names, r in (("f", ("dispatch", "expert_f", "combine"), chunks[0]),
                          ("b", ("combine_grad", "expert_b", "dispatch_grad"), chunks[1])):
        t_d, t_e, t_c = (stages[n] for n in names)
        if r == 1:
            segment = t_d + t_e + t_c
        else:
            a_x, a_e = stages.get("fixed_transfer", 0.0), stages.get("fixed_expert", 0.0)
            segment = CHUNKED_SEGMENT(recorder, f"dispatch -> experts -> combine in {r} chunks, "
                                      f"{'fwd' if sfx == 'f' else 'bwd'}", r=r, t_d=t_d, t_e=t_e, t_c=t_c,
                                      a_d=min(a_x, t_d), a_e=min(a_e, t_e), a_c=min(a_x, t_c))
            t_e = t_e + (r - 1) * min(stages.get("fixed_expert", 0.0), t_e)
        out.append((max(stages[f"stage_{sfx}"], t_d, t_e, t_c), stages[f"stage_{sfx}"] + segment))
    return out[0], out[1]


def afpipe_step(work: Workload, stages: dict[str, float], m: int, rounds: int, sync: float,
                recorder=None, *, depth: int = 1, laps: int | None = None, schedule: str = "gpipe",
                in_flight: int | None = None, chunks: tuple[int, int] = (1, 1)) -> dict[str, float]:
    """AF-pipe step time from stage times (module docstring), with utilisation per group.

    ``depth`` p, ``laps`` (MoE layers per group; default all of them at p = 1): the cycle
    is the ring of p group pairs, R = p x one layer's round trip. ``schedule``
    ``"gpipe"``: PIPELINE_TIME per phase, the gradient all-reduce hidden behind the last
    backward phase; ``"1f1b"``: PIPELINE_1F1B with ``in_flight`` micro-batches, the
    all-reduce hidden behind the last micro-batch's backward chain. ``chunks`` (forward,
    backward) per MoE layer: :func:`chunked_stages`."""
    L = laps if laps is not None else work.num_moe_layers
    t = dict(stages)
    for sfx in ("f", "b"):
        t[f"stage_{sfx}"] = ATTENTION_STAGE(recorder, f"attention stage, {'fwd' if sfx == 'f' else 'bwd'}",
                                            t_attn=t[f"attn_{sfx}"], t_pre=t[f"pre_{sfx}"],
                                            t_post=t[f"post_{sfx}"], L=L)
    (tb_f, R_f), (tb_b, R_b) = chunked_stages(t, chunks, recorder)
    ring = f" (ring of {depth} group pairs)" if depth > 1 else ""
    if schedule == "gpipe":
        for phase, t_b, R in (("fwd", tb_f, R_f), ("bwd", tb_b, R_b)):
            t[f"T_{phase}"] = PIPELINE_TIME(recorder, f"MoE pipeline, {phase}{ring}", L=L, m=m, t_b=t_b,
                                            R=depth * R)
    elif schedule == "1f1b":
        k = in_flight if in_flight is not None else (2 if depth == 1 else 3 * depth)
        total = PIPELINE_1F1B(recorder, f"MoE pipeline, 1F1B{ring}", n=L, m=m, k=min(k, m),
                              t_fw=tb_f, t_bw=tb_b, R_f=depth * R_f, R_b=depth * R_b)
        t["T_bwd"] = min(total, L * depth * R_b)  # the last micro-batch's backward chain
        t["T_fwd"] = total - t["T_bwd"]
    else:
        raise ValueError(f"schedule={schedule!r}: the cost model knows 'gpipe' and '1f1b'")
    t["sync"] = sync
    t["step"] = STEP_TIME(recorder, "AF-pipe step", r=rounds, T_fwd=t["T_fwd"], T_bwd=t["T_bwd"], t_sync=sync, o=1)
    busy_a = rounds * attention_busy(t, L, m)
    busy_e = rounds * m * L * (t["expert_f"] + t["expert_b"]
                               + sum((r - 1) * t.get("fixed_expert", 0.0) for r in chunks))
    t["util_attention"] = busy_a / t["step"] if t["step"] > 0 else 0.0
    t["util_experts"] = busy_e / t["step"] if t["step"] > 0 else 0.0
    # ideal: every stage perfectly overlapped, only the busiest resource counts
    t["bubble"] = 1.0 - max(busy_a, busy_e) / t["step"] if t["step"] > 0 else 0.0
    return t


def afpipe_times(work: Workload, cluster, layout: GroupLayout, seqs_per_mb: int, m: int, rounds: int,
                 recorder=None, recompute: tuple[bool, bool] = (False, False)) -> dict[str, float]:
    """Predicted AF-pipe step (seconds) and its parts."""
    stages = afpipe_stage_times(work, cluster, layout, seqs_per_mb, recorder, recompute=recompute)
    return afpipe_step(work, stages, m, rounds, afpipe_sync(work, cluster, layout, recorder), recorder)


def afpipe_sync(work: Workload, cluster, layout: GroupLayout, recorder=None, share: GroupShare | None = None) -> float:
    """Gradient all-reduce time: the slower of the two groups' (:func:`afpipe_sync_parts`)."""
    return max(afpipe_sync_parts(work, cluster, layout, recorder, share))


def afpipe_sync_parts(work: Workload, cluster, layout: GroupLayout, recorder=None,
                      share: GroupShare | None = None) -> tuple[float, float]:
    """(attention, experts) gradient all-reduce: attention parameters over the attention
    group, replicated experts over their replicas (each group on its own NIC share). At
    p > 1 (``share``), of the fullest group's own parameters; the p group pairs reduce at
    the same time on their own nodes."""
    attention_params = max(share.attention_params) if share else work.attention_params
    moe_layers = share.laps if share else work.num_moe_layers
    dpn = cluster.devices_per_node
    nodes = layout.nodes
    g, k = group_span(layout.attention_ranks, dpn)
    nics = min(n.nics_attention * g / n.attention for n in nodes if n.attention)
    t_attn = ALLREDUCE_TIME(
        recorder, "all-reduce attention grads", bytes=attention_params * work.dtype_bytes,
        g=g, k=k, nics=nics, bw_link=cluster.intra_node_bandwidth, bw_nic=cluster.nic_bandwidth,
        lat_link=cluster.intra_node_latency, lat_nic=cluster.inter_node_latency,
    )
    if layout.min_replicas <= 1:
        return t_attn, 0.0
    g, k = group_span(layout.replica_group(0), dpn)
    nics = min(n.nics_experts * g / n.experts for n in nodes if n.experts)
    held = layout.experts_per_device
    t_exp = ALLREDUCE_TIME(
        recorder, "all-reduce replicated expert grads", bytes=held * work.params_per_expert * moe_layers
        * work.dtype_bytes, g=g, k=k, nics=nics, bw_link=cluster.intra_node_bandwidth,
        bw_nic=cluster.nic_bandwidth, lat_link=cluster.intra_node_latency, lat_nic=cluster.inter_node_latency,
    )
    return t_attn, t_exp

