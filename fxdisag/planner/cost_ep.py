"""EP baseline step time (seconds): expert parallelism of degree ``ep`` on the same cluster
and batch as AF-pipe.

Contract
--------
:func:`ep_times` gives ``step_no_overlap`` and ``step_overlap`` (STEP_TIME of
PIPELINE_TIME per phase), the gradient all-reduce ``sync`` (:func:`ep_sync`:
ALLREDUCE_TIME of the attention parameters over all W devices, then of each expert over
its W/ep replicas) and ``busy`` (compute per device per step, no overlap).
:func:`ep_transfer` is one all-to-all inside EP groups of ``ep`` consecutive ranks
(TRANSFER_TIME on the slowest node) of message rows: a token goes once to every rank of
its EP group holding >= 1 of its top_k experts (each rank holds E / ep), so it sends
:func:`ep_rows_per_token` = ep x ROWS_PER_RANK(g = E / ep) rows, the one to its own rank
staying local. Compute actions are those of AF-pipe
(``cost_afpipe.attention_times``, ``cost_afpipe.expert_time``, with the same
activation recomputation); all formulas are in ``formulas.py``. Times are seconds per
device.

The models:

* **EP, no overlap**: every device does attention (data parallel) then experts; per
  layer attention, all-to-all dispatch, experts, all-to-all combine run one after the
  other (PIPELINE_TIME with m = 1, t_b = R), gradient all-reduce exposed (o = 0).
* **EP, with overlap** ("two half-batch" overlap, as DeepSeek-V3 and Megatron-LM's
  all-to-all overlap): each micro-step is split into two halves; while one half
  computes, the other's all-to-all runs. Compute (attention + experts) and network
  (dispatch + combine) are the two resources: PIPELINE_TIME with m = 2,
  t_b = max(t_a/2 + t_e/2, t_d' + t_c'), where t_d', t_c' move half the bytes but
  pay the full latency; gradient all-reduce hidden behind backward (o = 1).
"""

from __future__ import annotations

import math

from fxdisag.planner.cost_afpipe import attention_times, expert_time
from fxdisag.planner.formulas import (
    ALLREDUCE_TIME,
    ATTENTION_STAGE,
    PIPELINE_TIME,
    ROWS_PER_RANK,
    STEP_TIME,
    TRANSFER_TIME,
)
from fxdisag.planner.placement import expected_rows_per_token, group_span
from fxdisag.planner.workload import Workload

__all__ = ["ep_rows_per_token", "ep_sync", "ep_times", "ep_transfer"]


