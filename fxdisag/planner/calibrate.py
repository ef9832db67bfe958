"""calibrate: the cost model's compute terms fitted to a real profiling step, on the ranks that run it.

Contract
--------
``probe(captured, batch, prof, cluster, plan) -> Calibration`` is a collective on every rank
of the job. It runs ``plan``'s split (its attention ranks, expert ranks and placement) as
real disaggregated steps on ``batch``, with the runtime's timeline on, at three
micro-batch counts: 1, the most the batch allows on an attention rank (at most
``max_microbatches``) and one between (``steps`` timed steps each, after a warm-up). Per
rank and probe it reads the rank's compute spans::

    compute = sum of the rank's F, B (attention ranks) or EF, EB (expert ranks) spans
            = n * overhead + k * W

``n``: the rank's compute actions. ``W``: what the cost model itself charges for them at
the cluster's FLOP rate, with the memory-bandwidth term and the per-action overhead off:
the attention-side regions at the probe's micro-batch size
(``cost_afpipe.attention_times``), or the (token, expert) pairs the expert rank counted
(``DisaggregatedModel.expert_token_counts``) through ``cost_afpipe.expert_time``. The
probes hold the same tokens, so W is the same in each and a least-squares line in ``n``
gives both unknowns (neither negative: see :func:`fit_side`). Each side takes the median
over its ranks. Compute spans are what the cost model's COMPUTE_ACTION stands for; the
runtime's Python between actions (posting, unpacking) is left to the transfer terms,
whose bandwidth ``ClusterSpec.measure()`` read through the same gloo. One probe only (one
sequence per attention rank) keeps the measured proxy as the overhead. Each point also
records the rank's busy time (its serial spans' extent less its waits), for reports, and
each timed step's compute: :meth:`Calibration.resamples` fits each step alone, so the planner
can tell a choice the probe resolves from one inside its noise (``auto.runnable_plan``).

The probe also measures the routing on the probed placement (:class:`MeasuredRouting`):
a token's message rows (distinct expert ranks) from the attention ranks' sampled top_k ids
in the warm-up step, and the busiest expert rank's (token, expert) pairs, each against what
uniform routing gives there (``placement.expected_rows_per_token``; E/F pairs per expert).

``Calibration.apply(prof, cluster) -> (prof', cluster')``: attention-side region FLOPs x
``k_attention``, expert FLOPs per row x ``k_experts`` x the busiest rank's measured / uniform
pairs, every message's bytes per row x measured / uniform rows per token (ratios measured
on the probed placement, applied to every placement the search tries); the cluster with unlimited memory
bandwidth (the fit holds the memory time), ``action_overhead`` = the attention side's,
``expert_action_overhead`` = the expert side's. Planning with ``(prof', cluster')``
predicts in the seconds the probes measured; the links stay as measured.

The probe leaves the model as it found it: every parameter's ``.grad`` and the RNG states
are restored, the probes' expert slices are dropped (the process groups each probe's build
made stay until the job ends: ``new_group`` is collective, destroying them would be too). A meta-device model or a batch
without ``labels`` cannot run a step: :func:`probe` raises :class:`CalibrationError`
saying so (``auto_plan`` then plans a priori, and logs why).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fxdisag.planner.cluster import ClusterSpec
from fxdisag.planner.plan import Plan
from fxdisag.runtime.dispatch import ROUTE_SAMPLE, tokens_reaching

__all__ = ["Calibration", "CalibrationError", "MeasuredRouting", "SideFit", "probe", "fit_side"]

log = logging.getLogger("fxdisag.calibrate")


class CalibrationError(RuntimeError):
    """A profiling step cannot run or gives no usable fit; the message says why."""


@dataclass(frozen=True)
class SideFit:
    """``compute = n * overhead + k * W`` for one side (seconds), with the points it came from:
    per rank, per probe, (n, W, compute seconds, busy seconds, each timed step's compute
    seconds): the compute is the median of those steps."""

    overhead: float
    k: float
    points: dict[int, list[tuple]] = field(default_factory=dict)

    @property
    def timed_steps(self) -> int:
        """How many timed steps every point holds one by one (its 5th field), 0 if not."""
        counts = {len(p[4]) if len(p) > 4 else 0 for pts in self.points.values() for p in pts}
        return min(counts) if counts else 0

    def resample(self, step: int) -> "SideFit":
        """The fit of the ``step``-th timed step of every probe alone (compute = that step's
        seconds): how far one step's noise moves the fit."""
        one = {r: [(p[0], p[1], p[4][step], p[3], p[4]) for p in pts] for r, pts in self.points.items()}
        return fit_side(one, self.overhead)

    def describe(self, name: str) -> str:
        return f"{name}: {self.overhead * 1e3:.3g} ms per action + {self.k:.3g} x the model's compute"

    def local(self, microbatches: tuple[int, ...], m: float) -> tuple[float, float]:
        """(overhead, k) of the line through the two probes around ``m`` micro-batches (the
        nearest two outside the probed range), median over ranks: exact at every probe, so a
        compute time that is not linear in the action count (small matmuls run slower per
        FLOP) is followed between probes. One probe: the fit itself."""
        if len(microbatches) < 2:
            return self.overhead, self.k
        i = max(0, min(len(microbatches) - 2, sum(q <= m for q in microbatches) - 1))
        overheads, ks = [], []
        for pts in self.points.values():
            try:
                line = fit_side({0: [pts[i], pts[i + 1]]}, self.overhead)
            except CalibrationError:  # a segment that noise made steeper than the whole time: the global fit
                line = self
            overheads.append(line.overhead)
            ks.append(line.k)
        return statistics.median(overheads), statistics.median(ks)


