"""auto_plan: the planner's choice for the world this process runs in (``plan="auto"``).

Contract: ``auto_plan(captured, example_inputs, cluster=None)`` -- a collective on every
rank -- returns the same :class:`Plan` on every rank:

1. the cluster: ``cluster`` (a ClusterSpec or a string such as ``"2x1xh100"``), or
   ``ClusterSpec.measure()`` (online profiling of matmul rate and links) when None;
2. the profile of the captured model at the example's sequence length;
3. the fastest predicted plan among those the runtime executes as one call per step:
   ``attention ranks x micro-batches x micro-batch size == the example's batch`` and no
   gradient-accumulation rounds (the search is pinned to each such (A, m) and the best
   prediction wins; a near tie, within ``TIE`` = 10% of the best, goes to the fewest
   micro-batches: fewer actions, less exposure to the per-action overhead the profiling
   step fits least surely, and a choice that does not flip with that fit's noise. TIE is
   that noise: the profiled prediction of one configuration (AF-pipe 1A+1E m=4, 2 ranks,
   400 Mbit) ranged 254-306 ms over 6 benchmark repeats (+-9%; benchmarks/RESULTS.md),
   mostly from the probe with the most actions, whose compute moved by up to 1.8x from
   run to run (the expert rank's at m = 16: 229-406 ms). With a calibration, a near
   tie under the fit of any one timed step counts too), at pipeline depth 1 with the GPipe
   schedule: on the emulated cluster the runtime's 1F1B measures slower than the cost model predicts
   (benchmarks/RESULTS.md, "Schedules and pipeline depth"), and depth > 1 refuses tied
   embeddings, so "auto" keeps to what it measured best until the cost model is
   calibrated against those runs;
4. with ``calibrate`` (default: when the cluster is measured, ``cluster=None``): a real
   profiling step of that plan's split (``calibrate.probe``: the stage programs' time per
   action and per FLOP, measured on the ranks that run them), then step 3 again, each
   candidate with the profile and cluster calibrated around its micro-batch size. A model that cannot run a step (meta device, a batch
   without labels) keeps the a priori plan, and the log says why;
5. the chosen plan's chunks of each MoE layer's dispatch -> experts -> combine, solved
   on the (calibrated) cost model with the split and micro-batches kept
   (:func:`with_chunks`; near ties to the fewest chunks, ``chunking.CHUNK_TIE``);
6. rank 0's plan is broadcast, so ranks whose measurements differ agree.

``num_microbatches`` pins m (the torch.compile option ``microbatches``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
import torch.distributed as dist

from fxdisag.planner.cluster import ClusterSpec
from fxdisag.planner.plan import Plan
from fxdisag.planner.profile import profile
from fxdisag.planner.search import PlanError, plan

__all__ = ["auto_plan", "runnable_plan", "with_chunks"]

log = logging.getLogger("fxdisag.planner")

TIE = 0.10  # relative: predictions this close count as equal (step 3 of the contract)


def _param_dtype(captured) -> torch.dtype:
    for p in captured.graph_module.parameters():
        return p.dtype
    return torch.float32


def runnable_plan(prof, cluster: ClusterSpec, batch: int, seq_len: int,
                  num_microbatches: int | None = None, tie: float = TIE,
                  calibration=None) -> tuple[Plan, list[str]]:
    """The fastest predicted plan the runtime runs in one call per step, and why others were not.

    Pins the search to every (attention ranks A, micro-batches m) with A x m x b == batch and
    keeps plans without gradient-accumulation rounds. Among the plans within ``tie`` of the
    fastest prediction, the one with the fewest micro-batches (then the fastest) wins.
    ``calibration`` (``calibrate.Calibration``): each candidate is predicted with the
    profiling step's fit around its micro-batch size (``Calibration.apply``), and the near
    ties are also those of every fit of one timed step alone (``Calibration.resamples``): a
    plan that one step's fit puts within ``tie`` of the fastest is one the probe cannot rule
    out, and the notes say when that decided the choice.
    """
    candidates: list[Plan] = []
    notes: list[str] = []
    pinned: list[tuple[int, int]] = []
    for a in range(1, cluster.world_size):
        if batch % a:
            notes.append(f"{a} attention ranks: the batch of {batch} does not split over them")
            continue
        per_rank = batch // a
        for m in (d for d in range(1, per_rank + 1) if per_rank % d == 0
                  and num_microbatches in (None, d)):
            p_, c_ = (prof, cluster) if calibration is None else calibration.apply(
                prof, cluster, calibration.microbatches_for(per_rank // m))
            try:
                candidate = plan(
                    p_, c_, batch, seq_len=seq_len, num_attention=a, num_microbatches=m,
                    microbatch_size=per_rank // m, pipeline_depth=1, schedule="gpipe",
                )
            except PlanError as exc:
                notes.append(f"{a} attention ranks, m={m}: {str(exc).splitlines()[0]}")
                continue
            if candidate.grad_accumulation != 1:
                notes.append(f"{a} attention ranks, m={m}: {candidate.grad_accumulation} accumulation rounds")
                continue
            candidates.append(candidate)
            pinned.append((a, m))
    if not candidates:
        raise PlanError(
            f"no runnable AF-pipe plan for a batch of {batch} sequences on {cluster.describe()}:\n  "
            + "\n  ".join(notes[:8])
        )
    fastest = min(c.step_time for c in candidates)
    near = {k for k, c in enumerate(candidates) if c.step_time <= fastest * (1 + tie)}
    unresolved = set()
    for fit in (calibration.resamples() if calibration is not None else ()):
        times = [_predict(prof, cluster, batch, seq_len, a, m, fit) for a, m in pinned]
        unresolved |= {k for k, t in enumerate(times) if t <= min(times) * (1 + tie)} - near
    best = min(near | unresolved, key=lambda k: (candidates[k].num_microbatches, candidates[k].step_time))
    chosen = candidates[best]
    if best in unresolved:
        top = min(near, key=lambda k: (candidates[k].num_microbatches, candidates[k].step_time))
        notes.append(
            f"m={chosen.num_microbatches} ({_split(chosen)}) is predicted "
            f"{chosen.step_time / candidates[top].step_time - 1:.1%} slower than m={candidates[top].num_microbatches} "
            f"({_split(candidates[top])}), but the fit of one timed step of the profiling step puts it within "
            f"{tie:.0%} of the fastest: a difference the probe does not resolve, so the fewer micro-batches win")
        log.info("plan='auto': %s", notes[-1])
    return chosen, notes


def _predict(prof, cluster: ClusterSpec, batch: int, seq_len: int, a: int, m: int, calibration) -> float:
    """Predicted step time of ``a`` attention ranks and ``m`` micro-batches with ``calibration``."""
    per_rank = batch // a
    p_, c_ = calibration.apply(prof, cluster, calibration.microbatches_for(per_rank // m))
    try:
        return plan(p_, c_, batch, seq_len=seq_len, num_attention=a, num_microbatches=m,
                    microbatch_size=per_rank // m, pipeline_depth=1, schedule="gpipe", baseline=False).step_time
    except PlanError:
        return math.inf


def with_chunks(chosen: Plan, prof, cluster: ClusterSpec, batch: int, seq_len: int) -> Plan:
    """``chosen`` with its MoE layers' chunks solved (``plan(chunks=True)``: the fewest chunks
    within ``chunking.CHUNK_TIE``) on ``prof`` / ``cluster`` (calibrated, when the choice
    was), its split, micro-batches and shared-expert placement kept. The step 3 search
    prices unchunked candidates; this solves the winner's chunks (step 5 of the contract)."""
    a = len(chosen.attention_ranks)
    where = {0: "attention", 1: "expert"}.get(len(chosen.shared_expert_ranks), "replicated")
    try:
        solved = plan(prof, cluster, batch, seq_len=seq_len, num_attention=a, num_microbatches=chosen.num_microbatches,
                      microbatch_size=chosen.microbatch_size, pipeline_depth=1, schedule="gpipe", chunks=True,
                      shared_experts=where)
    except PlanError:
        return chosen
    keep = ("attention_ranks", "expert_ranks", "expert_placement", "num_microbatches", "shared_expert_ranks")
    if not solved.chunks or any(getattr(solved, k) != getattr(chosen, k) for k in keep):
        return chosen  # unchunked, or (another search's tie) not the chosen plan with chunks
    log.info("plan='auto': %s", next(n for n in solved.notes if n.startswith("dispatch -> experts")))
    return solved


