"""plan(): the AF-pipe configuration with the smallest predicted step time that fits.

Contract
--------
``plan(profile, cluster, global_batch, ...)`` returns the :class:`Plan` minimising the
predicted AF-pipe step (cost_afpipe.py) over the grid below, subject to per-device memory
<= ``memory_fraction`` x capacity, and predicts the Megatron-LM baseline (PP x EP x DP,
interleaved 1F1B, all-to-all exposed and overlapped; cost_megatron.py) on the same
cluster and batch, each variant searched over its own grid.

The grid (exhaustive; pseudo-code)::

    for p in depth_options:            # 1, and p | nodes with p <= J: group pair g on nodes
                                       #   [g N/p, (g+1) N/p), layers dealt round robin,
                                       #   head and loss with the last layer's group
      for A in 1 .. min(W/p - 1, G):   # attention devices per group (the rest: experts),
                                       #   spread evenly over the pair's nodes
        for (d, strategy) in layouts:  # p = 1: routing domains of d nodes, "pairs" or
                                       #   "replicas" placement; p > 1: one domain, "replicas"
          NIC split: per node, the split with the fastest slowest transfer (GroupLayout.build)
          for b | ceil(G / A):         # sequences per micro-batch per attention device
            for recompute in {none, experts, attention, both}:
              for m | ceil(G / A) / b, m <= max_microbatches:   # rounds = ceil(G/A) / (b m)
                for schedule, k in [gpipe] + [1f1b with k = 1 .. m in flight]:
                  keep if memory(own layers, activations of m (gpipe) or k (1f1b)
                                 micro-batches; head and loss of one under 1f1b) fits

Optimizer states are sharded over data-parallel replicas when ``shard_optimizer``
(ZeRO-1, as Megatron's distributed optimizer), for AF-pipe (attention: over the group;
experts: over their replicas) and the baseline alike.

Pruning, exact (a test compares the result with brute force over the same grid):
(p, A) points are visited in order of :func:`step_lower_bound` (the busiest group's
FLOPs at peak, no bubble, transfer or overhead: below every candidate's step) and the
search stops once a bound reaches the best step found; a layout whose weights and
gradients alone exceed a device is skipped; more micro-batches in flight never need less
memory, so the in-flight loop stops at the first that does not fit; stage times and
memory are computed once per (layout, b, recompute) and reused across m and k. Before
searching, the least memory any candidate needs (1 sequence, 1 micro-batch, everything
recomputed) is checked; if even that does not fit, :class:`PlanError` says what did not
fit and names the smallest cluster of the same device kind that would (or that none
would, when one layer's attention side per group already exceeds a device).
"""

from __future__ import annotations

import dataclasses

import functools
import math
from dataclasses import dataclass

from fxdisag.planner.cost_afpipe import (
    afpipe_stage_times,
    afpipe_step,
    afpipe_sync,
    afpipe_sync_parts,
    attention_times,
    hop_bytes_per_token,
    shared_sync,
)
from fxdisag.planner.cost_megatron import best_megatron, megatron_memory, megatron_times
from fxdisag.planner.formulas import Recorder
from fxdisag.planner.memory import afpipe_memory
from fxdisag.planner.placement import STRATEGIES, GroupLayout
from fxdisag.planner.plan import Plan
from fxdisag.planner.workload import Workload, optimizer_bytes_per_param

__all__ = ["Candidate", "PlanError", "SCHEDULES", "attention_layout", "candidate_memory", "candidate_step",
           "depth_options", "pair_cluster", "plan"]


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
SCHEDULES = ("gpipe", "1f1b")
SHARED_EXPERTS = ("auto", "attention", "expert", "replicated")  # where plan() may put a model's shared experts


