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
  for every MoE layer);
* ``expert_owner(rank)[e]`` -- the expert rank that attention rank ``rank`` sends expert
  ``e``'s rows to (the runtime's routing table; one rank per (attention rank, expert)).
  Searched plans store it (``expert_owners``); otherwise the t-th attention rank of a
  routing domain (``routing_domains``, default: all ranks) uses replica t mod q of the
  domain's q replicas of ``e``;
* ``num_microbatches`` m and ``microbatch_size`` (sequences per micro-batch per attention
  rank; None: whatever the batch gives, ``batch / (attention ranks x m)``);
* ``schedule_kind`` -- the schedule the runtime builds: ``"gpipe"`` (all forwards, then
  all backwards) or ``"1f1b"`` (at most ``in_flight`` micro-batches in flight, backward
  work first; AF-pipe plans only);
* ``recompute`` -- activation recomputation per group (``{"attention": bool,
  "experts": bool}``);
* ``num_moe_layers`` -- when set, must match the model.

``grad_accumulation`` (rounds of m micro-batches per optimizer step) binds the training
loop, which calls forward/backward that many times per optimizer step; the runtime does
not see optimizer steps.

and, when made by the search (``fxdisag.planner.plan``), the predicted times
(AF-pipe step, EP baseline step without and with overlap, speedups), per-group
utilisation, memory per device and the formula evaluations behind them
(``explain()``). ``Plan.manual`` builds one by hand, with no predictions.
``schedule()`` gives the runtime's action lists (``af_pipe_schedule``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from fxdisag.planner.formulas import explain as _explain
from fxdisag.planner.placement import expert_owners

__all__ = ["BINDING_FIELDS", "PLAN_KINDS", "Plan", "SCHEDULE_KINDS", "contiguous_placement"]