def _split(plan: Plan) -> str:
    return f"{len(plan.attention_ranks)}A+{len(plan.expert_ranks)}E"


def auto_plan(captured, example_inputs: Mapping[str, torch.Tensor], cluster=None,
              num_microbatches: int | None = None, calibrate: bool | None = None) -> Plan:
    world = dist.get_world_size() if dist.is_initialized() else None
    if calibrate is None:
        calibrate = cluster is None and world is not None and world > 1
    if cluster is None:
        cluster = ClusterSpec.measure()
    elif isinstance(cluster, str):
        cluster = ClusterSpec.parse(cluster)
    if world is not None and cluster.world_size != world:
        raise ValueError(f"cluster {cluster.describe()} has {cluster.world_size} devices; the job has {world} ranks")
    batch, seq = example_inputs["input_ids"].shape
    prof = profile(captured, batch_size=1, seq_len=seq, dtype=_param_dtype(captured))
    best, _ = runnable_plan(prof, cluster, batch, seq, num_microbatches)
    priced = (prof, cluster)  # what the choice was priced with (calibrated below, when it is)
    if calibrate:
        from fxdisag.planner.calibrate import CalibrationError, probe

        if dist.is_initialized():  # the probe is collective: every rank probes rank 0's split
            box = [best.to_json()]
            dist.broadcast_object_list(box, src=0)
            best = Plan.from_json(box[0])
        try:
            cal = probe(captured, example_inputs, prof, cluster, best)
        except CalibrationError as exc:
            log.warning("plan='auto': no profiling step (%s); planning a priori from the profile's FLOPs", exc)
        else:
            a_priori = best
            best, _ = runnable_plan(prof, cluster, batch, seq, num_microbatches, calibration=cal)
            log.info("plan='auto': profiling step of %s in %.1f s: %s; a priori m=%d (%s), calibrated m=%d (%s)",
                     cal.plan, cal.seconds, cal.describe(), a_priori.num_microbatches,
                     _split(a_priori), best.num_microbatches, _split(best))
            priced = cal.apply(prof, cluster, cal.microbatches_for(best.microbatch_size))
    best = with_chunks(best, *priced, batch, seq)
    if dist.is_initialized():
        box = [best.to_json()]
        dist.broadcast_object_list(box, src=0)
        best = Plan.from_json(box[0])
    return best
