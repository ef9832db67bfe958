"""auto_plan: the planner's choice for the world this process runs in (``plan="auto"``).

Contract: ``auto_plan(captured, example_inputs, cluster=None)`` -- a collective on every
rank -- returns the same :class:`Plan` on every rank:

1. the cluster: ``cluster`` (a ClusterSpec or a string such as ``"2x1xh100"``), or
   ``ClusterSpec.measure()`` (online profiling of matmul rate and links) when None;
2. the profile of the captured model at the example's sequence length;
3. the fastest predicted plan among those the runtime executes as one call per step:
   ``attention ranks x micro-batches x micro-batch size == the example's batch`` and no
   gradient-accumulation rounds (the search is pinned to each such (A, m) and the best
   prediction wins), at pipeline depth 1 with the GPipe schedule: on the emulated
   cluster the runtime's 1F1B measures slower than the cost model predicts
   (benchmarks/RESULTS.md, "Schedules and pipeline depth"), and depth > 1 refuses tied
   embeddings, so "auto" keeps to what it measured best until the cost model is
   calibrated against those runs;
4. rank 0's plan is broadcast, so ranks whose measurements differ agree.

``num_microbatches`` pins m (the torch.compile option ``microbatches``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from fxdisag.planner.cluster import ClusterSpec
from fxdisag.planner.plan import Plan
from fxdisag.planner.profile import profile
from fxdisag.planner.search import PlanError, plan

__all__ = ["auto_plan", "runnable_plan"]


def _param_dtype(captured) -> torch.dtype:
    for p in captured.graph_module.parameters():
        return p.dtype
    return torch.float32


def runnable_plan(prof, cluster: ClusterSpec, batch: int, seq_len: int,
                  num_microbatches: int | None = None) -> tuple[Plan, list[str]]:
    """The fastest predicted plan the runtime runs in one call per step, and why others were not.

    Pins the search to every (attention ranks A, micro-batches m) with A x m x b == batch and
    keeps plans without gradient-accumulation rounds.
    """
    best: Plan | None = None
    notes: list[str] = []
    for a in range(1, cluster.world_size):
        if batch % a:
            notes.append(f"{a} attention ranks: the batch of {batch} does not split over them")
            continue
        per_rank = batch // a
        for m in (d for d in range(1, per_rank + 1) if per_rank % d == 0
                  and num_microbatches in (None, d)):
            try:
                candidate = plan(
                    prof, cluster, batch, seq_len=seq_len, num_attention=a, num_microbatches=m,
                    microbatch_size=per_rank // m, pipeline_depth=1, schedule="gpipe",
                )
            except PlanError as exc:
                notes.append(f"{a} attention ranks, m={m}: {str(exc).splitlines()[0]}")
                continue
            if candidate.grad_accumulation != 1:
                notes.append(f"{a} attention ranks, m={m}: {candidate.grad_accumulation} accumulation rounds")
                continue
            if best is None or candidate.step_time < best.step_time:
                best = candidate
    if best is None:
        raise PlanError(
            f"no runnable AF-pipe plan for a batch of {batch} sequences on {cluster.describe()}:\n  "
            + "\n  ".join(notes[:8])
        )
    return best, notes


def auto_plan(captured, example_inputs: Mapping[str, torch.Tensor], cluster=None,
              num_microbatches: int | None = None) -> Plan:
    world = dist.get_world_size() if dist.is_initialized() else None
    if cluster is None:
        cluster = ClusterSpec.measure()
    elif isinstance(cluster, str):
        cluster = ClusterSpec.parse(cluster)
    if world is not None and cluster.world_size != world:
        raise ValueError(f"cluster {cluster.describe()} has {cluster.world_size} devices; the job has {world} ranks")
    batch, seq = example_inputs["input_ids"].shape
    prof = profile(captured, batch_size=1, seq_len=seq, dtype=_param_dtype(captured))
    best, _ = runnable_plan(prof, cluster, batch, seq, num_microbatches)
    if dist.is_initialized():
        box = [best.to_json()]
        dist.broadcast_object_list(box, src=0)
        best = Plan.from_json(box[0])
    return best
