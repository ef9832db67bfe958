"""Analysis of measured AF-pipe / EP steps: roofline bound, efficiency, cost-model predictions.

Contract (used by ``bench_afpipe_vs_ep.py``; every function is pure except where noted):

* :func:`compute_busy` -- per rank, seconds of compute spans on the attention side
  (``F``/``B`` actions) and on the expert side (``EF``/``EB``) of one step's spans;
* :func:`nic_bytes` -- per rank, bytes leaving (egress) and entering (ingress) its NIC,
  from the per-destination byte counts of the step plus the gradient all-reduce
  (a ring all-reduce of P bytes over g ranks sends and receives 2 (g-1)/g P per rank);
* :func:`roofline_bound` -- the step's lower bound: the slowest of attention compute,
  expert compute and the busiest NIC direction (bytes / bandwidth); for EP attention and
  experts run on the same rank, one after the other, so that rank's sum counts;
  ``efficiency = bound / measured step``;
* :func:`predict_afpipe` / :func:`predict_ep` -- the partitioner's cost model
  (``fxdisag.planner.cost_afpipe`` / ``fxdisag.planner.cost_ep``; no formula is re-written
  here) on a measured ``ClusterSpec``: *a priori* from the profile's FLOPs at the measured
  matmul rate, and *stage-calibrated*, with every region's FLOPs scaled so that the model's
  compute time equals the compute measured in the same run (attention side and experts
  separately), which leaves only the pipeline/transfer composition to the model.

Pseudo-code of the calibration::

    k_attn = measured attention compute per step / modelled (FLOPs / peak, memory ignored)
    k_exp  = measured expert compute per step (busiest rank) / modelled
    work'  = work with attention-side FLOPs x k_attn, expert FLOPs per row x k_exp
    predicted = afpipe_times(work', cluster with memory bandwidth = inf, ...)["step"]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "ATTENTION_ACTIONS",
    "EXPERT_ACTIONS",
    "Bound",
    "compute_busy",
    "nic_bytes",
    "roofline_bound",
    "Prediction",
    "predict_afpipe",
    "predict_ep",
    "layout_of",
]

ATTENTION_ACTIONS = ("F", "B")
EXPERT_ACTIONS = ("EF", "EB")


def compute_busy(spans: Iterable, ranks: Sequence[int]) -> dict[int, dict[str, float]]:
    """rank -> {"attention": s, "experts": s}: summed durations of its compute spans.

    >>> from fxdisag.schedule import Action, ActionKind as K
    >>> from fxdisag.runtime.timeline import Span
    >>> spans = [Span(0, Action(K.F, 0, 0), 0.0, 0.5, "compute"),
    ...          Span(0, Action(K.B, 0, 0), 1.0, 2.0, "compute"),
    ...          Span(0, Action(K.F, 1, 0), 0.5, 0.6, "recv-wait"),
    ...          Span(1, Action(K.EF, 0, 0), 0.5, 0.75, "compute")]
    >>> compute_busy(spans, [0, 1])
    {0: {'attention': 1.5, 'experts': 0.0}, 1: {'attention': 0.0, 'experts': 0.25}}
    """
    busy = {r: {"attention": 0.0, "experts": 0.0} for r in ranks}
    for s in spans:
        if s.kind != "compute":
            continue
        kind = s.action.kind.value
        side = "attention" if kind in ATTENTION_ACTIONS else "experts" if kind in EXPERT_ACTIONS else None
        if side is None:
            raise ValueError(f"compute span of {s.action} on rank {s.rank}: not an F/B/EF/EB action")
        busy[s.rank][side] += s.end - s.start
    return busy


def nic_bytes(
    sent: Mapping[tuple[int, int], int], ranks: Sequence[int], allreduce_groups: Sequence[tuple[Sequence[int], int]] = ()
) -> tuple[dict[int, float], dict[int, float]]:
    """(egress, ingress) bytes per rank: ``sent[(src, dst)]`` plus the ring all-reduces.

    ``allreduce_groups``: (ranks of the group, bytes reduced by each) per all-reduce.

    >>> e, i = nic_bytes({(0, 1): 100, (1, 0): 40}, [0, 1], [([0, 1], 10)])
    >>> e, i
    ({0: 110.0, 1: 50.0}, {0: 50.0, 1: 110.0})
    """
    egress = {r: 0.0 for r in ranks}
    ingress = {r: 0.0 for r in ranks}
    for (src, dst), n in sent.items():
        if src == dst:
            raise ValueError(f"sent[{src}, {dst}]: a rank's messages to itself never cross a NIC")
        egress[src] += n
        ingress[dst] += n
    for group, nbytes in allreduce_groups:
        g = len(group)
        if g < 2:
            continue
        for r in group:
            egress[r] += 2 * (g - 1) / g * nbytes
            ingress[r] += 2 * (g - 1) / g * nbytes
    return egress, ingress


@dataclass(frozen=True)
class Bound:
    """Roofline lower bound of one step (seconds) and what sets it."""

    attention: float  # slowest attention-side compute of one rank
    experts: float  # slowest expert compute of one rank
    compute_per_rank: float  # EP: slowest attention + experts of one rank; AF-pipe: max(attention, experts)
    transfer: float  # busiest NIC direction: bytes / bandwidth
    bound: float
    limiter: str  # "attention" | "experts" | "compute" | "transfer"


def roofline_bound(
    busy: Mapping[int, Mapping[str, float]],
    egress: Mapping[int, float],
    ingress: Mapping[int, float],
    bandwidth: float,
    *,
    colocated: bool,
) -> Bound:
    """The slowest resource of the step (module docstring); ``colocated`` for EP.

    >>> busy = {0: {"attention": 0.4, "experts": 0.0}, 1: {"attention": 0.0, "experts": 0.3}}
    >>> roofline_bound(busy, {0: 50.0, 1: 10.0}, {0: 10.0, 1: 50.0}, 100.0, colocated=False)
    Bound(attention=0.4, experts=0.3, compute_per_rank=0.4, transfer=0.5, bound=0.5, limiter='transfer')
    >>> busy = {0: {"attention": 0.2, "experts": 0.15}, 1: {"attention": 0.2, "experts": 0.1}}
    >>> roofline_bound(busy, {0: 5.0, 1: 5.0}, {0: 5.0, 1: 5.0}, 100.0, colocated=True).limiter
    'compute'
    """
    if not bandwidth > 0:
        raise ValueError(f"roofline_bound: bandwidth must be > 0 B/s, got {bandwidth!r}")
    attention = max(b["attention"] for b in busy.values())
    experts = max(b["experts"] for b in busy.values())
    if colocated:
        compute = max(b["attention"] + b["experts"] for b in busy.values())
        parts = {"compute": compute}
    else:
        compute = max(attention, experts)
        parts = {"attention": attention, "experts": experts}
    transfer = max(max(egress.values(), default=0.0), max(ingress.values(), default=0.0)) / bandwidth
    parts["transfer"] = transfer
    limiter = max(parts, key=parts.get)
    return Bound(attention, experts, compute, transfer, parts[limiter], limiter)


# ---------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class Prediction:
    """Predicted step (s): a priori and stage-calibrated, with the calibration factors."""

    a_priori: float
    calibrated: float | None
    k_attention: float | None  # measured / modelled attention-side compute
    k_experts: float | None  # measured / modelled expert compute (busiest rank)


def _no_memory_bound(cluster):
    # Calibrated compute times already include memory effects and the per-action overhead:
    # keep them linear in FLOPs, and do not add the overhead a second time.
    return cluster.replace(memory_bandwidth=math.inf, action_overhead=0.0)


def _scaled(work, k_attention: float, k_experts: float):
    def scale(regions):
        return [dataclasses.replace(r, fwd_flops=r.fwd_flops * k_attention, bwd_flops=r.bwd_flops * k_attention)
                for r in regions]

    return dataclasses.replace(
        work,
        pre=scale(work.pre),
        layers=[scale(regions) for regions in work.layers],
        post=scale(work.post),
        expert_flops_per_row=work.expert_flops_per_row * k_experts,
    )


def layout_of(plan, cluster, num_experts: int):
    """The partitioner's GroupLayout that produced ``plan``'s placement (one device per node)."""
    from fxdisag.planner.placement import STRATEGIES, GroupLayout

    domains = plan.routing_domains or [sorted(plan.attention_ranks + plan.expert_ranks)]
    domain_nodes = len(domains[0]) // cluster.devices_per_node
    for strategy in STRATEGIES:
        layout = GroupLayout.build(cluster, plan.attention_ranks, plan.expert_ranks, num_experts, strategy=strategy,
                                   domain_nodes=domain_nodes, nic_split=[1.0] * cluster.num_nodes)
        if layout.placement() == [sorted(r) for r in plan.expert_placement]:
            return layout
    raise ValueError(f"no placement strategy of the partitioner gives the plan's placement {plan.expert_placement}")


def predict_afpipe(work, cluster, layout, seqs_per_mb: int, m: int, measured_attention: float | None = None,
                   measured_experts: float | None = None) -> Prediction:
    """AF-pipe step: a priori, and calibrated to the measured compute per step (seconds,
    busiest attention rank / busiest expert rank) when given."""
    from fxdisag.planner.cost_afpipe import afpipe_stage_times, afpipe_times, attention_busy

    a_priori = afpipe_times(work, cluster, layout, seqs_per_mb, m, 1)["step"]
    if measured_attention is None or measured_experts is None:
        return Prediction(a_priori, None, None, None)
    flat = _no_memory_bound(cluster)
    st = afpipe_stage_times(work, flat, layout, seqs_per_mb)
    L = work.num_moe_layers
    k_a = measured_attention / attention_busy(st, L, m)
    k_e = measured_experts / (m * L * (st["expert_f"] + st["expert_b"]))
    calibrated = afpipe_times(_scaled(work, k_a, k_e), flat, layout, seqs_per_mb, m, 1)["step"]
    return Prediction(a_priori, calibrated, k_a, k_e)


def predict_ep(work, cluster, world: int, seqs_per_rank: int, m: int, measured_attention: float | None = None,
               measured_experts: float | None = None, overlap: bool = False) -> Prediction:
    """EP step as the runtime runs it: EP degree = world, gradient all-reduce exposed.
    Without ``overlap``: m micro-batches one after the other (``rounds=m``,
    ``step_no_overlap``); with it: m/2 rounds of a micro-batch pair, each half's all-to-all
    behind the other's compute (``step_overlap``, the runtime's ``ep_schedule(overlap=True)``)."""
    from fxdisag.planner.cost_afpipe import attention_busy, attention_times, expert_time
    from fxdisag.planner.cost_ep import ep_times

    if seqs_per_rank % m or (overlap and m % 2):
        raise ValueError(f"predict_ep: {seqs_per_rank} sequences per rank do not split into {m} micro-batches"
                         + (" (in pairs)" if overlap else ""))
    seqs = seqs_per_rank // m
    # ep_times' overlap variant splits its `seqs` into two halves: a pair of micro-batches
    key, seqs_arg, rounds = ("step_overlap", 2 * seqs, m // 2) if overlap else ("step_no_overlap", seqs, m)
    a_priori = ep_times(work, cluster, world, seqs_arg, rounds)[key]
    if measured_attention is None or measured_experts is None:
        return Prediction(a_priori, None, None, None)
    flat = _no_memory_bound(cluster)
    L = work.num_moe_layers
    rows = seqs * work.seq_len * work.top_k
    held = work.num_experts // world
    k_a = measured_attention / attention_busy(attention_times(work, flat, seqs), L, m)
    modelled_experts = m * L * (expert_time(work, flat, rows, held, False) + expert_time(work, flat, rows, held, True))
    k_e = measured_experts / modelled_experts
    calibrated = ep_times(_scaled(work, k_a, k_e), flat, world, seqs_arg, rounds)[key]
    return Prediction(a_priori, calibrated, k_a, k_e)
