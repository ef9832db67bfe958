"""Plan: which ranks run attention, which run which experts, and how many micro-batches.

Contract
--------
A :class:`Plan` is plain data (it round-trips through ``to_json``/``from_json``) in two
parts. The *binding* part (:data:`BINDING_FIELDS`) is what the runtime does: it honours
every binding field or refuses the plan with an error naming the field. The *advisory*
part is what the planner predicted and why (times, memory, utilisation, NIC split,
notes); the runtime never reads it. ``to_json`` writes the two parts as
``{"binding": ..., "advisory": ...}``.

Binding fields:

* ``kind`` -- ``"afpipe"`` (disjoint attention and expert groups) or ``"ep"`` (expert
  parallelism: every rank in both groups; :meth:`Plan.expert_parallel`);
* ``attention_ranks`` / ``expert_ranks`` -- lists of global ranks (disjoint for afpipe);
* ``expert_placement[e]`` -- the expert ranks holding a replica of expert ``e`` (the same
  for every MoE layer of an expert group);
* ``pipeline_depth`` p -- the attention ranks and the expert ranks are each cut into p
  equal groups, in list order (attention group g = ``attention_ranks[g*a:(g+1)*a]``,
  a = len / p; the same for expert groups), and the MoE layers are dealt over the groups
  (:meth:`Plan.stages`). A rank's *slot* is its position in its sorted group; slot t of
  every attention group handles the same share of the batch. p > 1 needs kind
  ``"afpipe"``, no ``expert_owners`` or ``routing_domains``, and the same placement in
  every expert group (expert e on the same slots, in the same order);
* ``layer_assignment`` -- how layers are dealt for p > 1: ``"round_robin"`` (layer j on
  group j mod p) or ``"contiguous"`` (p blocks of consecutive layers);
* ``loss_group`` -- the attention group running the final norm, head and loss (None:
  where the next layer would go, ``Stages.dealt``'s default);
* ``stage_costs`` -- p > 1: the unit durations the ring schedule's order assumes
  (``fxdisag.schedule.stage_costs`` keys ``F B EF EB`` and optionally ``F0 B0 FJ BJ``;
  the search writes its predicted stage times); empty: forward 1, backward 2;
* ``expert_owner(rank, layer_group)[e]`` -- the expert rank that attention rank ``rank``
  sends expert ``e``'s rows to in the layers of expert group ``layer_group`` (the
  runtime's routing table; one rank per (attention rank, expert)). Searched plans store
  it (``expert_owners``); otherwise the t-th attention rank of a routing domain
  (``routing_domains``, default: all ranks) uses replica t mod q of the domain's q
  replicas of ``e`` (p > 1: slot t of any attention group, inside expert group
  ``layer_group``);
* ``num_microbatches`` m and ``microbatch_size`` (sequences per micro-batch per attention
  rank; None: whatever the batch gives, ``batch / (attention ranks of one group x m)``);
* ``schedule_kind`` -- the schedule the runtime builds: ``"gpipe"`` (all forwards, then
  all backwards) or ``"1f1b"`` (at most ``in_flight`` micro-batches in flight, backward
  work first; AF-pipe plans only); expert-parallel plans: ``"gpipe"`` (all-to-all on the
  critical path) or ``"overlap"`` (two micro-batches in flight, each one's all-to-all
  behind the other's compute: ``ep_schedule(overlap=True)``);
* ``recompute`` -- activation recomputation per group (``{"attention": bool,
  "experts": bool}``);
* ``num_moe_layers`` -- when set, must match the model;
* ``chunks`` -- per MoE layer ``[forward, backward]``: its dispatch -> expert compute ->
  combine runs as that many chunks in each pass (``fxdisag.schedule.chunk_schedule``;
  empty: every layer unchunked; depth-1 plans only);
* ``shared_expert_ranks`` -- the expert ranks that run a model's shared experts, as one
  more expert every token selects (its gate the weight; ``codegen/insert_dispatch.py``):
  empty, none (they run in the attention stages, beside the dispatch); one rank, that
  rank, for every token (one more row to it for a token that does not reach it already);
  every expert rank, a copy on each, a token's on the rank of its first routed expert
  (no extra row; their gradients summed over the expert ranks). AF-pipe plans of depth 1.

``grad_accumulation`` (rounds of m micro-batches per optimizer step) binds the training
loop, which calls forward/backward that many times per optimizer step; the runtime does
not see optimizer steps.

and, when made by the search (``fxdisag.planner.plan``), the predicted times
(AF-pipe step; the Megatron-LM PP x EP x DP baseline's step with the all-to-all exposed
and overlapped, each with its configuration in ``baseline``; speedups), per-group
utilisation, memory per device and the formula evaluations behind them
(``explain()``). ``Plan.manual`` builds one by hand, with no predictions.
``schedule()`` gives the runtime's action lists (``af_pipe_schedule`` at p = 1,
``ring_schedule`` over ``stages()`` for p > 1).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fxdisag.planner.formulas import explain as _explain
from fxdisag.planner.placement import expert_owners

if TYPE_CHECKING:  # fxdisag.schedule is imported where used (it is the heavier side)
    from fxdisag.schedule import Stages

__all__ = ["BINDING_FIELDS", "LAYER_ASSIGNMENTS", "PLAN_KINDS", "Plan", "SCHEDULE_KINDS", "contiguous_placement"]

PLAN_KINDS = ("afpipe", "ep")
SCHEDULE_KINDS = ("gpipe", "1f1b")  # what the runtime builds (AF-pipe plans)
EP_SCHEDULE_KINDS = ("gpipe", "overlap")  # expert-parallel plans: exposed or overlapped all-to-all
RECOMPUTE_GROUPS = ("attention", "experts")
LAYER_ASSIGNMENTS = ("round_robin", "contiguous")  # how MoE layers are dealt over p > 1 groups
BINDING_FIELDS = (
    "kind", "attention_ranks", "expert_ranks", "expert_placement", "routing_domains", "expert_owners",
    "num_microbatches", "microbatch_size", "grad_accumulation", "schedule_kind", "in_flight", "recompute",
    "num_moe_layers", "pipeline_depth", "layer_assignment", "loss_group", "stage_costs", "chunks",
    "shared_expert_ranks",
)


# Notes that record a choice the search made after pricing its candidates (explain() leads with them).
DECISION_NOTES = ("shared experts:", "dispatch -> experts -> combine")


def _even_blocks(total: int, parts: int) -> list[range]:
    """``total`` items in ``parts`` contiguous blocks whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    blocks, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        blocks.append(range(start, start + size))
        start += size
    return blocks