PLAN_KINDS = ("afpipe", "ep")
SCHEDULE_KINDS = ("gpipe", "1f1b")  # what the runtime builds
RECOMPUTE_GROUPS = ("attention", "experts")
BINDING_FIELDS = (
    "kind", "attention_ranks", "expert_ranks", "expert_placement", "routing_domains", "expert_owners",
    "num_microbatches", "microbatch_size", "grad_accumulation", "schedule_kind", "in_flight", "recompute",
    "num_moe_layers",
)


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
    ep_step_time: float | None = None  # EP baseline, no overlap
    ep_step_time_overlap: float | None = None  # EP baseline, two-half-batch overlap
    utilisation: dict[str, float] = field(default_factory=dict)
    memory_per_device: dict[str, float] = field(default_factory=dict)  # bytes; plus "capacity"
    ep_baseline: dict = field(default_factory=dict)  # the baseline's configuration
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

    # ------------------------------------------------------------------ derived numbers
    @property
    def speedup(self) -> float | None:
        """EP baseline (with overlap) step / AF-pipe step."""
        if self.step_time and self.ep_step_time_overlap:
            return self.ep_step_time_overlap / self.step_time
        return None

    @property
    def speedup_no_overlap(self) -> float | None:
        if self.step_time and self.ep_step_time:
            return self.ep_step_time / self.step_time
        return None

    @property
    def num_experts(self) -> int:
        return len(self.expert_placement)

    def expert_owner(self, attention_rank: int) -> tuple[int, ...]:
        """For each expert, the expert rank that ``attention_rank`` sends its rows to."""
        if attention_rank not in self.attention_ranks:
            raise ValueError(f"rank {attention_rank} is not an attention rank of this plan")
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
               schedule_kind: str = "gpipe", in_flight: int | None = None) -> "Plan":
        """Ranks 0..num_attention-1 run attention, the next num_expert ranks run experts,
        experts in contiguous blocks (:func:`contiguous_placement`). No predictions."""
        for name, value in (("num_attention", num_attention), ("num_expert", num_expert),
                            ("num_experts", num_experts), ("num_microbatches", num_microbatches)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Plan.manual: {name} must be an int >= 1, got {value!r}")
        attention = list(range(num_attention))
        experts = list(range(num_attention, num_attention + num_expert))
        return cls(attention, experts, contiguous_placement(num_experts, experts), num_microbatches,
                   microbatch_size=microbatch_size, num_moe_layers=num_moe_layers, schedule_kind=schedule_kind,
                   in_flight=in_flight, notes=["manual plan"])

    @classmethod
    def expert_parallel(cls, world: int, num_experts: int, num_microbatches: int) -> "Plan":
        """The expert-parallel baseline: every rank runs attention on 1/world of the batch and a
        contiguous block of ``num_experts / world`` experts (expert e on rank ``e * world // E``)."""
        for name, value in (("world", world), ("num_experts", num_experts), ("num_microbatches", num_microbatches)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Plan.expert_parallel: {name} must be an int >= 1, got {value!r}")
        if world > num_experts:
            raise ValueError(f"Plan.expert_parallel: {world} ranks but {num_experts} experts; every rank needs "
                             "at least one expert")
        ranks = list(range(world))
        placement = [[e * world // num_experts] for e in range(num_experts)]
        return cls(ranks, list(ranks), placement, num_microbatches, kind="ep",
                   notes=["expert-parallel baseline: attention on every rank, all-to-all dispatch and combine"])

    # ------------------------------------------------------------------ runtime
    def schedule(self, num_moe_layers: int | None = None):
        """This plan's action lists (``af_pipe_schedule`` or ``ep_schedule``), validated."""
        from fxdisag.schedule import af_pipe_schedule, ep_schedule, one_f_one_b_schedule, validate

        layers = num_moe_layers if num_moe_layers is not None else self.num_moe_layers
        if layers is None:
            raise ValueError("Plan.schedule: the plan does not know the number of MoE layers; pass num_moe_layers")
        if self.num_moe_layers is not None and layers != self.num_moe_layers:
            raise ValueError(f"Plan.num_moe_layers={self.num_moe_layers} but the model has {layers} MoE layers: "
                             "the plan was made for another model")
        if self.schedule_kind not in SCHEDULE_KINDS:
            raise ValueError(f"Plan.schedule_kind={self.schedule_kind!r}: the runtime builds {SCHEDULE_KINDS} "
                             "schedules only")
        if self.kind == "ep":
            if self.schedule_kind != "gpipe":
                raise ValueError(f"Plan.schedule_kind={self.schedule_kind!r}: the expert-parallel baseline runs "
                                 "'gpipe' order only")
            schedule = ep_schedule(self.attention_ranks, layers, self.num_microbatches)
        elif self.schedule_kind == "1f1b":
            schedule = one_f_one_b_schedule(self.attention_ranks, self.expert_ranks, layers, self.num_microbatches,
                                            self.in_flight)
        else:
            schedule = af_pipe_schedule(self.attention_ranks, self.expert_ranks, layers, self.num_microbatches)
        validate(schedule)
        return schedule

    def binding(self) -> dict:
        """The fields the runtime honours (see the module docstring)."""
        data = dataclasses.asdict(self)
        return {k: data[k] for k in BINDING_FIELDS}

    # ------------------------------------------------------------------ printing
    def explain(self) -> str:
        """Every formula used, with the values and results that gave this plan's numbers."""
        if not self.evaluations:
            return "manual plan: no predictions (make one with fxdisag.planner.plan to get them)"
        return _explain(self.evaluations)

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
        lines.append(
            f"  experts: {self.num_experts}, {min(held.values())}-{max(held.values())} per expert rank, "
            f"{'/'.join(map(str, replicas))} replica(s) each"
        )
        if len(self.routing_domains) > 1:
            lines.append(f"  routing domains: {len(self.routing_domains)} of {len(self.routing_domains[0])} ranks "
                         "(attention ranks route to the expert replicas of their own domain)")
        lines.append(
            f"  micro-batches: {self.num_microbatches} x {self.microbatch_size or '(from the batch)'} "
            f"sequence(s) per attention rank, {self.schedule_kind} schedule"
            + (f" ({self.in_flight or 2} in flight)" if self.schedule_kind == "1f1b" else "") + ", "
            f"{self.grad_accumulation} accumulation round(s)"
        )
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
            lines.append(f"  {'':<30} {'step (s)':>10} {'speedup':>8}")
            lines.append(f"  {'AF-pipe (this plan)':<30} {self.step_time:>10.4g} {'1.00':>8}")
            for label, value in (("EP baseline, with overlap", self.ep_step_time_overlap),
                                 ("EP baseline, no overlap", self.ep_step_time)):
                if value is None:
                    lines.append(f"  {label:<30} {'n/a':>10} {'':>8}")
                else:
                    lines.append(f"  {label:<30} {value:>10.4g} {value / self.step_time:>8.2f}")
            if self.ep_baseline:
                lines.append(f"  EP baseline config: {self.ep_baseline.get('description', '')}")
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

    # ------------------------------------------------------------------ serialisation
    def to_json(self, **kwargs) -> str:
        data = dataclasses.asdict(self)
        advisory = {k: v for k, v in data.items() if k not in BINDING_FIELDS}
        return json.dumps({"binding": self.binding(), "advisory": advisory}, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        if set(data) == {"binding", "advisory"}:
            data = {**data["advisory"], **data["binding"]}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"Plan.from_json: unknown fields {sorted(unknown)}")
        return cls(**data)


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