@dataclass
class Candidate:
    """One point of the search grid with its predicted step (module docstring)."""

    step: float
    depth: int  # p
    num_attention: int  # attention devices per group
    domain_nodes: int  # routing domain size, in nodes of the group pair
    strategy: str
    seqs: int  # sequences per micro-batch per attention device
    m: int
    rounds: int
    schedule: str
    in_flight: int | None  # 1f1b: micro-batches in flight
    recompute: tuple[bool, bool]
    layout: GroupLayout  # of one group pair, on pair_cluster(cluster, depth)
    chunks: tuple[int, int] = (1, 1)  # (forward, backward) chunks of every MoE layer's dispatch -> combine
    shared: tuple[int, ...] = ()  # expert ranks running the shared experts (none: the attention group)


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
    """Bytes per message row of (dispatch, combine, combine gradient, dispatch gradient)."""
    return (work.dispatch_per_row, work.combine_per_row, work.combine_grad_per_row, work.dispatch_grad_per_row)


def depth_options(work: Workload, cluster) -> list[int]:
    """Pipeline depths searched: 1, and every p > 1 that divides the node count with p <= J
    (each group pair on N / p whole nodes, so dispatch stays inside the pair's nodes)."""
    return [p for p in _divisors(cluster.num_nodes) if p <= work.num_moe_layers]