@dataclass(frozen=True)
class MeasuredRouting:
    """What the probe's routing measured against the uniform routing the cost model assumes,
    on the probed placement: message rows a token sends (its distinct expert ranks, from
    the attention ranks' sampled top_k ids), and the busiest expert rank's (token, expert)
    pairs (counted on the expert ranks) over what uniform routing gives it."""

    rows_per_token: float
    modelled_rows_per_token: float
    busiest_pairs: float
    modelled_busiest_pairs: float

    @property
    def rows_scale(self) -> float:
        return self.rows_per_token / self.modelled_rows_per_token

    @property
    def load_scale(self) -> float:
        return self.busiest_pairs / self.modelled_busiest_pairs


@dataclass(frozen=True)
class Calibration:
    attention: SideFit
    experts: SideFit
    microbatches: tuple[int, ...]  # the probes' m
    plan: str  # the probed split, e.g. "1A+1E"
    seconds: float  # wall time the probes took
    routing: MeasuredRouting | None = None
    seqs_per_rank: int = 1  # the probes' sequences per attention rank

    def microbatches_for(self, microbatch_size: float) -> float:
        """The probes' m that a micro-batch of ``microbatch_size`` sequences corresponds to."""
        return self.seqs_per_rank / microbatch_size

    def apply(self, prof, cluster: ClusterSpec, microbatches: float | None = None):
        """(profile, cluster) that predict in the probes' measured seconds (module docstring):
        the least-squares fit of every probe, or with ``microbatches`` (the plan's m, at the
        probed sequences per attention rank: ``seqs_per_rank / micro-batch size``) the line
        through the probes around it (:meth:`SideFit.local`)."""
        (oa, ka), (oe, ke) = ((self.attention.overhead, self.attention.k), (self.experts.overhead, self.experts.k))
        if microbatches is not None:
            (oa, ka), (oe, ke) = self.attention.local(self.microbatches, microbatches), \
                self.experts.local(self.microbatches, microbatches)
        rows = load = 1.0
        if self.routing is not None:
            rows, load = self.routing.rows_scale, self.routing.load_scale

        def scale(r):
            return dataclasses.replace(r, fwd_flops=r.fwd_flops.scale(ka), bwd_flops=r.bwd_flops.scale(ka))

        # The measured routing, as ratios to the uniform model on the probed placement: the
        # busiest expert rank's pairs scale its compute, a token's rows every message's bytes.
        moe = [dataclasses.replace(
            m, fwd_flops_per_row=m.fwd_flops_per_row * ke * load,
            dispatch_bytes_per_row=m.dispatch_bytes_per_row * rows, combine_bytes_per_row=m.combine_bytes_per_row * rows,
            combine_grad_bytes_per_row=m.combine_grad_bytes_per_row * rows,
            dispatch_grad_bytes_per_row=m.dispatch_grad_bytes_per_row * rows,
            # the shared experts move work the probes did not measure at this size: each
            # side's fit over every probe prices it (a local line extrapolates poorly)
            shared_k_attention=m.shared_k_attention * self.attention.k,
            shared_k_experts=m.shared_k_experts * self.experts.k) for m in prof.moe]
        scaled = dataclasses.replace(prof, regions=[scale(r) for r in prof.regions], moe=moe)
        tuned = cluster.replace(
            memory_bandwidth=math.inf, action_overhead=oa, expert_action_overhead=oe,
            notes=list(cluster.notes) + [f"calibrated by a profiling step of {self.plan} at m in "
                                         f"{list(self.microbatches)}: {self.describe()}"],
        )
        return scaled, tuned

    def resamples(self) -> list["Calibration"]:
        """One calibration per timed step (:meth:`SideFit.resample` on both sides): the fits
        the planner's choice must hold against to be one the probe resolves
        (``auto.runnable_plan``). Empty when the points keep no per-step times."""
        out = []
        for s in range(min(self.attention.timed_steps, self.experts.timed_steps)):
            try:
                out.append(dataclasses.replace(self, attention=self.attention.resample(s),
                                               experts=self.experts.resample(s)))
            except CalibrationError:  # that step alone fits no compute time: it says nothing
                continue
        return out

    def describe(self) -> str:
        text = f"{self.attention.describe('attention')}; {self.experts.describe('experts')}"
        if self.routing is not None:
            r = self.routing
            text += (f"; routing: {r.rows_per_token:.3g} rows per token (uniform: {r.modelled_rows_per_token:.3g}), "
                     f"busiest expert rank x{r.load_scale:.3g} of uniform")
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fit_side(points: Mapping[int, list[tuple]], fallback_overhead: float) -> SideFit:
    """Median over ranks of each rank's least-squares fit ``y = n * overhead + k * W`` through
    its probes' (n, W, y, ...) points, with overhead >= 0 and k >= 0 (a negative one is
    noise, or stages so small that the overhead is all their time: that term is dropped and
    the other refitted).

    A rank's probes hold the same tokens, so ``W`` is the same in each (up to the routing of
    the experts' rows): the fit is a line in ``n`` whose intercept is ``k * W``.

    >>> f = fit_side({0: [(6, 0.1, 0.112), (24, 0.1, 0.148), (96, 0.1, 0.292)]}, 0.0)   # 2 ms per action, k = 1
    >>> round(f.overhead, 6), round(f.k, 6)
    (0.002, 1.0)
    """
    overheads, ks = [], []
    for rank, pts in sorted(points.items()):
        ns = [float(p[0]) for p in pts]
        ws = [float(p[1]) for p in pts]
        ys = [float(p[2]) for p in pts]
        w = statistics.fmean(ws)
        if len(set(ns)) >= 2:
            n_bar, y_bar = statistics.fmean(ns), statistics.fmean(ys)
            a = sum((n - n_bar) * (y - y_bar) for n, y in zip(ns, ys)) / sum((n - n_bar) ** 2 for n in ns)
            k = statistics.fmean(y - n * a for n, y in zip(ns, ys)) / w
            if a < 0:  # more actions took less time: noise; no overhead
                a, k = 0.0, statistics.fmean(ys) / w
            elif k < 0:  # the overhead is the whole time (tiny stages): no FLOP term
                a, k = sum(n * y for n, y in zip(ns, ys)) / sum(n * n for n in ns), 0.0
        else:
            a = fallback_overhead
            k = statistics.fmean(y - n * a for n, y in zip(ns, ys)) / w
        overheads.append(a)
        ks.append(k)
    if not ks:
        raise CalibrationError("no rank of this side ran a compute action in the profiling step")
    k, overhead = statistics.median(ks), statistics.median(overheads)
    if not (k > 0 or overhead > 0):
        raise CalibrationError(f"the profiling step's fit gives no compute time (points {dict(points)})")
    return SideFit(overhead, k, {r: list(p) for r, p in points.items()})