def ep_rows_per_token(work: Workload, ep: int, recorder=None, label: str = "EP") -> float:
    """Message rows a token sends in an EP group of ``ep`` ranks with E / ep experts each:
    ``expected_rows_per_token`` of that table (ROWS_PER_RANK recorded once, for one rank)."""
    E, K = work.num_experts, work.top_k
    if E % ep:
        raise ValueError(f"ep_rows_per_token: EP degree {ep} does not divide the {E} experts")
    if recorder is not None:
        ROWS_PER_RANK(recorder, f"{label}: rows per token to one EP rank ({E // ep} expert(s))", E=E, K=K, g=E // ep)
    return expected_rows_per_token(E, K, [E // ep] * ep)


def ep_transfer(cluster, ep: int, per_device: float, recorder=None, label: str = "all-to-all") -> float:
    """All-to-all inside EP groups of ``ep`` consecutive ranks; each device sends
    ``per_device`` bytes spread evenly over the group (its own share stays local): its
    message rows x bytes per row, every rank of the group receiving the same expected rows."""
    dpn = cluster.devices_per_node
    worst, worst_vals = -1.0, None
    for n in range(min(cluster.num_nodes, max(1, math.lcm(ep, dpn) // dpn))):
        nic = 0.0
        link = 0.0
        for r in range(n * dpn, (n + 1) * dpn):
            group = range((r // ep) * ep, (r // ep + 1) * ep)
            local = sum(1 for q in group if q // dpn == n)
            nic += per_device * (ep - local) / ep
            link = max(link, per_device * (local - 1) / ep)
        lat = cluster.inter_node_latency if nic > 0 else (cluster.intra_node_latency if link > 0 else 0.0)
        vals = dict(nic_out=nic, nic_in=nic, n_out=cluster.nics_per_node, n_in=cluster.nics_per_node,
                    link_out=link, link_in=link, bw_nic=cluster.nic_bandwidth,
                    bw_link=cluster.intra_node_bandwidth, latency=lat)
        t = TRANSFER_TIME(**vals)
        if t > worst:
            worst, worst_vals = t, vals
    if recorder is not None:
        TRANSFER_TIME(recorder, label, **worst_vals)
    return worst


def ep_sync(work: Workload, cluster, ep: int, recorder=None) -> float:
    """EP baseline all-reduce: attention over all W devices, then each expert over its W/ep
    replicas (sequential: the same links)."""
    W, dpn = cluster.world_size, cluster.devices_per_node
    common = dict(bw_link=cluster.intra_node_bandwidth, bw_nic=cluster.nic_bandwidth,
                  lat_link=cluster.intra_node_latency, lat_nic=cluster.inter_node_latency)
    t = ALLREDUCE_TIME(recorder, "EP all-reduce attention grads", bytes=work.attention_params * work.dtype_bytes,
                       g=min(dpn, W), k=cluster.num_nodes, nics=cluster.nics_per_node, **common)
    if W // ep > 1:
        g, k = group_span(list(range(0, W, ep)), dpn)
        held = work.num_experts // ep
        t += ALLREDUCE_TIME(recorder, "EP all-reduce expert grads over replicas",
                            bytes=held * work.params_per_expert * work.num_moe_layers * work.dtype_bytes,
                            g=g, k=k, nics=cluster.nics_per_node * g / dpn, **common)
    return t


def ep_times(work: Workload, cluster, ep: int, seqs: int, rounds: int, recorder=None,
             recompute: tuple[bool, bool] = (False, False)) -> dict[str, float]:
    """EP baseline step, without and with the two-half-batch overlap (module docstring)."""
    S, L, K = work.seq_len, work.num_moe_layers, work.top_k
    held = work.num_experts // ep
    out: dict[str, float] = {"sync": ep_sync(work, cluster, ep, recorder)}
    for variant, halves in (("no_overlap", 1), ("overlap", 2)):
        rec = recorder
        part = seqs / halves
        attn = attention_times(work, cluster, part, recompute=recompute[0])
        tokens = part * S
        tag = f"EP {variant.replace('_', ' ')}"
        ef = expert_time(work, cluster, tokens * K, held, False, rec, f"{tag}: experts fwd")
        eb = expert_time(work, cluster, tokens * K, held, True, rec, f"{tag}: experts bwd", recompute[1])
        rows = tokens * ep_rows_per_token(work, ep, rec, tag)  # message rows, not the top_k pairs
        d = ep_transfer(cluster, ep, rows * work.dispatch_per_row, rec, f"{tag}: dispatch all-to-all")
        c = ep_transfer(cluster, ep, rows * work.combine_per_row, rec, f"{tag}: combine all-to-all")
        gc = ep_transfer(cluster, ep, rows * work.combine_grad_per_row)
        gd = ep_transfer(cluster, ep, rows * work.dispatch_grad_per_row)
        phases = {}
        for phase, (ta, t1, te, t2), pre, post in (
            ("fwd", (attn["attn_f"], d, ef, c), attn["pre_f"], attn["post_f"]),
            ("bwd", (attn["attn_b"], gc, eb, gd), attn["pre_b"], attn["post_b"]),
        ):
            ta = ATTENTION_STAGE(rec, f"{tag}: attention stage {phase}", t_attn=ta, t_pre=pre, t_post=post, L=L)
            R = ta + t1 + te + t2
            tb = R if halves == 1 else max(ta + te, t1 + t2)
            phases[phase] = PIPELINE_TIME(rec, f"{tag}: micro-step {phase}", L=L, m=halves, t_b=tb, R=R)
        out[f"step_{variant}"] = STEP_TIME(rec, f"{tag}: step", r=rounds, T_fwd=phases["fwd"], T_bwd=phases["bwd"],
                                           t_sync=out["sync"], o=0 if halves == 1 else 1)
        if halves == 1:
            busy = rounds * (attn["pre_f"] + attn["post_f"] + attn["pre_b"] + attn["post_b"]
                             + L * (attn["attn_f"] + attn["attn_b"] + ef + eb))
            out["busy"] = busy
    return out