def pair_cluster(cluster, depth: int):
    """The nodes of one group pair at pipeline depth ``depth``."""
    return cluster if depth == 1 else cluster.replace(num_nodes=cluster.num_nodes // depth)


def loss_group(work: Workload, depth: int) -> int | None:
    """The attention group of the head and loss at p > 1: the group of the last MoE layer (no
    extra hop; the embedding sits on group 0, so the two largest stages part)."""
    return None if depth == 1 else (work.num_moe_layers - 1) % depth


def group_share(work: Workload, depth: int):
    return None if depth == 1 else work.group_share(depth, "round_robin", loss_group(work, depth))


def _layout_options(work: Workload, cluster, depth: int, attention, experts, optimizer, shard, cap):
    """(routing domain nodes, placement strategy) of one group pair whose weights and
    gradients may fit. p > 1: the pair is one routing domain and experts are placed
    "replicas" (the routing a plan of depth > 1 binds: replica t mod q for slot t,
    ``Plan.expert_owner``)."""
    if depth == 1:
        return _domain_options(work, cluster, attention, experts, optimizer, shard, cap)
    share = group_share(work, depth)
    w = 2 * work.dtype_bytes
    if max(share.attention_params) * w > cap:
        return []
    if -(-work.num_experts // len(experts)) * work.params_per_expert * share.laps * w > cap:
        return []
    return [(cluster.num_nodes, "replicas")]


def _hop_bytes(work: Workload, depth: int):
    """p > 1: (hop, hop gradient) bytes per token as a function of a token's message rows."""
    return functools.partial(hop_bytes_per_token, work) if depth > 1 else None


def _build_layout(work: Workload, sub, depth: int, attention, experts, d: int, strategy: str) -> GroupLayout:
    return GroupLayout.build(sub, attention, experts, work.num_experts, strategy=strategy, domain_nodes=d,
                             transfer_bytes=_transfer_bytes(work), top_k=work.top_k, sync_bytes=_sync_bytes(work),
                             hop_bytes=_hop_bytes(work, depth))


def candidate_step(work: Workload, cluster, cand: Candidate, recorder=None, attn: dict | None = None) -> dict:
    """The predicted step of ``cand`` and its parts (``cost_afpipe.afpipe_step``)."""
    sub = pair_cluster(cluster, cand.depth)
    stages = afpipe_stage_times(work, sub, cand.layout, cand.seqs, recorder, attn=attn, recompute=cand.recompute,
                                depth=cand.depth, shared=cand.shared)
    sync = afpipe_sync(work, sub, cand.layout, recorder, group_share(work, cand.depth))
    if len(cand.shared) > 1:  # copies of the shared experts: their gradients' all-reduce follows the experts'
        t_attn, t_exp = afpipe_sync_parts(work, sub, cand.layout, share=group_share(work, cand.depth))
        sync = max(t_attn, t_exp + shared_sync(work, sub, cand.layout, recorder))
    return _step_of(work, cand, stages, sync, recorder)


def candidate_memory(work: Workload, cluster, cand: Candidate, optimizer: str, shard: bool, recorder=None) -> dict:
    """Bytes per attention and expert device of ``cand``: its own layers, with the
    activations of the micro-batches its schedule keeps in flight."""
    keep = cand.m if cand.schedule == "gpipe" else min(cand.in_flight, cand.m)
    return afpipe_memory(work, cand.layout, cand.seqs, keep, optimizer, shard, recorder, recompute=cand.recompute,
                         share=group_share(work, cand.depth), tail_microbatches=None if cand.schedule == "gpipe" else 1,
                         shared=bool(cand.shared))


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
    pipeline_depth: int | None = None,
    schedule: str | None = None,
    baseline: bool = True,
    chunks: bool | tuple[int, int] = False,
    shared_experts: str = "auto",
) -> Plan:
    """The fastest predicted AF-pipe plan that fits (module docstring).

    ``memory_fraction`` of each device's capacity is usable (the rest: CUDA context,
    allocator fragmentation, communication buffers). ``num_attention`` (attention devices
    per group), ``num_microbatches``, ``microbatch_size``, ``pipeline_depth``,
    ``schedule`` pin those choices instead of searching. ``baseline=False`` skips the
    Megatron-LM baseline's search (no speedups in the plan). ``chunks``: True solves the
    chosen plan's (forward, backward) chunks per MoE layer (``chunking.solve_chunks``, at
    depth 1, near ties within ``CHUNK_TIE`` to the fewest chunks; the search itself prices
    every candidate unchunked), a pair pins them, False
    (the default) keeps every layer unchunked. ``shared_experts``: where a model's shared
    experts run (``Plan.shared_expert_ranks``): ``"auto"`` (the default) moves them to the
    expert group, as an always-selected expert, when the cost model predicts a shorter step
    for the chosen plan, ``"attention"`` keeps them on the attention group, ``"expert"``
    puts them on one expert rank (``shared_host_for``), ``"replicated"`` a copy on every
    expert rank (each token's with its first routed expert); ``"auto"`` weighs all three
    (depth 1; the search prices every candidate with them on the attention group, then
    decides for the chosen one, with a note and the formulas in ``explain()``).
    """
    if shared_experts not in SHARED_EXPERTS:
        raise ValueError(f"plan: shared_experts={shared_experts!r}; choose from {SHARED_EXPERTS}")
    if not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"plan: global_batch must be an int >= 1 (sequences per step), got {global_batch!r}")
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"plan: memory_fraction must be in (0, 1], got {memory_fraction}")
    if schedule is not None and schedule not in SCHEDULES:
        raise ValueError(f"plan: schedule={schedule!r}; choose from {SCHEDULES}")
    optimizer_bytes_per_param(optimizer, 2)  # validates the name
    W = cluster.world_size
    if W < 2:
        raise PlanError(f"plan: cluster {cluster.describe()} has {W} device; AF-pipe needs >= 2 (one per group)")
    S = seq_len or profile.seq_len
    work = Workload.from_profile(profile, S)
    cap = cluster.memory_capacity * memory_fraction
    depths = depth_options(work, cluster)
    if pipeline_depth is not None:
        if pipeline_depth not in depths:
            raise ValueError(f"plan: pipeline_depth={pipeline_depth} is not searchable on {cluster.describe()} with "
                             f"{work.num_moe_layers} MoE layers: choose from {depths} (p must divide the node "
                             "count, each group pair on whole nodes, and p <= the MoE layers)")
        depths = [pipeline_depth]
    if num_attention is not None and not any(1 <= num_attention < W // p for p in depths):
        raise ValueError(f"plan: num_attention={num_attention} must be in 1..{W // depths[0] - 1} (attention devices "
                         f"per group) on {W} devices at depth {depths[0]}")

    least = _least_memory(work, cluster, global_batch, cap, optimizer, shard_optimizer)
    if least[0] > 1.0:  # nothing of the grid fits: say why without searching it
        raise PlanError(_no_fit_message(work, cluster, global_batch, cap, least if least[1] else None, optimizer,
                                        shard_optimizer, memory_fraction, profile.model))
    best, closest = _search(work, cluster, global_batch, cap, optimizer, shard_optimizer, depths, max_microbatches,
                            num_attention, num_microbatches, microbatch_size, schedule)
    if best is None:
        raise PlanError(_no_fit_message(work, cluster, global_batch, cap, closest, optimizer, shard_optimizer,
                                        memory_fraction, profile.model))
    note = None
    if chunks is not False and chunks != (1, 1):
        if best.depth != 1:
            raise ValueError(f"plan: chunks={chunks!r} with the chosen pipeline depth {best.depth}: chunked layers "
                             "run at depth 1 only; pin pipeline_depth=1 or leave chunks=False")
        from fxdisag.planner.chunking import CHUNK_TIE, solve_chunks

        def step_of(c: tuple[int, int]) -> float:
            return candidate_step(work, cluster, dataclasses.replace(best, chunks=c))["step"]

        if chunks is True:
            choice = solve_chunks(step_of, tie=CHUNK_TIE)
            best, note = dataclasses.replace(best, chunks=choice.chunks, step=choice.step), choice.describe()
        else:
            pinned = tuple(chunks)
            best = dataclasses.replace(best, chunks=pinned, step=step_of(pinned))
    best, shared_note = _place_shared(work, cluster, best, shared_experts, optimizer, shard_optimizer, cap)
    made = _make_plan(profile, work, cluster, global_batch, best, optimizer, shard_optimizer, cap, baseline)
    if note:
        made.notes.append(note)
    if shared_note:
        made.notes.append(shared_note)
    return made


def shared_host_for(cand: Candidate) -> int:
    """The expert rank to host the shared experts: the one holding the fewest experts (it
    computes the fewest routed pairs under uniform routing), the last among equals."""
    held = cand.layout.experts_held
    return min(reversed(cand.layout.expert_ranks), key=lambda r: held[r])


def _place_shared(work: Workload, cluster, best: Candidate, choice: str, optimizer: str, shard: bool,
                  cap: float) -> tuple[Candidate, str | None]:
    """(the candidate with its shared-experts placement, the note saying why). ``"auto"``
    takes the fastest placement that fits in ``cap`` per device (the hosts keep the shared
    experts' weights, gradients and optimizer state)."""
    if choice == "attention" or (choice == "auto" and not work.shared_params):
        return best, None
    if not work.shared_params:
        raise ValueError(f"plan: shared_experts={choice!r} but the profile has no shared experts an expert rank can "
                         "run (MoELayerProfile.shared_params is 0: none, or a block insert_dispatch cannot move)")
    if best.depth != 1:
        if choice != "auto":
            raise ValueError(f"plan: shared_experts={choice!r} with the chosen pipeline depth {best.depth}: the shared "
                             "experts run on expert ranks at depth 1 only; pin pipeline_depth=1")
        return best, "shared experts: on the attention group (expert ranks run them at depth 1 only)"
    options = {"attention": best, "expert": dataclasses.replace(best, shared=(shared_host_for(best),)),
               "replicated": dataclasses.replace(best, shared=tuple(sorted(best.layout.expert_ranks)))}
    times = {k: candidate_step(work, cluster, c) for k, c in options.items()}
    fits = {k: k == "attention" or max(candidate_memory(work, cluster, c, optimizer, shard).values()) <= cap
            for k, c in options.items()}  # the searched candidate (attention) fits
    if choice == "auto":
        pick = min((k for k in times if fits[k]), key=lambda k: times[k]["step"])
    elif not fits[choice]:
        raise PlanError(f"plan: shared_experts={choice!r} does not fit: the expert devices would need "
                        f"{max(candidate_memory(work, cluster, options[choice], optimizer, shard).values()) / 1e9:.2f} "
                        f"GB of {cap / 1e9:.2f} GB (the shared experts' weights, gradients and optimizer state); "
                        "use 'attention' or 'auto'")
    else:
        pick = choice
    words = {"attention": "on the attention group, beside the dispatch",
             "expert": f"on expert rank {options['expert'].shared[0]}",
             "replicated": "on every expert rank, each token's with its first routed expert"}

    def terms(k: str) -> str:
        t = times[k]
        return (f"{k}: step {t['step']:.4g} s, attention stage {t['attn_f'] * 1e3:.3g} ms fwd, busiest expert "
                f"device {t['expert_f'] * 1e3:.3g} ms fwd, dispatch {t['dispatch'] * 1e3:.3g} ms per micro-batch"
                + ("" if fits[k] else ", does not fit in memory"))

    how = "pinned" if choice != "auto" else "chosen"
    note = (f"shared experts: {words[pick]} ({how}; " + "; ".join(terms(k) for k in times) + ")")
    return dataclasses.replace(options[pick], step=times[pick]["step"]), note


def _search(work: Workload, cluster, global_batch: int, cap: float, optimizer: str, shard: bool, depths,
            max_microbatches: int, num_attention=None, num_microbatches=None, microbatch_size=None,
            schedule=None):
    """(best Candidate or None, closest infeasible (worst memory / cap, Candidate, memory))."""
    attn_cache: dict[tuple, dict] = {}
    best: Candidate | None = None
    closest = None
    schedules = [schedule] if schedule else list(SCHEDULES)
    points = []  # (lower bound, p, A): visited in bound order, stopped once a bound reaches the best step
    for p in depths:
        Wp = pair_cluster(cluster, p).world_size
        for A in [num_attention] if num_attention else range(1, min(Wp - 1, global_batch) + 1):
            if 1 <= A < Wp:
                points.append((step_lower_bound(work, cluster, p, A, global_batch), p, A))
    points.sort()
    for bound, p, A in points:
        if best is not None and bound >= best.step * (1 - 1e-12):
            break  # every later point's bound is at least this one's
        sub = pair_cluster(cluster, p)
        try:
            attention, experts = attention_layout(sub, A)
        except ValueError:
            continue
        s_dev = math.ceil(global_batch / A)
        for d, strategy in _layout_options(work, sub, p, attention, experts, optimizer, shard, cap):
            layout = _build_layout(work, sub, p, attention, experts, d, strategy)
            seq_options = [microbatch_size] if microbatch_size else _divisors(s_dev)
            for b in seq_options:
                if s_dev % b:
                    continue
                m_options = [num_microbatches] if num_microbatches else [
                    m for m in _divisors(s_dev // b) if m <= max_microbatches]
                for recompute in _RECOMPUTE:
                    key = (b, recompute[0])
                    if key not in attn_cache:
                        attn_cache[key] = attention_times(work, sub, b, recompute=recompute[0])
                    stages = None
                    memory: dict[tuple, dict] = {}  # (schedule, micro-batches kept) -> bytes: m-independent
                    for m in m_options:
                        if (s_dev // b) % m:
                            continue
                        for kind in schedules:
                            ks = [None] if kind == "gpipe" else range(1, m + 1)
                            for k in ks:
                                cand = Candidate(math.inf, p, A, d, strategy, b, m, s_dev // (b * m), kind, k,
                                                 recompute, layout)
                                kept = (kind, m if k is None else k)
                                if kept not in memory:
                                    memory[kept] = candidate_memory(work, cluster, cand, optimizer, shard)
                                mem = memory[kept]
                                worst = max(mem.values()) / cap
                                if worst > 1.0:
                                    if closest is None or worst < closest[0]:
                                        closest = (worst, cand, mem)
                                    break  # more in flight only needs more memory
                                if stages is None:
                                    stages = _pair_times(work, cluster, cand, attn_cache[key])
                                cand.step = _step_of(work, cand, *stages)["step"]
                                if best is None or cand.step < best.step * (1 - 1e-12):
                                    best = cand
    return best, closest


def step_lower_bound(work: Workload, cluster, depth: int, num_attention: int, global_batch: int) -> float:
    """A bound below the predicted step of every candidate with pipeline depth ``depth`` and
    ``num_attention`` attention devices per group: the busiest group's compute at peak
    FLOP/s, with no bubble, transfer, overhead or memory-bound region. The busy time of a
    group's attention devices is ceil(G / A) sequences x (the laps' layers + pre + post),
    forward + backward, and AF-pipe's step (PIPELINE_TIME and PIPELINE_1F1B alike) is at
    least m L t_b per round; the expert devices of a pair share its rows at best evenly
    (max_load >= A / F)."""
    sub = pair_cluster(cluster, depth)
    peak = sub.peak(work.dtype)
    share = group_share(work, depth)
    L = share.laps if share else work.num_moe_layers
    s_dev = math.ceil(global_batch / num_attention)
    per_layer = sum(r.fwd_flops + r.bwd_flops for regs in work.layers for r in regs) / len(work.layers)
    outside = sum(r.fwd_flops + r.bwd_flops for r in work.pre + work.post)
    attention = s_dev * (L * per_layer + outside) / peak
    F = sub.world_size - num_attention
    experts = s_dev * work.seq_len * work.top_k * num_attention / F * L * 3 * work.expert_flops_per_row / peak
    return max(attention, experts)


def _pair_times(work: Workload, cluster, cand: Candidate, attn: dict):
    """Stage times and gradient sync of a candidate's (layout, micro-batch size, recompute):
    what its step formula reads, the same for every m, schedule and in-flight count."""
    sub = pair_cluster(cluster, cand.depth)
    share = group_share(work, cand.depth)
    stages = afpipe_stage_times(work, sub, cand.layout, cand.seqs, attn=attn, recompute=cand.recompute,
                                depth=cand.depth, shared=cand.shared)
    return stages, afpipe_sync(work, sub, cand.layout, share=share)


def _step_of(work: Workload, cand: Candidate, stages: dict, sync: float, recorder=None) -> dict:
    share = group_share(work, cand.depth)
    return afpipe_step(work, stages, cand.m, cand.rounds, sync, recorder, depth=cand.depth,
                       laps=share.laps if share else None, schedule=cand.schedule, in_flight=cand.in_flight,
                       chunks=cand.chunks)


def _make_plan(profile, work: Workload, cluster, global_batch: int, best: Candidate, optimizer: str,
               shard: bool, cap: float, baseline: bool = True) -> Plan:
    rec = Recorder()
    layout = best.layout
    p = best.depth
    sub = pair_cluster(cluster, p)
    times = candidate_step(work, cluster, best, rec)
    memory = candidate_memory(work, cluster, best, optimizer, shard, rec)
    notes = []
    A = best.num_attention
    padded = A * math.ceil(global_batch / A)
    if padded != global_batch:
        notes.append(f"global batch {global_batch} does not split evenly over {A} attention ranks"
                     f"{' per group' if p > 1 else ''}: predicted as {padded} sequences (some ranks idle part of the "
                     "step)")
    base_info: dict = {}
    base_no = base_ov = None
    if baseline:
        found = best_megatron(work, cluster, global_batch, optimizer, shard, cap)
        for variant, result in found.items():
            if result is None:
                notes.append(f"Megatron-LM baseline ({variant.replace('_', ' ')}) does not fit in memory on this "
                             "cluster (no PP x TP x EP x DP configuration fits)")
                continue
            _, cfg = result
            t = megatron_times(work, cluster, cfg, rec, variants=(variant,))
            memory[f"megatron_{variant}"] = megatron_memory(work, cluster, cfg, optimizer, shard, rec)
            base_info[variant] = cfg.to_dict(cluster.world_size, work.num_experts)
            base_info[variant]["step"] = t[f"step_{variant}"]
            if variant == "no_overlap":
                base_no = t["step_no_overlap"]
            else:
                base_ov = t["step_overlap"]
    model_flops = work.model_flops_per_seq * global_batch
    peak_total = cluster.peak(work.dtype) * cluster.world_size
    utilisation = {
        "attention": times["util_attention"],
        "experts": times["util_experts"],
        "MFU AF-pipe": model_flops / (times["step"] * peak_total),
    }
    if base_ov:
        utilisation["MFU Megatron overlap"] = model_flops / (base_ov * peak_total)
    memory["capacity"] = cap
    breakdown = {k: v for k, v in times.items() if isinstance(v, float)}
    share = group_share(work, p)
    breakdown["sync_attention"], breakdown["sync_experts"] = afpipe_sync_parts(work, sub, layout, share=share)
    tokens = best.seqs * work.seq_len
    rows = tokens * layout.rows_per_token(work.top_k)  # message rows per attention device per micro-batch
    breakdown["rows_per_token"] = layout.rows_per_token(work.top_k)
    for key, per_row in zip(("dispatch", "combine", "combine_grad", "dispatch_grad"), _transfer_bytes(work)):
        breakdown[f"{key}_bytes"] = rows * per_row  # per attention device per micro-batch
    if p > 1:
        hop_f, hop_b = hop_bytes_per_token(work, layout.rows_per_token(work.top_k))
        breakdown["hop_bytes"], breakdown["hop_grad_bytes"] = tokens * hop_f, tokens * hop_b
    breakdown["link_latency"] = sub.inter_node_latency if layout.domain_nodes > 1 or p > 1 else sub.intra_node_latency
    shift = sub.world_size
    attention_ranks = [r + g * shift for g in range(p) for r in layout.attention_ranks]
    expert_ranks = [r + g * shift for g in range(p) for r in layout.expert_ranks]
    placement = [[r + g * shift for g in range(p) for r in ranks] for ranks in layout.placement()]
    return Plan(
        attention_ranks=attention_ranks,
        expert_ranks=expert_ranks,
        expert_placement=placement,
        routing_domains=layout.domains() if p == 1 else [],
        expert_owners={str(k): list(v) for k, v in sorted(layout.owners().items())} if p == 1 else {},
        num_microbatches=best.m,
        microbatch_size=best.seqs,
        grad_accumulation=best.rounds,
        schedule_kind=best.schedule,
        in_flight=best.in_flight,
        num_moe_layers=work.num_moe_layers,
        chunks=[list(best.chunks)] * work.num_moe_layers if best.chunks != (1, 1) else [],
        shared_expert_ranks=list(best.shared),
        pipeline_depth=p,
        loss_group=loss_group(work, p),
        nic_split=layout.nic_split() * p,
        stage_costs=_stage_costs(times) if p > 1 else {},
        model=profile.model,
        cluster=cluster.describe(),
        seq_len=work.seq_len,
        global_batch=global_batch,
        optimizer=optimizer,
        recompute={"attention": best.recompute[0], "experts": best.recompute[1]},
        step_time=times["step"],
        baseline_step_time=base_no,
        baseline_step_time_overlap=base_ov,
        utilisation=utilisation,
        memory_per_device=memory,
        baseline=base_info,
        breakdown=breakdown,
        evaluations=[e.to_dict() for e in rec.evaluations],
        notes=notes,
    )


def _stage_costs(times: dict) -> dict[str, float]:
    """The predicted compute action times, for the ring schedule's order (Plan.stage_costs)."""
    return {"F": times["attn_f"], "B": times["attn_b"], "EF": times["expert_f"], "EB": times["expert_b"],
            "F0": times["attn_f"] + times["pre_f"], "B0": times["attn_b"] + times["pre_b"],
            "FJ": times["post_f"], "BJ": times["post_b"]}


def _recompute_str(recompute: tuple[bool, bool]) -> str:
    parts = [name for name, on in zip(("attention", "experts"), recompute) if on]
    return "+".join(parts) if parts else "none"


# ---------------------------------------------------------------------- when nothing fits


def _fits_somewhere(work: Workload, cluster, global_batch: int, cap: float, optimizer: str, shard: bool) -> bool:
    return _least_memory(work, cluster, global_batch, cap, optimizer, shard)[0] <= 1.0


def _least_memory(work: Workload, cluster, global_batch: int, cap: float, optimizer: str, shard: bool):
    """(worst memory / cap, Candidate, memory) of the candidate needing the least memory: over
    every (depth, A, placement), 1 sequence x 1 micro-batch in flight, recomputing everything
    (no candidate of the grid needs less). (inf, None, None) when no placement's weights fit."""
    least = (math.inf, None, None)
    for p in depth_options(work, cluster):
        sub = pair_cluster(cluster, p)
        for A in range(1, min(sub.world_size - 1, global_batch) + 1):
            try:
                attention, experts = attention_layout(sub, A)
            except ValueError:
                continue
            for d, strategy in _layout_options(work, sub, p, attention, experts, optimizer, shard, cap):
                layout = GroupLayout.build(sub, attention, experts, work.num_experts, strategy=strategy,
                                           domain_nodes=d, nic_split=[1.0] * sub.num_nodes)
                cand = Candidate(math.inf, p, A, d, strategy, 1, 1, 1, "gpipe", None, (True, True), layout)
                mem = candidate_memory(work, cluster, cand, optimizer, shard)
                worst = max(mem.values()) / cap
                if worst < least[0]:
                    least = (worst, cand, mem)
                if worst <= 1.0:
                    return least
    return least


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
    deepest = work.group_share(work.num_moe_layers, "round_robin", work.num_moe_layers - 1)  # one layer per group
    attn_floor = max(P * 2 * w + keep for P, keep in zip(deepest.attention_params, deepest.recompute_keep_per_seq)) \
        + work.attention_saved_layer_max
    if closest is not None:
        worst, c, mem = closest
        Wp = cluster.world_size // c.depth
        kept = c.m if c.schedule == "gpipe" else c.in_flight
        lines.append(
            f"closest: pipeline depth {c.depth}, {c.num_attention} attention + {Wp - c.num_attention} expert devices "
            f"per group, routing domains of {c.domain_nodes} node(s), placement {c.strategy!r}, {c.schedule} with "
            f"{kept} micro-batch(es) of {c.seqs} sequence(s) in flight, recompute {_recompute_str(c.recompute)}: "
            f"attention device needs {mem['attention'] / gb:.1f} GB, expert device {mem['experts'] / gb:.1f} GB."
        )
    expert_params = work.params_per_expert * work.num_experts * work.num_moe_layers
    lines.append(
        f"attention side: {work.attention_params / 1e9:.2f}B parameters ({work.attention_params * 2 * w / gb:.1f} GB "
        f"weights+grads, {work.attention_params * o / gb:.1f} GB optimizer state before sharding; at pipeline depth p "
        f"an attention group holds its layers' share) + {work.attention_saved_bytes / gb:.2f} GB activations per "
        f"sequence; experts: {expert_params / 1e9:.1f}B parameters, {expert_params * (2 * w + o) / gb:.0f} GB with "
        f"gradients and optimizer state ({expert_params * (2 * w + o) / gb / cluster.world_size:.1f} GB per device "
        "if spread over every device)."
    )
    if attn_floor > cap:
        lines.append(
            f"no cluster of this device fits: at the deepest pipeline (one MoE layer per group), the attention "
            f"weights and gradients of one group plus one sequence of activations (recomputing) already need "
            f"{attn_floor / gb:.1f} GB per device (tensor-parallel attention is not supported)."
        )
        return "\n".join(lines)
    bigger = _smallest_cluster(work, cluster, global_batch, cap, optimizer, shard)
    if bigger is None:
        lines.append("no cluster of this device up to 4096 nodes fits.")
    else:
        lines.append(f"smallest cluster of this device that fits: {bigger.describe()} ({bigger.world_size} devices).")
    return "\n".join(lines)