def _rows_per_token(routes: Mapping[int, torch.Tensor], owner: tuple[int, ...]) -> tuple[int, int] | None:
    """(sum over sampled tokens of their distinct destination ranks, tokens) of one attention rank."""
    table = torch.tensor(owner)
    ranks = sorted(set(owner))
    total = sum(sum(tokens_reaching(ids, table, ranks)) for ids in routes.values())
    count = sum(ids.shape[0] for ids in routes.values())
    return (total, count) if count else None


def _routing(prof, plan: Plan, rows: list[tuple[int, int]], pairs: Mapping[int, float]) -> MeasuredRouting | None:
    """Measured routing against the uniform model, on ``plan``'s placement (no replicas:
    uniform routing gives an expert rank holding g of the E experts g / E of all pairs)."""
    from fxdisag.planner.placement import expected_rows_per_token

    if not rows or not pairs or any(len(e) > 1 for e in plan.expert_placement):
        return None
    E, K = prof.moe[0].num_experts, prof.moe[0].top_k
    held = {r: sum(r in e for e in plan.expert_placement) for r in plan.expert_ranks}
    modelled_rows = statistics.fmean(
        expected_rows_per_token(E, K, [sum(1 for o in plan.expert_owner(a) if o == r) for r in plan.expert_ranks])
        for a in plan.attention_ranks)
    return MeasuredRouting(
        rows_per_token=sum(t for t, _ in rows) / sum(n for _, n in rows), modelled_rows_per_token=modelled_rows,
        busiest_pairs=max(pairs.values()), modelled_busiest_pairs=sum(pairs.values()) * max(held.values()) / E,
    )


