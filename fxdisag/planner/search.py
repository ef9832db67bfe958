"""plan(): the AF-pipe configuration with the smallest predicted step time that fits.

Contract
--------
``plan(profile, cluster, global_batch, ...)`` returns the :class:`Plan` minimising the
predicted AF-pipe step time (forward + backward + gradient all-reduce, cost_afpipe.py)
over

* A attention devices and F = W - A expert devices (all W devices used, A <= global batch),
  attention devices spread evenly over the nodes (first local ranks of each node);
* routing domains of d consecutive nodes (d divides the node count): each domain holds a
  replica of every expert and its attention ranks route only to those replicas, so a
  small d keeps the traffic inside nodes at the price of more expert replicas;
* the expert placement and routing inside each domain (placement.domain_owners): "pairs"
  (the (attention rank, expert) pairs spread round-robin over the expert ranks: balanced
  load, more experts per rank) or "replicas" (ceil(E/F) experts per rank round-robin,
  attention ranks take the replicas in turn: fewest experts per rank);
* the NIC split of every node holding both groups (GroupLayout.build);
* micro-batch size b (sequences per attention device) and count m <= max_microbatches,
  with b * m * rounds = ceil(global_batch / A) (the rest is gradient accumulation),

* activation recomputation per group (attention side, experts), used only where it is
  needed to fit (it never makes a step faster),

subject to per-device memory <= ``memory_fraction`` x capacity: weights + gradients +
optimizer states (sharded over data-parallel replicas when ``shard_optimizer``, as
ZeRO-1 / Megatron's distributed optimizer) + activations of all m in-flight
micro-batches (GPipe-style). The EP baseline is searched the same way (EP degree ep
dividing gcd(E, W), micro-step size, recomputation) and predicted on the same cluster
and batch.

If nothing fits it raises :class:`PlanError` saying what did not fit (the closest
candidate's memory by part) and the smallest cluster of the same device kind that would
fit, or that none would (when the replicated attention weights alone exceed a device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxdisag.planner.cost_afpipe import (
    afpipe_stage_times,
    afpipe_step,
    afpipe_sync,
    afpipe_sync_parts,
    attention_times,
)
from fxdisag.planner.cost_ep import ep_times
from fxdisag.planner.formulas import Recorder
from fxdisag.planner.memory import afpipe_memory, ep_memory
from fxdisag.planner.placement import STRATEGIES, GroupLayout
from fxdisag.planner.plan import Plan
from fxdisag.planner.workload import Workload, optimizer_bytes_per_param

__all__ = ["plan", "PlanError", "attention_layout"]


class PlanError(ValueError):
    """No configuration fits; the message says what did not fit and what cluster would."""


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def attention_layout(cluster, num_attention: int) -> tuple[list[int], list[int]]:
    """Attention ranks spread evenly over the nodes (the first local ranks of each node);
    the other ranks are expert ranks."""
    N, dpn = cluster.num_nodes, cluster.devices_per_node
    base, extra = divmod(num_attention, N)
    attention = []
    for n in range(N):
        count = base + (1 if n < extra else 0)
        if count > dpn:
            raise ValueError(f"{num_attention} attention devices do not fit {N} nodes of {dpn}")
        attention += [n * dpn + i for i in range(count)]
    taken = set(attention)
    experts = [r for r in range(cluster.world_size) if r not in taken]
    return attention, experts


def _domain_expert_counts(cluster, attention: list[int], experts: list[int], d: int) -> list[int] | None:
    """Expert devices of every domain that has attention ranks (None if one has none)."""
    per = d * cluster.devices_per_node
    counts: dict[int, int] = {}
    for r in experts:
        counts[r // per] = counts.get(r // per, 0) + 1
    domains = {r // per for r in attention}
    if any(counts.get(D, 0) == 0 for D in domains) or any(D not in domains for D in counts):
        return None  # a domain without experts, or experts nobody routes to
    return [counts[D] for D in sorted(domains)]


_RECOMPUTE = ((False, False), (False, True), (True, False), (True, True))  # (attention side, experts)


@dataclass
class _Candidate:
    step: float
    num_attention: int
    domain_nodes: int
    strategy: str
    seqs: int
    m: int
    rounds: int
    layout: GroupLayout
    recompute: tuple[bool, bool]


def _domain_options(work: Workload, cluster, attention, experts, optimizer, shard, cap):
    """(domain nodes, placement strategy) pairs whose expert weights + optimizer state may fit."""
    E, L = work.num_experts, work.num_moe_layers
    w = 2 * work.dtype_bytes  # weights + grads: a lower bound, optimizer states may shard
    out = []
    for d in _divisors(cluster.num_nodes):
        counts = _domain_expert_counts(cluster, attention, experts, d)
        if counts is None:
            continue
        a = math.ceil(len(attention) / (cluster.num_nodes // d))
        F = min(counts)
        held = {"pairs": min(-(-a * E // F), E // math.gcd(E, F)), "replicas": -(-E // F)}
        for strategy in STRATEGIES:
            if held[strategy] * work.params_per_expert * L * w <= cap:  # weights + grads must fit
                out.append((d, strategy))
    return out


def _sync_bytes(work: Workload) -> tuple[float, float]:
    return (work.attention_params * work.dtype_bytes,
            work.params_per_expert * work.num_moe_layers * work.dtype_bytes)


def _transfer_bytes(work: Workload) -> tuple[float, float, float, float]:
    return (work.dispatch_per_token, work.combine_per_token, work.combine_grad_per_token, work.dispatch_grad_per_token)


def _best_ep(work: Workload, cluster, global_batch: int, optimizer: str, shard: bool, cap: float):
    W = cluster.world_size
    seqs_per_device = math.ceil(global_batch / W)
    best = None
    for ep in _divisors(math.gcd(work.num_experts, W)):
        for seqs in _divisors(seqs_per_device):
            for recompute in _RECOMPUTE:
                if ep_memory(work, cluster, ep, seqs, optimizer, shard, recompute=recompute) > cap:
                    continue
                times = ep_times(work, cluster, ep, seqs, seqs_per_device // seqs, recompute=recompute)
                if best is None or times["step_overlap"] < best[0]["step_overlap"]:
                    best = (times, ep, seqs, recompute)
                break  # later recompute options only add work
    return best


def plan(
    profile,
    cluster,
    global_batch: int,
    *,
    seq_len: int | None = None,
    max_microbatches: int = 32,
    optimizer: str = "adam",
    shard_optimizer: bool = True,
    memory_fraction: float = 0.9,
    num_attention: int | None = None,
    num_microbatches: int | None = None,
    microbatch_size: int | None = None,
) -> Plan:
    """The fastest predicted AF-pipe plan that fits (module docstring).

    ``memory_fraction`` of each device's capacity is usable (the rest: CUDA context,
    allocator fragmentation, communication buffers). ``num_attention``,
    ``num_microbatches``, ``microbatch_size`` pin those choices instead of searching.
    """
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"plan: global_batch must be an int >= 1 (sequences per step), got {global_batch!r}")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"plan: memory_fraction must be in (0, 1], got {memory_fraction}")
    optimizer_bytes_per_param(optimizer, 2)  # validates the name
    W = cluster.world_size
    if W < 2:
        raise PlanError(f"plan: cluster {cluster.describe()} has {W} device; AF-pipe needs >= 2 (one per group)")
    S = seq_len or profile.seq_len
    work = Workload.from_profile(profile, S)
    E = work.num_experts
    cap = cluster.memory_capacity * memory_fraction
    if num_attention is not None and not 1 <= num_attention < W:
        raise ValueError(f"plan: num_attention={num_attention} must be in 1..{W - 1} on {W} devices")

    attn_cache: dict[tuple, dict] = {}
    best: _Candidate | None = None
    closest = None  # (worst memory / cap, description) of the closest infeasible candidate
    counts = [num_attention] if num_attention else range(1, min(W - 1, global_batch) + 1)
    for A in counts:
        try:
            attention, experts = attention_layout(cluster, A)
        except ValueError:
            continue
        s_dev = math.ceil(global_batch / A)
        for d, strategy in _domain_options(work, cluster, attention, experts, optimizer, shard_optimizer, cap):
            layout = GroupLayout.build(cluster, attention, experts, E, strategy=strategy, domain_nodes=d,
                                       transfer_bytes=_transfer_bytes(work), sync_bytes=_sync_bytes(work))
            sync = None
            seq_options = [microbatch_size] if microbatch_size else _divisors(s_dev)
            for b in seq_options:
                if s_dev % b:
                    continue
                m_options = [num_microbatches] if num_microbatches else [
                    m for m in _divisors(s_dev // b) if m <= max_microbatches
                ]
                stages: dict[tuple, dict] = {}
                for m in m_options:
                    if (s_dev // b) % m:
                        continue
                    for recompute in _RECOMPUTE:
                        mem = afpipe_memory(work, layout, b, m, optimizer, shard_optimizer, recompute=recompute)
                        worst = max(mem.values()) / cap
                        if worst > 1.0:
                            if closest is None or worst < closest[0]:
                                closest = (worst, A, d, strategy, b, m, mem)
                            continue
                        if recompute not in stages:
                            key = (b, recompute[0])
                            if key not in attn_cache:
                                attn_cache[key] = attention_times(work, cluster, b, recompute=recompute[0])
                            stages[recompute] = afpipe_stage_times(work, cluster, layout, b, attn=attn_cache[key],
                                                                   recompute=recompute)
                        if sync is None:
                            sync = afpipe_sync(work, cluster, layout)
                        rounds = s_dev // (b * m)
                        step = afpipe_step(work, stages[recompute], m, rounds, sync)["step"]
                        if best is None or step < best.step * (1 - 1e-12):
                            best = _Candidate(step, A, d, strategy, b, m, rounds, layout, recompute)
    if best is None:
        raise PlanError(_no_fit_message(work, cluster, global_batch, cap, closest, optimizer, shard_optimizer,
                                        memory_fraction, profile.model))
    return _make_plan(profile, work, cluster, global_batch, best, optimizer, shard_optimizer, cap)


def _make_plan(profile, work: Workload, cluster, global_batch: int, best: _Candidate, optimizer: str,
               shard: bool, cap: float) -> Plan:
    rec = Recorder()
    layout = best.layout
    stages = afpipe_stage_times(work, cluster, layout, best.seqs, rec, recompute=best.recompute)
    times = afpipe_step(work, stages, best.m, best.rounds, afpipe_sync(work, cluster, layout, rec), rec)
    memory = afpipe_memory(work, layout, best.seqs, best.m, optimizer, shard, rec, recompute=best.recompute)
    notes = []
    A = best.num_attention
    padded = A * math.ceil(global_batch / A)
    if padded != global_batch:
        notes.append(f"global batch {global_batch} does not split evenly over {A} attention ranks: "
                     f"predicted as {padded} sequences (some ranks idle part of the step)")
    ep = _best_ep(work, cluster, global_batch, optimizer, shard, cap)
    ep_info: dict = {}
    ep_no = ep_ov = None
    if ep is None:
        notes.append("EP baseline does not fit in memory on this cluster (no EP degree / micro-step size fits)")
    else:
        _, ep_degree, ep_seqs, ep_recompute = ep
        rounds = math.ceil(global_batch / cluster.world_size) // ep_seqs
        ep_t = ep_times(work, cluster, ep_degree, ep_seqs, rounds, rec, recompute=ep_recompute)
        ep_no, ep_ov = ep_t["step_no_overlap"], ep_t["step_overlap"]
        ep_mem = ep_memory(work, cluster, ep_degree, ep_seqs, optimizer, shard, rec, recompute=ep_recompute)
        memory["ep_baseline"] = ep_mem
        ep_info = {
            "ep": ep_degree,
            "seqs_per_microstep": ep_seqs,
            "rounds": rounds,
            "recompute": {"attention": ep_recompute[0], "experts": ep_recompute[1]},
            "description": f"EP degree {ep_degree} ({work.num_experts // ep_degree} experts per device, "
            f"{cluster.world_size // ep_degree} replica(s)), {ep_seqs} sequence(s) per device per micro-step, "
            f"{rounds} accumulation round(s), recompute {_recompute_str(ep_recompute)}",
        }
    model_flops = work.model_flops_per_seq * global_batch
    peak_total = cluster.peak(work.dtype) * cluster.world_size
    utilisation = {
        "attention": times["util_attention"],
        "experts": times["util_experts"],
        "MFU AF-pipe": model_flops / (times["step"] * peak_total),
    }
    if ep_ov:
        utilisation["MFU EP overlap"] = model_flops / (ep_ov * peak_total)
    memory["capacity"] = cap
    breakdown = {k: v for k, v in times.items() if isinstance(v, float)}
    breakdown["sync_attention"], breakdown["sync_experts"] = afpipe_sync_parts(work, cluster, layout)
    tokens = best.seqs * work.seq_len
    for key, per_token in zip(("dispatch", "combine", "combine_grad", "dispatch_grad"), _transfer_bytes(work)):
        breakdown[f"{key}_bytes"] = tokens * per_token  # per attention device per micro-batch
    breakdown["link_latency"] = cluster.inter_node_latency if layout.domain_nodes > 1 else cluster.intra_node_latency
    return Plan(
        attention_ranks=layout.attention_ranks,
        expert_ranks=layout.expert_ranks,
        expert_placement=layout.placement(),
        routing_domains=layout.domains(),
        expert_owners={str(k): list(v) for k, v in sorted(layout.owners().items())},
        num_microbatches=best.m,
        microbatch_size=best.seqs,
        grad_accumulation=best.rounds,
        num_moe_layers=work.num_moe_layers,
        nic_split=layout.nic_split(),
        model=profile.model,
        cluster=cluster.describe(),
        seq_len=work.seq_len,
        global_batch=global_batch,
        optimizer=optimizer,
        recompute={"attention": best.recompute[0], "experts": best.recompute[1]},
        step_time=times["step"],
        ep_step_time=ep_no,
        ep_step_time_overlap=ep_ov,
        utilisation=utilisation,
        memory_per_device=memory,
        ep_baseline=ep_info,
        breakdown=breakdown,
        evaluations=[e.to_dict() for e in rec.evaluations],
        notes=notes,
    )


def _recompute_str(recompute: tuple[bool, bool]) -> str:
    parts = [name for name, on in zip(("attention", "experts"), recompute) if on]
    return "+".join(parts) if parts else "none"


# ---------------------------------------------------------------------- when nothing fits


def _fits_somewhere(work: Workload, cluster, global_batch: int, cap: float, optimizer: str, shard: bool) -> bool:
    """Is there any (A, placement) whose memory with 1 sequence x 1 micro-batch, recomputing
    everything, fits?"""
    W = cluster.world_size
    E = work.num_experts
    for A in range(1, min(W - 1, global_batch) + 1):
        try:
            attention, experts = attention_layout(cluster, A)
        except ValueError:
            continue
        for d, strategy in _domain_options(work, cluster, attention, experts, optimizer, shard, cap):
            layout = GroupLayout.build(cluster, attention, experts, E, strategy=strategy, domain_nodes=d,
                                       nic_split=[1.0] * cluster.num_nodes)
            mem = afpipe_memory(work, layout, 1, 1, optimizer, shard, recompute=(True, True))
            if max(mem.values()) <= cap:
                return True
    return False


def _smallest_cluster(work: Workload, cluster, global_batch: int, cap: float, optimizer: str, shard: bool):
    lo, hi = cluster.num_nodes, None
    nodes = max(cluster.num_nodes * 2, 2)
    while nodes <= 4096:
        if _fits_somewhere(work, cluster.replace(num_nodes=nodes), global_batch, cap, optimizer, shard):
            hi = nodes
            break
        lo, nodes = nodes, nodes * 2
    if hi is None:
        return None
    while hi - lo > 1:  # assumes fitting is monotone in the node count
        mid = (lo + hi) // 2
        if _fits_somewhere(work, cluster.replace(num_nodes=mid), global_batch, cap, optimizer, shard):
            hi = mid
        else:
            lo = mid
    return cluster.replace(num_nodes=hi)


def _no_fit_message(work, cluster, global_batch, cap, closest, optimizer, shard, fraction, model) -> str:
    gb = 1e9
    lines = [f"no AF-pipe plan for {model} fits on {cluster.describe()} "
             f"(usable memory {cap / gb:.1f} GB per device = {fraction:.0%} of {cluster.memory_capacity / gb:.1f} GB; "
             f"seq_len {work.seq_len}, global batch {global_batch}, optimizer {optimizer}"
             f"{', states sharded' if shard else ''})."]
    w = work.dtype_bytes
    o = optimizer_bytes_per_param(optimizer, w)
    attn_floor = (work.attention_params * 2 * w + work.num_decoder_layers * work.layer_input_bytes
                  + work.attention_saved_unlayered + work.attention_saved_layer_max)
    if closest is not None:
        worst, A, d, strategy, b, m, mem = closest
        lines.append(
            f"closest: {A} attention + {cluster.world_size - A} expert devices, routing domains of {d} node(s), "
            f"placement {strategy!r}, "
            f"{m} micro-batch(es) of {b} sequence(s): attention device needs {mem['attention'] / gb:.1f} GB, "
            f"expert device {mem['experts'] / gb:.1f} GB."
        )
    lines.append(
        f"attention side: {work.attention_params / 1e9:.2f}B parameters replicated on every attention device "
        f"({work.attention_params * 2 * w / gb:.1f} GB weights+grads, {work.attention_params * o / gb:.1f} GB optimizer "
        f"state before sharding) + {work.attention_saved_bytes / gb:.2f} GB activations per sequence; "
        f"experts: {work.params_per_expert * work.num_experts * work.num_moe_layers / 1e9:.1f}B parameters in total."
    )
    if attn_floor > cap:
        lines.append(
            f"no cluster of this device fits: the replicated attention weights and gradients plus one sequence "
            f"of activations (recomputing) already need {attn_floor / gb:.1f} GB per device (tensor-parallel attention is not "
            "supported)."
        )
        return "\n".join(lines)
    bigger = _smallest_cluster(work, cluster, global_batch, cap, optimizer, shard)
    if bigger is None:
        lines.append("no cluster of this device up to 4096 nodes fits.")
    else:
        lines.append(f"smallest cluster of this device that fits: {bigger.describe()} ({bigger.world_size} devices).")
    return "\n".join(lines)