def contiguous_placement(num_experts: int, expert_ranks: list[int]) -> list[list[int]]:
    """Experts over expert ranks in contiguous blocks, as evenly as possible.

    F <= E: rank j holds a contiguous block of experts (block sizes differ by <= 1).
    F > E: expert e is replicated on a contiguous block of ranks (sizes differ by <= 1).
    """
    F = len(expert_ranks)
    if num_experts < 1 or F < 1:
        raise ValueError(f"need >= 1 expert and >= 1 expert rank, got {num_experts} experts, {F} ranks")
    placement: list[list[int]] = [[] for _ in range(num_experts)]
    if F <= num_experts:
        for j, block in enumerate(_even_blocks(num_experts, F)):
            for e in block:
                placement[e].append(expert_ranks[j])
    else:
        for e, block in enumerate(_even_blocks(F, num_experts)):
            placement[e] = [expert_ranks[j] for j in block]
    return placement


@dataclass
class Plan:
    attention_ranks: list[int]
    expert_ranks: list[int]
    expert_placement: list[list[int]]
    num_microbatches: int
    microbatch_size: int | None = None
    grad_accumulation: int = 1
    kind: str = "afpipe"
    schedule_kind: str = "gpipe"
    in_flight: int | None = None  # 1f1b: micro-batches in flight (None: 2, the ring depth)
    num_moe_layers: int | None = None
    pipeline_depth: int = 1  # p attention groups and p expert groups, layers dealt over them
    layer_assignment: str = "round_robin"  # p > 1: "round_robin" | "contiguous"
    loss_group: int | None = None  # attention group of the final norm/head/loss (None: Stages.dealt's default)
    stage_costs: dict[str, float] = field(default_factory=dict)  # p > 1: unit durations ring_schedule orders by
    chunks: list[list[int]] = field(default_factory=list)  # per MoE layer [forward, backward] chunks; empty: 1
    shared_expert_ranks: list[int] = field(default_factory=list)  # expert ranks running the shared experts
    routing_domains: list[list[int]] = field(default_factory=list)  # empty: one domain, all ranks
    expert_owners: dict[str, list[int]] = field(default_factory=dict)  # str(attention rank) -> rank per expert
    nic_split: list[tuple[float, float]] = field(default_factory=list)  # per node: (attention NICs, expert NICs)
    model: str = ""
    cluster: str = ""
    seq_len: int | None = None
    global_batch: int | None = None
    optimizer: str = "adam"
    recompute: dict[str, bool] = field(default_factory=dict)  # activation recomputation per group
    step_time: float | None = None  # predicted AF-pipe step (s)
    baseline_step_time: float | None = None  # Megatron-LM PP x EP x DP baseline, all-to-all on the critical path
    baseline_step_time_overlap: float | None = None  # the same, all-to-all overlapped with another micro-batch
    utilisation: dict[str, float] = field(default_factory=dict)
    memory_per_device: dict[str, float] = field(default_factory=dict)  # bytes; plus "capacity"
    baseline: dict = field(default_factory=dict)  # per variant ("no_overlap", "overlap"): its configuration
    breakdown: dict[str, float] = field(default_factory=dict)  # stage times etc. (s)
    evaluations: list[dict] = field(default_factory=list)  # for explain()
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in PLAN_KINDS:
            raise ValueError(f"Plan: kind={self.kind!r}; must be one of {PLAN_KINDS}")
        both = sorted(set(self.attention_ranks) & set(self.expert_ranks))
        if self.kind == "afpipe" and both:
            raise ValueError(f"Plan: attention_ranks and expert_ranks overlap on {both}; they must be disjoint "
                             "(use Plan.expert_parallel for expert parallelism)")
        if self.kind == "ep" and sorted(self.attention_ranks) != sorted(self.expert_ranks):
            raise ValueError("Plan: an expert-parallel plan (kind='ep') has the same attention and expert ranks")
        if not self.attention_ranks or not self.expert_ranks:
            raise ValueError("Plan: needs at least one attention rank and one expert rank")
        experts = set(self.expert_ranks)
        for e, ranks in enumerate(self.expert_placement):
            if not ranks or not set(ranks) <= experts:
                raise ValueError(f"Plan: expert {e} is placed on {ranks}; it needs >= 1 rank, all expert ranks")
        if self.num_microbatches < 1 or (self.microbatch_size or 1) < 1 or self.grad_accumulation < 1:
            raise ValueError("Plan: num_microbatches, microbatch_size and grad_accumulation must be >= 1")
        unknown = sorted(set(self.recompute) - set(RECOMPUTE_GROUPS))
        if unknown:
            raise ValueError(f"Plan: recompute names groups {unknown}; the groups are {RECOMPUTE_GROUPS}")
        self.nic_split = [tuple(x) for x in self.nic_split]
        self.chunks = [list(c) for c in self.chunks]
        from fxdisag.schedule.actions import MAX_CHUNKS

        if any(len(c) != 2 or any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_CHUNKS
                                  for r in c) for c in self.chunks):
            raise ValueError(f"Plan: chunks={self.chunks!r}; give per MoE layer [forward, backward] chunk counts, "
                             f"ints in 1..{MAX_CHUNKS}")
        if self.pipeline_depth != 1 and any(max(c) > 1 for c in self.chunks):
            raise ValueError(f"Plan: chunks with pipeline_depth={self.pipeline_depth}: chunked layers run at depth 1 "
                             "only (the combine that crosses a hop carries its row count); leave chunks empty")
        self.shared_expert_ranks = sorted(self.shared_expert_ranks)
        shared = self.shared_expert_ranks
        if shared:
            if any(isinstance(r, bool) or not isinstance(r, int) for r in shared) or not (
                    (len(shared) == 1 and shared[0] in self.expert_ranks)
                    or shared == sorted(self.expert_ranks)):
                raise ValueError(f"Plan: shared_expert_ranks={shared!r}; give one expert rank, every expert rank "
                                 f"{sorted(self.expert_ranks)}, or none (the shared experts run on the attention group)")
            if self.kind != "afpipe" or self.pipeline_depth != 1:
                raise ValueError("Plan: shared_expert_ranks places shared experts on expert ranks of an AF-pipe plan "
                                 f"of depth 1 (this plan: kind {self.kind!r}, depth {self.pipeline_depth}); leave it empty")
        self._check_pipeline()

    def _check_pipeline(self) -> None:
        """pipeline_depth, layer_assignment and loss_group: p equal groups of each kind, and
        one placement pattern in every expert group (the runtime maps group 0's routing
        tables slot for slot onto the other groups)."""
        p = self.pipeline_depth
        if isinstance(p, bool) or not isinstance(p, int) or p < 1:
            raise ValueError(f"Plan: pipeline_depth={p!r}; it must be an int >= 1 (1: one attention group and one "
                             "expert group)")
        for name, ranks in (("attention_ranks", self.attention_ranks), ("expert_ranks", self.expert_ranks)):
            if len(ranks) % p:
                raise ValueError(f"Plan: pipeline_depth={p} but {name} has {len(ranks)} ranks, which do not split "
                                 f"into {p} equal groups; use a multiple of {p} ranks or another pipeline_depth")
        if self.layer_assignment not in LAYER_ASSIGNMENTS:
            raise ValueError(f"Plan: layer_assignment={self.layer_assignment!r}; must be one of {LAYER_ASSIGNMENTS}")
        if self.stage_costs:
            if p == 1:
                raise ValueError("Plan: stage_costs orders the ring schedule of pipeline_depth > 1; at depth 1 the "
                                 "runtime's builders take no costs: leave stage_costs empty")
            from fxdisag.schedule import stage_costs

            stage_costs(self.stage_costs, 1)  # refuses missing keys
            bad = {k: v for k, v in self.stage_costs.items()
                   if k not in ("F", "B", "EF", "EB", "F0", "B0", "FJ", "BJ") or not v >= 0}
            if bad:
                raise ValueError(f"Plan: stage_costs {bad}: keys are F B EF EB F0 B0 FJ BJ, values seconds >= 0")
        g = self.loss_group
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < p):
            raise ValueError(f"Plan: loss_group={g!r}; must be None or an attention group 0..{p - 1} "
                             f"(pipeline_depth={p})")
        if p == 1:
            return
        if self.kind != "afpipe":
            raise ValueError(f"Plan: pipeline_depth={p} needs kind='afpipe', got kind={self.kind!r}; use "
                             "pipeline_depth=1 for expert parallelism")
        for name in ("expert_owners", "routing_domains"):
            if getattr(self, name):
                raise ValueError(f"Plan: {name} is not supported with pipeline_depth > 1 (each expert group routes "
                                 f"by slot, from expert_placement); leave {name} empty or use pipeline_depth=1")
        first = None
        for g in range(p):
            pattern = self._slot_pattern(g)
            for e, slots in enumerate(pattern):
                if not slots:
                    raise ValueError(f"Plan: expert_placement: expert {e} has no replica in expert group {g} "
                                     f"(ranks {sorted(self.expert_groups()[g])}); with pipeline_depth={p} every "
                                     "expert group holds every expert")
                if first is not None and slots != first[e]:
                    raise ValueError(
                        f"Plan: expert_placement: expert {e} is on slots {slots} of expert group {g} but on slots "
                        f"{first[e]} of group 0; with pipeline_depth={p} every expert group must hold each expert "
                        "on the same slots, in the same order (a slot = position in the sorted group)")
            if g == 0:
                first = pattern
        if self.num_moe_layers is not None:
            self.stages(self.num_moe_layers)  # refuses a depth the model's layers cannot fill

    def _slot_pattern(self, group: int) -> list[list[int]]:
        """Per expert, the slots (positions in the sorted expert group) of its replicas in ``group``."""
        slot = {r: t for t, r in enumerate(sorted(self.expert_groups()[group]))}
        return [[slot[r] for r in ranks] for ranks in self.group_placement(group)]

    # ------------------------------------------------------------------ derived numbers
    @property
    def speedup(self) -> float | None:
        """Baseline (all-to-all overlapped) step / AF-pipe step."""
        if self.step_time and self.baseline_step_time_overlap:
            return self.baseline_step_time_overlap / self.step_time
        return None

    @property
    def speedup_no_overlap(self) -> float | None:
        """Baseline (all-to-all on the critical path) step / AF-pipe step."""
        if self.step_time and self.baseline_step_time:
            return self.baseline_step_time / self.step_time
        return None

    def predictions(self) -> dict:
        """Everything the table shows that is derived: speedups per baseline variant."""
        return {"speedup_overlap": self.speedup, "speedup_no_overlap": self.speedup_no_overlap}

    @property
    def num_experts(self) -> int:
        return len(self.expert_placement)

    # ------------------------------------------------------------------ pipeline groups
    def _groups(self, ranks: list[int]) -> list[list[int]]:
        size = len(ranks) // self.pipeline_depth
        return [list(ranks[g * size:(g + 1) * size]) for g in range(self.pipeline_depth)]

    def attention_groups(self) -> list[list[int]]:
        """The p attention groups: consecutive, equal slices of ``attention_ranks`` (p = 1: all of them)."""
        return self._groups(self.attention_ranks)

    def expert_groups(self) -> list[list[int]]:
        """The p expert groups: consecutive, equal slices of ``expert_ranks`` (p = 1: all of them)."""
        return self._groups(self.expert_ranks)

    def group_placement(self, group: int) -> list[list[int]]:
        """``expert_placement`` restricted to expert group ``group``'s ranks (replica order kept)."""
        if not isinstance(group, int) or not 0 <= group < self.pipeline_depth:
            raise ValueError(f"group={group!r}: the plan has expert groups 0..{self.pipeline_depth - 1}")
        members = set(self.expert_groups()[group])
        return [[r for r in ranks if r in members] for ranks in self.expert_placement]

    def _layers(self, num_moe_layers: int | None, who: str) -> int:
        """The model's MoE layer count: the argument, else the plan's; they must agree."""
        layers = num_moe_layers if num_moe_layers is not None else self.num_moe_layers
        if layers is None:
            raise ValueError(f"Plan.{who}: the plan does not know the number of MoE layers; pass num_moe_layers")
        if self.num_moe_layers is not None and layers != self.num_moe_layers:
            raise ValueError(f"Plan.num_moe_layers={self.num_moe_layers} but the model has {layers} MoE layers: "
                             "the plan was made for another model")
        return layers

    def stages(self, num_moe_layers: int | None = None) -> "Stages":
        """Which group runs which stage (a :class:`~fxdisag.schedule.Stages`): p = 1, one group
        of each kind holding everything; p > 1, the layers dealt by ``layer_assignment`` and
        the loss stage on ``loss_group``. Refuses a depth that leaves a group without layers."""
        from fxdisag.schedule import Stages

        J, p = self._layers(num_moe_layers, "stages"), self.pipeline_depth
        if p == 1:
            return Stages.single(self.attention_ranks, self.expert_ranks, J)
        if J < p:
            raise ValueError(f"Plan: pipeline_depth={p} but the model has {J} MoE layers: group {J} would hold no "
                             f"layer; use pipeline_depth <= {J}")
        return Stages.dealt(self.attention_groups(), self.expert_groups(), J, self.layer_assignment, self.loss_group)

    def expert_owner(self, attention_rank: int, layer_group: int = 0) -> tuple[int, ...]:
        """For each expert, the expert rank that ``attention_rank`` sends its rows to in the
        MoE layers of expert group ``layer_group``.

        p = 1: the stored table, else replica t mod q of the rank's routing domain.
        p > 1: the p = 1 rule inside the pair (attention group ``layer_group``, expert group
        ``layer_group``), at the rank's slot: the rank at slot t of its own attention group
        routes like slot t of attention group ``layer_group``, the group whose layers talk
        to expert group ``layer_group``. Every group has one placement pattern, so this is
        group 0's table with each expert rank moved to the same slot of ``layer_group``.
        """
        if attention_rank not in self.attention_ranks:
            raise ValueError(f"rank {attention_rank} is not an attention rank of this plan")
        if not isinstance(layer_group, int) or not 0 <= layer_group < self.pipeline_depth:
            raise ValueError(f"layer_group={layer_group!r}: the plan has expert groups "
                             f"0..{self.pipeline_depth - 1} (pipeline_depth={self.pipeline_depth})")
        if self.pipeline_depth > 1:
            slot = next(sorted(g).index(attention_rank) for g in self.attention_groups() if attention_rank in g)
            att = sorted(self.attention_groups()[layer_group])
            exp = sorted(self.expert_groups()[layer_group])
            table = expert_owners(att, self.group_placement(layer_group), [sorted(att + exp)])
            return table[att[slot]]
        if self.expert_owners:
            return tuple(self.expert_owners[str(attention_rank)])
        if self.kind == "ep":
            return tuple(ranks[0] for ranks in self.expert_placement)
        domains = self.routing_domains or [sorted(self.attention_ranks + self.expert_ranks)]
        return expert_owners(self.attention_ranks, self.expert_placement, domains)[attention_rank]

    # ------------------------------------------------------------------ constructors
    @classmethod
    def manual(cls, num_attention: int, num_expert: int, num_experts: int, num_microbatches: int, *,
               num_moe_layers: int | None = None, microbatch_size: int | None = None,
               schedule_kind: str = "gpipe", in_flight: int | None = None, pipeline_depth: int = 1,
               layer_assignment: str = "round_robin", loss_group: int | None = None) -> "Plan":
        """Ranks 0..num_attention-1 run attention, the next num_expert ranks run experts,
        experts in contiguous blocks (:func:`contiguous_placement`). No predictions.

        ``pipeline_depth`` p: ``num_attention`` and ``num_expert`` are the ranks of *one*
        group (world = p x (num_attention + num_expert)); attention group g is ranks
        g*a..(g+1)*a-1, expert group g comes after every attention rank (p*a + g*e ..), and
        each expert group holds every expert in contiguous blocks."""
        for name, value in (("num_attention", num_attention), ("num_expert", num_expert),
                            ("num_experts", num_experts), ("num_microbatches", num_microbatches),
                            ("pipeline_depth", pipeline_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Plan.manual: {name} must be an int >= 1, got {value!r}")
        a, e, p = num_attention, num_expert, pipeline_depth
        attention = list(range(p * a))
        experts = list(range(p * a, p * (a + e)))
        placement: list[list[int]] = [[] for _ in range(num_experts)]
        for g in range(p):
            for ex, ranks in enumerate(contiguous_placement(num_experts, experts[g * e:(g + 1) * e])):
                placement[ex] += ranks
        return cls(attention, experts, placement, num_microbatches,
                   microbatch_size=microbatch_size, num_moe_layers=num_moe_layers, schedule_kind=schedule_kind,
                   in_flight=in_flight, pipeline_depth=p, layer_assignment=layer_assignment, loss_group=loss_group,
                   notes=["manual plan"])

    @classmethod
    def expert_parallel(cls, world: int, num_experts: int, num_microbatches: int, overlap: bool = False) -> "Plan":
        """The expert-parallel baseline: every rank runs attention on 1/world of the batch and a
        contiguous block of ``num_experts / world`` experts (expert e on rank ``e * world // E``).

        ``overlap``: the all-to-all of one micro-batch hides behind another's compute
        (schedule ``"overlap"``; needs ``num_microbatches >= 2``)."""
        for name, value in (("world", world), ("num_experts", num_experts), ("num_microbatches", num_microbatches)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Plan.expert_parallel: {name} must be an int >= 1, got {value!r}")
        if world > num_experts:
            raise ValueError(f"Plan.expert_parallel: {world} ranks but {num_experts} experts; every rank needs "
                             "at least one expert")
        ranks = list(range(world))
        placement = [[e * world // num_experts] for e in range(num_experts)]
        if overlap and num_microbatches < 2:
            raise ValueError("Plan.expert_parallel(overlap=True) needs num_microbatches >= 2: the all-to-all of one "
                             "micro-batch hides behind the compute of another")
        return cls(ranks, list(ranks), placement, num_microbatches, kind="ep",
                   schedule_kind="overlap" if overlap else "gpipe",
                   notes=["expert-parallel baseline: attention on every rank, all-to-all dispatch and combine"
                          + (", overlapped across micro-batch pairs" if overlap else "")])

    # ------------------------------------------------------------------ runtime
    def schedule(self, num_moe_layers: int | None = None):
        """This plan's action lists, validated: p = 1 ``af_pipe_schedule``,
        ``one_f_one_b_schedule`` or ``ep_schedule``; p > 1 ``ring_schedule`` over :meth:`stages`."""
        from fxdisag.schedule import af_pipe_schedule, ep_schedule, one_f_one_b_schedule, ring_schedule, validate

        layers = self._layers(num_moe_layers, "schedule")
        if self.kind == "ep":
            if self.schedule_kind not in EP_SCHEDULE_KINDS:
                raise ValueError(f"Plan.schedule_kind={self.schedule_kind!r}: the expert-parallel baseline runs "
                                 f"{EP_SCHEDULE_KINDS} schedules only")
            schedule = ep_schedule(self.attention_ranks, layers, self.num_microbatches,
                                   overlap=self.schedule_kind == "overlap")
        elif self.schedule_kind not in SCHEDULE_KINDS:
            raise ValueError(f"Plan.schedule_kind={self.schedule_kind!r}: the runtime builds {SCHEDULE_KINDS} "
                             "schedules only")
        elif self.pipeline_depth > 1:
            from fxdisag.schedule import stage_costs

            cost = stage_costs(self.stage_costs, layers) if self.stage_costs else None
            schedule = ring_schedule(self.stages(layers), self.num_microbatches, self.schedule_kind, self.in_flight,
                                     cost=cost)
        elif self.schedule_kind == "1f1b":
            schedule = one_f_one_b_schedule(self.attention_ranks, self.expert_ranks, layers, self.num_microbatches,
                                            self.in_flight)
        else:
            schedule = af_pipe_schedule(self.attention_ranks, self.expert_ranks, layers, self.num_microbatches)
        if self.chunks:
            from fxdisag.schedule import chunk_schedule

            if len(self.chunks) != layers:
                raise ValueError(f"Plan.chunks has {len(self.chunks)} entries; the model has {layers} MoE layers: "
                                 "give one [forward, backward] pair per MoE layer")
            schedule = chunk_schedule(schedule, {j: tuple(c) for j, c in enumerate(self.chunks) if max(c) > 1})
        validate(schedule)
        return schedule

    def binding(self) -> dict:
        """The fields the runtime honours (see the module docstring)."""
        data = dataclasses.asdict(self)
        return {k: data[k] for k in BINDING_FIELDS}

    def describe_shared(self) -> str:
        """Where the shared experts run, in words."""
        ranks = self.shared_expert_ranks
        if not ranks:
            return "on the attention group"
        if len(ranks) == 1:
            return f"on expert rank {ranks[0]}"
        return f"on every expert rank ({_ranges(ranks)}), each token's with its first routed expert"

    # ------------------------------------------------------------------ printing
    def explain(self) -> str:
        """Every formula used, with the values and results that gave this plan's numbers."""
        if not self.evaluations:
            return "manual plan: no predictions (make one with fxdisag.planner.plan to get them)"
        decisions = [n for n in self.notes if n.startswith(DECISION_NOTES)]
        head = "".join(f"decision: {d}\n" for d in decisions) + ("\n" if decisions else "")
        return head + _explain(self.evaluations)

    def __str__(self) -> str:
        lines = []
        head = f"Plan for {self.model or '?'} on {self.cluster or '?'}"
        if self.kind == "ep":
            head = "Expert-parallel " + head
        if self.seq_len:
            head += f", seq_len {self.seq_len}, global batch {self.global_batch}"
        lines.append(head)
        lines.append(f"  attention ranks ({len(self.attention_ranks)}): {_ranges(self.attention_ranks)}")
        lines.append(f"  expert ranks    ({len(self.expert_ranks)}): {_ranges(self.expert_ranks)}")
        held: dict[int, int] = {}
        for ranks in self.expert_placement:
            for r in ranks:
                held[r] = held.get(r, 0) + 1
        replicas = sorted({len(r) for r in self.expert_placement})
        p = self.pipeline_depth
        if p > 1:
            replicas = sorted({len(r) for r in self.group_placement(0)})
        lines.append(
            f"  experts: {self.num_experts}, {min(held.values())}-{max(held.values())} per expert rank, "
            f"{'/'.join(map(str, replicas))} replica(s) each" + (" in every expert group" if p > 1 else "")
        )
        if p > 1:
            lines += self._group_lines()
        if len(self.routing_domains) > 1:
            lines.append(f"  routing domains: {len(self.routing_domains)} of {len(self.routing_domains[0])} ranks "
                         "(attention ranks route to the expert replicas of their own domain)")
        lines.append(
            f"  micro-batches: {self.num_microbatches} x {self.microbatch_size or '(from the batch)'} "
            f"sequence(s) per attention rank, {self.schedule_kind} schedule"
            + (f" ({self.in_flight or (2 if p == 1 else 3 * p)} in flight)" if self.schedule_kind == "1f1b" else "")
            + ", "
            f"{self.grad_accumulation} accumulation round(s)"
        )
        if any(max(c) > 1 for c in self.chunks):
            pairs = sorted({tuple(c) for c in self.chunks})
            lines.append("  dispatch -> experts -> combine in chunks (forward x backward): "
                         + ", ".join(f"{f} x {b}" for f, b in pairs)
                         + (" in every MoE layer" if len(pairs) == 1 else " (per MoE layer)"))
        if self.shared_expert_ranks:
            lines.append(f"  shared experts: {self.describe_shared()}, as an always-selected expert")
        if any(self.recompute.values()):
            lines.append("  activation recomputation: " + ", ".join(k for k, v in self.recompute.items() if v))
        if self.nic_split:
            counts: dict[tuple, int] = {}
            for split in self.nic_split:  # node order, equal splits folded
                counts[split] = counts.get(split, 0) + 1
            lines.append("  NICs per node (attention:experts): "
                         + ", ".join(f"{a:g}:{e:g} x{n} node(s)" for (a, e), n in counts.items()))
        if self.step_time is not None:
            lines.append("")
            lines.append(f"  {'':<34} {'step (s)':>10} {'speedup':>8}  configuration")
            lines.append(f"  {'AF-pipe (this plan)':<34} {self.step_time:>10.4g} {'1.00':>8}  {self._config_line()}")
            for label, value, variant in (("Megatron PPxEPxDP, a2a overlapped", self.baseline_step_time_overlap,
                                           "overlap"),
                                          ("Megatron PPxEPxDP, a2a exposed", self.baseline_step_time, "no_overlap")):
                if value is None:
                    lines.append(f"  {label:<34} {'n/a':>10} {'':>8}  does not fit")
                else:
                    config = self.baseline.get(variant, {}).get("description", "")
                    lines.append(f"  {label:<34} {value:>10.4g} {value / self.step_time:>8.2f}  {config}")
        if self.utilisation:
            lines.append("")
            lines.append("  utilisation: " + ", ".join(f"{k} {v:.1%}" for k, v in self.utilisation.items()))
        if self.memory_per_device:
            cap = self.memory_per_device.get("capacity")
            parts = [f"{k} {v / 1e9:.2f} GB" for k, v in self.memory_per_device.items() if k != "capacity"]
            lines.append("  memory per device: " + ", ".join(parts) + (f" (limit {cap / 1e9:.2f} GB)" if cap else ""))
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def _config_line(self) -> str:
        a, e = len(self.attention_ranks) // self.pipeline_depth, len(self.expert_ranks) // self.pipeline_depth
        kind = self.schedule_kind + (f" ({self.in_flight} in flight)" if self.schedule_kind == "1f1b" else "")
        return (f"p {self.pipeline_depth}, {a}A:{e}E per group, {self.num_microbatches} x {self.microbatch_size} "
                f"seq, {kind}")

    def _group_lines(self) -> list[str]:
        """p > 1: one line per group (its ranks and MoE layers), then where the loss runs."""
        p, rule = self.pipeline_depth, self.layer_assignment
        stages = self.stages() if self.num_moe_layers is not None else None
        how = {"round_robin": f"MoE layer j on group j mod {p}", "contiguous": f"{p} blocks of consecutive MoE layers"}
        lines = [f"  pipeline depth {p}: layers dealt {rule} ({how[rule]})"]
        for g, (att, exp) in enumerate(zip(self.attention_groups(), self.expert_groups())):
            if stages is not None:
                layers = str(stages.layers_of(g))
            elif rule == "round_robin":
                layers = f"{g}, {g + p}, {g + 2 * p}, ..."
            else:
                layers = f"block {g} of {p}"
            lines.append(f"  group {g}: attention ranks {_ranges(att)}, expert ranks {_ranges(exp)}, "
                         f"MoE layers {layers}")
        if stages is not None:
            loss = str(stages.stage_group[-1])
        elif self.loss_group is not None:
            loss = str(self.loss_group)
        else:
            loss = f"J mod {p} (where MoE layer J would go)" if rule == "round_robin" else str(p - 1)
        lines.append(f"  loss (final norm, head): attention group {loss}")
        return lines

    # ------------------------------------------------------------------ serialisation
    def to_json(self, **kwargs) -> str:
        data = dataclasses.asdict(self)
        advisory = {k: v for k, v in data.items() if k not in BINDING_FIELDS}
        advisory["predictions"] = self.predictions()
        return json.dumps({"binding": self.binding(), "advisory": advisory}, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        if set(data) == {"binding", "advisory"}:
            data = {**data["advisory"], **data["binding"]}
        data.pop("predictions", None)  # derived (to_json writes them for readers of the JSON)
        for old, new in _RENAMED.items():  # plans written before the Megatron baseline
            if old in data:
                data[new] = data.pop(old)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Plan.from_json: unknown fields {sorted(unknown)}")
        return cls(**data)


_RENAMED = {"ep_step_time": "baseline_step_time", "ep_step_time_overlap": "baseline_step_time_overlap",
            "ep_baseline": "baseline"}


def _ranges(ranks: list[int]) -> str:
    """[0,1,2,5,6] -> '0-2,5-6'."""
    if not ranks:
        return ""
    out, start, prev = [], ranks[0], ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(out)