def _probe_microbatches(per_rank: int, max_microbatches: int) -> tuple[int, ...]:
    """1, the largest divisor of ``per_rank`` up to ``max_microbatches``, and the divisor
    nearest their geometric mean (the planner's choices lie between)."""
    divisors = [d for d in range(1, min(per_rank, max_microbatches) + 1) if per_rank % d == 0]
    top = divisors[-1]
    mid = min(divisors, key=lambda d: abs(math.log(d) - math.log(top) / 2))
    return tuple(sorted({1, mid, top}))


def _serial_busy(spans, rank: int) -> tuple[float, float, int, int]:
    """(compute seconds, busy seconds, attention compute actions, expert compute actions) of ``rank``."""
    mine = [s for s in spans if s.rank == rank and s.kind != "send"]
    if not mine:
        return 0.0, 0.0, 0, 0
    wall = max(s.end for s in mine) - min(s.start for s in mine)
    idle = sum(s.end - s.start for s in mine if s.kind in ("recv-wait", "reduce"))
    compute = sum(s.end - s.start for s in mine if s.kind == "compute")
    kinds = [s.action.kind.value for s in mine if s.kind == "compute"]
    return compute, wall - idle, sum(k in ("F", "B") for k in kinds), sum(k in ("EF", "EB") for k in kinds)


