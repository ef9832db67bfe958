"""Expert load balancing by migration: re-place hot experts between training steps.

Contract::

    balancer = fxdisag.ExpertBalancer(dmodel, opt, every=10, threshold=1.15, horizon=100)
    for step in ...:
        out = dmodel(**batch); out.loss.backward(); opt.step(); opt.zero_grad()
        report = balancer.step()          # collective, every rank; moves experts when it pays

* Counting is the expert ranks' own: each expert call adds a bincount of its rows' local
  expert ids to a per-layer counter and times itself (``DisaggregatedModel
  .expert_token_counts`` / ``expert_seconds_per_pair``). Nothing is sent on the hot path.
* The attention ranks also keep each token's routed experts, for up to ``ROUTE_SAMPLE``
  tokens per layer (read back from the packed rows: a scatter per layer and micro-batch).
  A placement decides how many rows a token costs (one per (token, rank)), and this sample
  lets a move be priced with that in mind.
* Every ``every`` steps the ranks share their counts and samples (one
  ``all_gather_object``). The load of an expert rank in layer j is the number of (token,
  expert) pairs its experts computed there. The imbalance is ``sum_j max_r load_j(r)`` over
  ``sum_j mean_r load_j(r)``.
* Past ``threshold``, a best-improvement local search over pairwise swaps minimises the
  predicted step seconds of :class:`StepModel`. A swap is expert a on rank X <-> expert b on
  rank Y; every rank keeps its expert count, so the parameters keep their shapes. The step
  seconds are compute plus network:

  * compute is ``3 * seconds_per_pair * max_r pairs_j(r)``, the pair time measured by the
    expert calls (forward, with backward taken as 2x forward);
  * network is the rows each NIC sends, from the sampled routes.

  The search is deterministic and runs on every rank alike.
* The move must pay for itself over the next ``horizon`` steps, by that same model::

      saving = StepModel.seconds(before) - StepModel.seconds(after)      # per step
      cost   = bytes moved / bandwidth + 2 * latency * swaps
      move  iff saving * horizon > cost

  * ``bytes moved`` counts each swapped expert's rows of every MoE layer, in both
    directions: the weights and the optimizer state of the same shape (Adam's moments).
    Gradients are cleared between steps (``step`` checks) and do not move.
  * ``bandwidth`` and ``latency`` are the cluster's (``ClusterSpec``; measured when not given).
* A migration moves the rows with point-to-point messages between the two expert ranks of
  each swap, one swap at a time. Each rank then sorts its rows by global expert id, in
  place, in the weights and their optimizer state. Every rank then rebinds its routing to the new
  placement (``DisaggregatedModel.rebind_placement``).
* The parameter objects never change, so the user's optimizer keeps working, and training
  goes on with the same numerics: per expert, the same weights and the same state.
* Supported: AF-pipe plans at pipeline depth 1 with one replica per expert, stage programs
  not compiled. Anything else is refused at construction, by name.

``report`` (:class:`BalanceReport`) says what was measured and decided: imbalance before and
after, the swaps, predicted saving and cost, the seconds the migration took.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from fxdisag.runtime.dispatch import ROUTE_SAMPLE, tokens_reaching
from fxdisag.runtime.faults import wait_work

__all__ = ["BalanceReport", "ExpertBalancer", "StepModel", "balance_swaps", "objective"]


log = logging.getLogger("fxdisag")


@dataclass
class BalanceReport:
    step: int
    imbalance_before: float
    imbalance_after: float
    swaps: list[tuple[int, int, int, int]] = field(default_factory=list)  # (expert a, rank X, expert b, rank Y)
    saving_per_step_s: float = 0.0
    cost_s: float = 0.0
    moved: bool = False
    migration_s: float = 0.0
    moved_bytes: int = 0
    placement: list[list[int]] = field(default_factory=list)
    reason: str = "balanced enough"  # why not moved

    def __str__(self) -> str:
        what = (f"moved {len(self.swaps)} swap(s) {self.swaps} in {self.migration_s * 1e3:.1f} ms "
                f"({self.moved_bytes / 1e6:.2f} MB)") if self.moved else f"no move: {self.reason}"
        return (f"step {self.step}: imbalance {self.imbalance_before:.3f} -> {self.imbalance_after:.3f}; "
                f"predicted saving {self.saving_per_step_s * 1e3:.3f} ms/step, cost {self.cost_s * 1e3:.3f} ms; {what}")


def objective(load: Sequence[Sequence[int]], where: Sequence[int], ranks: Sequence[int]) -> tuple[int, float]:
    """(sum over layers of the busiest rank's load, sum of the mean loads) for ``load[j][e]``
    with expert e on rank ``where[e]``."""
    worst, mean = 0, 0.0
    for row in load:
        per = {r: 0 for r in ranks}
        for e, n in enumerate(row):
            per[where[e]] += n
        worst += max(per.values())
        mean += sum(per.values()) / len(ranks)
    return worst, mean


def balance_swaps(where: Sequence[int], cost: Callable[[list[int]], float],
                  max_swaps: int | None = None) -> tuple[list[int], list[tuple[int, int, int, int]]]:
    """Best-improvement local search over pairwise swaps of ``where`` (the rank of each
    expert) under ``cost``: (new owner per expert, the swaps in order). Deterministic:
    ties go to the lowest (a, b)."""
    where = list(where)
    swaps: list[tuple[int, int, int, int]] = []
    current = cost(where)
    E = len(where)
    while max_swaps is None or len(swaps) < max_swaps:
        best = None
        for a in range(E):
            for b in range(a + 1, E):
                if where[a] == where[b]:
                    continue
                where[a], where[b] = where[b], where[a]
                value = cost(where)
                where[a], where[b] = where[b], where[a]
                if value < current - 1e-12 * abs(current) and (best is None or value < best[0]):
                    best = (value, a, b)
        if best is None:
            break
        value, a, b = best
        swaps.append((a, where[a], b, where[b]))
        where[a], where[b] = where[b], where[a]
        current = value
    return where, swaps


@dataclass
class StepModel:
    """The balancer's estimate of a step's expert-side seconds under a placement ``where``.

    Per MoE layer j, per step::

        compute_j = 3 * seconds_per_pair * max_r pairs_j(r)          # forward + 2x backward
        rows_j(r) = tokens_j * P(a sampled token has an expert on r)  # one row per (token, rank)
        network_j = 2 * row_bytes * max(sum_r rows_j(r) / attention ranks, max_r rows_j(r)) / bandwidth

    (dispatch and its gradient leave the attention ranks, combine and its gradient the
    expert ranks; the busier side bounds the layer). Compute and transfer add: the
    estimate ignores their overlap, so it is an upper bound of what a move changes.
    """

    pairs: list[list[float]]  # [J][E] (token, expert) pairs per step
    routes: list[torch.Tensor]  # [J] sampled tokens' expert ids, [n, top_k]
    tokens: list[float]  # [J] tokens per step
    ranks: list[int]
    seconds_per_pair: float
    row_bytes: int
    bandwidth: float
    num_attention: int

    def seconds(self, where: Sequence[int]) -> float:
        owner = torch.tensor(list(where), dtype=torch.long)
        total = 0.0
        for j, row in enumerate(self.pairs):
            per = {r: 0.0 for r in self.ranks}
            for e, n in enumerate(row):
                per[where[e]] += n
            total += 3 * self.seconds_per_pair * max(per.values())
            sample = self.routes[j]
            if sample.numel() and self.bandwidth < float("inf"):
                scale = self.tokens[j] / sample.shape[0]
                to_rank = [n * scale for n in tokens_reaching(sample, owner, self.ranks)]
                busiest = max(sum(to_rank) / self.num_attention, max(to_rank))
                total += 2 * self.row_bytes * busiest / self.bandwidth
        return total


class ExpertBalancer:
    """Re-places experts between steps when the expert ranks' load is uneven (see the module docstring)."""

    def __init__(self, dmodel, optimizer: Any = None, *, every: int = 10, threshold: float = 1.15,
                 horizon: int = 100, cluster: Any = None, max_swaps: int | None = None):
        plan = dmodel.plan
        if plan.kind != "afpipe" or plan.pipeline_depth != 1:
            raise NotImplementedError(f"ExpertBalancer: plans of kind {plan.kind!r} at pipeline_depth="
                                      f"{plan.pipeline_depth} are not supported; it balances AF-pipe plans at depth 1")
        if any(len(r) != 1 for r in plan.expert_placement):
            raise NotImplementedError("ExpertBalancer: the plan replicates experts; it moves single-replica experts "
                                      "only (make the plan without replicas)")
        if plan.shared_expert_ranks:
            raise NotImplementedError(f"ExpertBalancer: the plan runs the shared experts on expert ranks "
                                      f"{plan.shared_expert_ranks}, whose compute the balancer does not price; "
                                      "keep them on the attention group (shared_expert_ranks=[]) to balance")
        if dmodel.compile_stages:
            raise NotImplementedError("ExpertBalancer: compile_stages=True compiled the stage programs with the "
                                      "old routing; build without compile_stages to balance")
        if every < 1 or horizon < 1 or threshold < 1.0:
            raise ValueError(f"every={every}, horizon={horizon} must be >= 1 and threshold={threshold} >= 1.0")
        self.dmodel = dmodel
        self.optimizers = [] if optimizer is None else (list(optimizer) if isinstance(optimizer, (list, tuple))
                                                         else [optimizer])
        self.every, self.threshold, self.horizon, self.max_swaps = every, threshold, horizon, max_swaps
        if cluster is None:
            from fxdisag.planner.cluster import ClusterSpec

            cluster = ClusterSpec.measure(repeats=3)  # collective: every rank constructs the balancer
        self.bandwidth, self.latency = cluster.nic_bandwidth, cluster.inter_node_latency
        self.steps = 0
        self.reports: list[BalanceReport] = []
        dmodel.sample_routes(ROUTE_SAMPLE)

    # ---- the decision
    def _gather(self) -> tuple[list[list[int]], list[torch.Tensor], float]:
        """(pairs per layer and expert over the window, sampled routes per layer, s/pair)."""
        d = self.dmodel
        mine = (d.expert_token_counts(), d.expert_seconds_per_pair(), d.routes_sample())
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine, group=d._world)
        E = len(d.plan.expert_placement)
        layers = sorted({j for counts, _, _ in every for j in counts})
        load = [[0] * E for _ in layers]
        for counts, _, _ in every:
            for row, j in zip(load, layers):
                for e, n in counts.get(j, {}).items():
                    row[e] += n
        routes = [torch.cat([r[j] for _, _, r in every if j in r] or [torch.zeros(0, 1, dtype=torch.long)])
                  for j in layers]
        rates = [s for _, s, _ in every if s is not None]
        return load, routes, (sum(rates) / len(rates) if rates else 0.0)

    def _state_tensors(self, p: torch.Tensor) -> list[torch.Tensor]:
        """What moves with a parameter's rows: the parameter and its optimizer state of the same shape."""
        out = [p.data]
        for o in self.optimizers:
            for key in sorted(o.state.get(p, {})):
                t = o.state[p][key]
                if torch.is_tensor(t) and t.shape == p.shape:
                    out.append(t)
        return out  # gradients are cleared between steps (checked): they do not move

    def _row_bytes(self) -> int:
        """Bytes of one expert's rows over every MoE layer (weights, state, grads): from the
        rank's own tensors, shared so every rank prices a move alike."""
        d = self.dmodel
        mine = 0
        if d.has_experts:
            for p in d.expert_parameters():
                mine += sum(t[0].numel() * t.element_size() for t in self._state_tensors(p))
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine, group=d._world)
        return max(every)

    def step(self) -> BalanceReport | None:
        """Call after every optimizer step, on every rank. Returns a report on a decision step."""
        self.steps += 1
        if self.steps % self.every:
            return None
        d = self.dmodel
        self._check_grads_cleared()
        load, routes, per_pair = self._gather()
        ranks = list(d.plan.expert_ranks)
        where = [r[0] for r in d.plan.expert_placement]
        worst, mean = objective(load, where, ranks)
        report = BalanceReport(self.steps, worst / mean if mean else 1.0, worst / mean if mean else 1.0,
                               placement=[list(r) for r in d.plan.expert_placement])
        if mean and report.imbalance_before > self.threshold:
            top_k = max(d.layout.moe[j].top_k for j in range(len(d.layout.moe)))
            model = StepModel(
                pairs=[[n / self.every for n in row] for row in load], routes=routes,
                tokens=[sum(row) / self.every / top_k for row in load], ranks=ranks, seconds_per_pair=per_pair,
                row_bytes=d.layout.hidden_size * self._element_size(), bandwidth=self.bandwidth,
                num_attention=len(d.plan.attention_ranks))
            new_where, swaps = balance_swaps(where, model.seconds, self.max_swaps)
            report.reason = "it would not pay for itself" if swaps else "no swap lowers the predicted step time"
            report.imbalance_after = objective(load, new_where, ranks)[0] / mean
            report.swaps = swaps
            report.saving_per_step_s = model.seconds(where) - model.seconds(new_where)
            report.moved_bytes = 2 * len(swaps) * self._row_bytes()
            report.cost_s = (report.moved_bytes / 2) / self.bandwidth + 2 * self.latency * len(swaps) \
                if swaps else 0.0  # the two directions of a swap share a full-duplex link
            if swaps and report.saving_per_step_s * self.horizon > report.cost_s:
                t0 = time.perf_counter()
                self._migrate(new_where, swaps)
                took: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(took, time.perf_counter() - t0, group=d._world)
                report.migration_s = max(took)  # the slowest rank's: the ranks of a swap, not rank 0
                report.moved = True
                report.placement = [list(r) for r in d.plan.expert_placement]
        d.reset_expert_counters()
        self.reports.append(report)
        if d.rank == 0:
            log.info("fxdisag balance: %s", report)
        return report

    def _element_size(self) -> int:
        first = self.dmodel._model.get_submodule(self.dmodel.layout.moe[0].experts)
        return next(first.parameters()).element_size()

    # ---- the move
    def _check_grads_cleared(self) -> None:
        for p in self.dmodel.expert_parameters():
            if p.grad is not None and bool(p.grad.any()):
                raise RuntimeError("ExpertBalancer.step() found expert gradients that are not cleared: call it after "
                                   "optimizer.step() and optimizer.zero_grad(), so no gradient is moved half-way")

    def _migrate(self, new_where: list[int], swaps: list[tuple[int, int, int, int]]) -> None:
        d = self.dmodel
        rank = d.rank
        if d.has_experts:
            # One swap at a time: a later swap may move an expert an earlier one brought in.
            for a, x, b, y in swaps:
                if rank not in (x, y):
                    continue
                give, take, peer = (a, b, y) if rank == x else (b, a, x)
                ops, landing = [], []
                for mod in d.local_experts:
                    ids = list(mod.fxdisag_expert_ids)
                    row = ids.index(give)
                    for p in mod.parameters(recurse=False):
                        for t in self._state_tensors(p):
                            out = t[row].detach().clone()
                            into = torch.empty_like(out)
                            ops += [dist.P2POp(dist.irecv, into, peer, d._world),
                                    dist.P2POp(dist.isend, out, peer, d._world)]
                            landing.append((t, row, into))
                    ids[row] = take
                    mod.fxdisag_expert_ids = tuple(ids)
                for w in dist.batch_isend_irecv(ops):
                    wait_work(w, rank, [peer], f"expert migration: the rows of expert {take} did not arrive", d.timeout)
                with torch.no_grad():
                    for t, row, into in landing:
                        t[row].copy_(into)
            # Rows ascending by global id again (the routing tables' local ids assume it).
            for mod in d.local_experts:
                ids = list(mod.fxdisag_expert_ids)
                order = sorted(range(len(ids)), key=ids.__getitem__)
                if order != list(range(len(ids))):
                    perm = torch.tensor(order, dtype=torch.long)
                    with torch.no_grad():
                        for p in mod.parameters(recurse=False):
                            for t in self._state_tensors(p):
                                t.copy_(t[perm])
                    mod.fxdisag_expert_ids = tuple(ids[i] for i in order)
        placement = [[r] for r in new_where]
        d.rebind_placement(dataclasses.replace(d.plan, expert_placement=placement, expert_owners={}))