def probe(captured, batch: Mapping[str, torch.Tensor], prof, cluster: ClusterSpec, plan: Plan, *,
          steps: int = 3, max_microbatches: int = 16, timeout: float | None = None) -> Calibration:
    """Run ``plan``'s split as real steps and fit the compute terms (module docstring). Collective."""
    from fxdisag.api import DEFAULT_TIMEOUT, build
    from fxdisag.weights import is_meta_model
    from fxdisag.planner.cost_afpipe import attention_busy, attention_times, expert_time
    from fxdisag.planner.workload import Workload

    model = captured.model
    if is_meta_model(model):
        raise CalibrationError("the model is on the meta device: a profiling step needs its weights")
    if "labels" not in batch:
        raise CalibrationError("the example batch has no 'labels': a profiling step needs a loss to run backward")
    num_batch, seq = batch["input_ids"].shape
    if num_batch % len(plan.attention_ranks):
        raise CalibrationError(f"the batch of {num_batch} does not split over {len(plan.attention_ranks)} attention ranks")
    if plan.kind != "afpipe" or plan.pipeline_depth != 1:
        raise CalibrationError(f"probe: a depth-1 AF-pipe plan is needed, got {plan.kind} at depth {plan.pipeline_depth}")
    if not dist.is_initialized():
        raise CalibrationError("a profiling step runs the disaggregated model: initialise torch.distributed first")
    t0 = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    A = len(plan.attention_ranks)
    per_rank = num_batch // A
    ms = _probe_microbatches(per_rank, max_microbatches)
    work = Workload.from_profile(prof, seq)
    flat = cluster.replace(memory_bandwidth=math.inf, action_overhead=0.0, expert_action_overhead=0.0)
    saved_grads = [(p, p.grad) for p in model.parameters()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    mine: dict[str, list[tuple]] = {"attention": [], "experts": []}
    routes: dict[int, torch.Tensor] = {}
    pairs_here = None
    try:
        for m in ms:
            # unchunked, shared experts on the attention group: what the fitted model prices
            p = dataclasses.replace(plan, num_microbatches=m, microbatch_size=per_rank // m, grad_accumulation=1,
                                    schedule_kind="gpipe", in_flight=None, chunks=[], shared_expert_ranks=[])
            dm = build(captured, batch, p, sync_params=False, trace=True, release_unused=False,
                       timeout=timeout or DEFAULT_TIMEOUT)
            busy: list[tuple[float, float, int, int]] = []
            dm.sample_routes(ROUTE_SAMPLE if m == ms[0] else 0)  # the warm-up step only: it costs a scatter
            for step in range(steps + 1):
                if step == 1:
                    if m == ms[0]:
                        routes = dm.routes_sample()
                    dm.reset_expert_counters()
                    dm.sample_routes(0)
                dm(**batch).loss.backward()
                for q in model.parameters():
                    q.grad = None
                if step:
                    busy.append(_serial_busy(dm.step_spans(), rank))
            y = statistics.median(b[0] for b in busy)
            y_busy = statistics.median(b[1] for b in busy)
            ys = tuple(b[0] for b in busy)
            *_, n_att, n_exp = busy[-1]
            if rank in plan.attention_ranks:
                t = attention_times(work, flat, per_rank // m, recompute=p.recompute.get("attention", False))
                w = attention_busy(t, work.num_moe_layers, m)
                mine["attention"].append((n_att, w, y, y_busy, ys))
            else:
                pairs = sum(sum(c.values()) for c in dm.expert_token_counts().values()) / steps
                n_held = len(dm.expert_ids)
                w = (expert_time(work, flat, pairs, n_held, False)
                     + expert_time(work, flat, pairs, n_held, True, recompute=p.recompute.get("experts", False)))
                mine["experts"].append((n_exp, w, y, y_busy, ys))
                if m == ms[0]:
                    pairs_here = pairs
            log.info("profiling step of %dA+%dE at m=%d: %.1f ms of compute on rank %d", A, len(plan.expert_ranks), m,
                     y * 1e3, rank)
            del dm
    finally:
        for q, g in saved_grads:
            q.grad = g
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    rows = _rows_per_token(routes, plan.expert_owner(rank)) if rank in plan.attention_ranks else None
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (rank, mine, rows, pairs_here))
    routing = _routing(prof, plan, [g[2] for g in gathered if g[2] is not None],
                       {g[0]: g[3] for g in gathered if g[3] is not None})
    sides = {"attention": {}, "experts": {}}
    for r, pts, *_ in gathered:
        for side, points in pts.items():
            if points:
                sides[side][r] = points
    cal = Calibration(
        attention=fit_side(sides["attention"], cluster.action_overhead),
        experts=fit_side(sides["experts"], cluster.expert_overhead),
        microbatches=ms, plan=f"{A}A+{len(plan.expert_ranks)}E", seconds=time.perf_counter() - t0, routing=routing,
        seqs_per_rank=per_rank,
    )
    # Every rank fitted the same gathered points; rank 0's copy makes it exact across ranks.
    box = [cal]
    dist.broadcast_object_list(box, src=0)
    return box[0]
