"""The cost model: every formula once, as a sympy expression, and the numbers from it.

Contract
--------
Each :class:`Formula` below is the single definition of one quantity. Numbers are
computed by calling the formula (a ``sympy.lambdify`` of the same expression), never by
a second hand-written copy, and :class:`Recorder` keeps the inputs and outputs of the
calls that produced a plan so that ``plan.explain()`` can print expression, values and
result side by side.

Formulas (all times in seconds, bytes in bytes, per device unless said otherwise)::

    REGION_TIME     t = max(F / peak, B / mem_bw)                 roofline of one region
    COMPUTE_ACTION  t = t_work + overhead
                    one compute action (F, B, EF or EB of one micro-batch at one stage): the
                    sum of its regions' REGION_TIMEs plus the fixed per-action cost
                    ClusterSpec.action_overhead (framework dispatch, kernel launches). It is
                    paid once per (stage, micro-batch): AF-pipe runs L + 1 attention stages
                    (stage 0 = pre + first MoE layer's attention, stage L = post) and L expert
                    stages per micro-batch and direction; so t_attn and t_post below carry
                    one overhead each, t_pre none, and each expert stage one. EP pays the same
                    per micro-step (and per half micro-step with overlap), so more
                    micro-batches trade a smaller bubble for more overhead.
    TRANSFER_TIME   t = max(nic_out / (n_out bw_nic), nic_in / (n_in bw_nic),
                            link_out / bw_link, link_in / bw_link) + latency
                    (one node; the slowest node sets the time; NVLink and NIC run in parallel)
    ATTENTION_STAGE t_a = t_attn + (t_pre + t_post) / L
                    the work outside the MoE layers (embedding, leading dense layers, final
                    norm, head, loss) runs on the attention group; spreading it over the L
                    laps is exact when attention is the bottleneck (it adds m (t_pre + t_post)
                    per phase) and when the round trip is (it adds t_pre + t_post once)
    PIPELINE_TIME   T = (L - 1) max(m t_b, R) + (m - 1) t_b + R
                    L laps (MoE layers) of m micro-batches around a cycle of stages whose
                    round trip is R = sum of stage times and whose busiest resource needs
                    t_b per micro-batch: steady state max(m t_b, R) per lap, then the last
                    lap drains.
    STEP_TIME       T = r (T_fwd + T_bwd) + max(0, t_sync - o T_bwd)
                    r gradient-accumulation rounds; the gradient all-reduce hides behind
                    the last backward when o = 1, is fully exposed when o = 0
    ALLREDUCE_TIME  hierarchical ring: 2 (g-1)/g bytes / bw_link + 2 (k-1)/k bytes / (nics bw_nic)
                    + 2 (g-1) lat_link + 2 (k-1) lat_nic      (g devices per node, k nodes)
    MEMORY          M = P (w + g) + P o / s + A                   params P, bytes/param of weights
                    w, grads g, optimizer o (sharded s ways), activations A
    ACTIVATIONS     A = n keep + transient                        n sequences / rows in flight

The three step-time models built from them (functions :func:`afpipe_times` and
:func:`ep_times`):

* **AF-pipe**: attention group and expert group are the two compute resources, the
  dispatch and combine directions the two network resources; stages per MoE layer
  t_a (attention side, ATTENTION_STAGE), t_d (dispatch), t_e (experts), t_c (combine),
  so t_b = max(t_a, t_d, t_e, t_c), R = t_a + t_d + t_e + t_c; backward likewise with
  the gradient transfers.
* **EP, no overlap**: every device does attention (data parallel) then experts; per
  layer attention, all-to-all dispatch, experts, all-to-all combine run one after the
  other (PIPELINE_TIME with m = 1, t_b = R), gradient all-reduce exposed (o = 0).
* **EP, with overlap** ("two half-batch" overlap, as DeepSeek-V3 and Megatron-LM's
  all-to-all overlap): each micro-step is split into two halves; while one half
  computes, the other's all-to-all runs. Compute (attention + experts) and network
  (dispatch + combine) are the two resources: PIPELINE_TIME with m = 2,
  t_b = max(t_a/2 + t_e/2, t_d' + t_c'), where t_d', t_c' move half the bytes but
  pay the full latency; gradient all-reduce hidden behind backward (o = 1).

Activation recomputation (searched per group, for AF-pipe and EP alike): a group that
recomputes keeps only each decoder layer's input (attention side: S x H per sequence and
layer) or each routed row's input (experts: H per row), and re-runs the forward of that
layer during backward (backward = 3 x forward for those regions instead of 2 x; the
recomputed unit's full activations are a transient). Nothing is re-sent over the network:
the expert side keeps its received rows.

Assumptions, stated once: uniform routing (every expert gets the same share of a token's
top_k rows); an attention rank sends all rows of one expert to one expert rank (the
routing table ``Plan.expert_owner``, which is what the runtime's dispatch supports), so
replicas balance load only across attention ranks; dispatch sends top_k rows per token
(no per-device de-duplication); backward FLOPs and bytes are 2x forward; bytes per
region = weights + activations read and written by the region's leaf modules (no
caching across regions); NIC sharing between devices of a node (PXN-style) is free; a
NIC shared by both groups of a node counts half for each; the optimizer update itself
is not timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import sympy as sp

__all__ = [
    "Formula",
    "Recorder",
    "REGION_TIME",
    "COMPUTE_ACTION",
    "TRANSFER_TIME",
    "PIPELINE_TIME",
    "ATTENTION_STAGE",
    "STEP_TIME",
    "ALLREDUCE_TIME",
    "MEMORY",
    "ACTIVATIONS",
    "FORMULAS",
]


@dataclass(frozen=True)
class Formula:
    """One named sympy expression; calling it evaluates the expression numerically."""

    name: str
    expr: sp.Expr
    doc: str

    @cached_property
    def symbols(self) -> tuple[str, ...]:
        return tuple(sorted(s.name for s in self.expr.free_symbols))

    @cached_property
    def _fn(self):
        syms = [sp.Symbol(n) for n in self.symbols]
        return sp.lambdify(syms, self.expr, modules=[{"Max": max, "Min": min}, "math"])

    def __call__(self, recorder: "Recorder | None" = None, label: str | None = None, **values: float) -> float:
        try:
            result = float(self._fn(**values))
        except TypeError as exc:
            raise TypeError(f"formula {self.name}({', '.join(self.symbols)}) called with {sorted(values)}: {exc}") from exc
        if recorder is not None:
            recorder.record(label or self.name, self, values, result)
        return result

    def __str__(self) -> str:
        return f"{self.name} = {sp.sstr(self.expr)}"


def _s(names: str):
    return sp.symbols(names, nonnegative=True)


_F, _peak, _B, _mem_bw = _s("F peak B mem_bw")
REGION_TIME = Formula(
    "REGION_TIME",
    sp.Max(_F / _peak, _B / _mem_bw),
    "roofline time of one region: F FLOPs at peak FLOP/s, or B bytes at memory bandwidth",
)

_twork, _overhead = _s("t_work overhead")
COMPUTE_ACTION = Formula(
    "COMPUTE_ACTION",
    _twork + _overhead,
    "one compute action (F, B, EF or EB of one micro-batch at one stage): the roofline time of its "
    "regions plus a fixed overhead per action (ClusterSpec.action_overhead: dispatch, kernel launches)",
)

_no, _ni, _n_out, _n_in, _bw_nic, _lo, _li, _bw_link, _lat = _s(
    "nic_out nic_in n_out n_in bw_nic link_out link_in bw_link latency"
)
TRANSFER_TIME = Formula(
    "TRANSFER_TIME",
    sp.Max(_no / (_n_out * _bw_nic), _ni / (_n_in * _bw_nic), _lo / _bw_link, _li / _bw_link) + _lat,
    "one node's share of a transfer: bytes leaving/entering the node over the NICs its group uses "
    "(n_out, n_in of bw_nic each), bytes a device sends/receives inside the node (bw_link), plus latency",
)

_L, _m, _tb, _R = _s("L m t_b R")
PIPELINE_TIME = Formula(
    "PIPELINE_TIME",
    (_L - 1) * sp.Max(_m * _tb, _R) + (_m - 1) * _tb + _R,
    "L laps of m micro-batches around a stage cycle with round trip R and busiest resource t_b "
    "per micro-batch",
)

_tattn, _tpre, _tpost = _s("t_attn t_pre t_post")
ATTENTION_STAGE = Formula(
    "ATTENTION_STAGE",
    _tattn + (_tpre + _tpost) / _L,
    "attention-side stage of one MoE layer, with the pre (embedding, leading dense layers) and post "
    "(final norm, head, loss) work spread evenly over the L laps",
)

_r, _Tf, _Tb, _tsync, _o = _s("r T_fwd T_bwd t_sync o")
STEP_TIME = Formula(
    "STEP_TIME",
    _r * (_Tf + _Tb) + sp.Max(0, _tsync - _o * _Tb),
    "r gradient-accumulation rounds, then the gradient all-reduce (hidden behind the last backward "
    "when o = 1)",
)

_bytes, _g, _k, _nics, _lat_link, _lat_nic = _s("bytes g k nics lat_link lat_nic")
ALLREDUCE_TIME = Formula(
    "ALLREDUCE_TIME",
    2 * (_g - 1) / _g * _bytes / _bw_link
    + 2 * (_k - 1) / _k * _bytes / (_nics * _bw_nic)
    + 2 * (_g - 1) * _lat_link
    + 2 * (_k - 1) * _lat_nic,
    "hierarchical ring all-reduce of `bytes` over g devices per node on k nodes using `nics` NICs per node",
)

_P, _w, _gr, _opt, _shard, _act = _s("P w grad opt shard act")
MEMORY = Formula(
    "MEMORY",
    _P * (_w + _gr) + _P * _opt / _shard + _act,
    "device memory: P parameters with w bytes of weight, grad bytes of gradient and opt bytes of "
    "optimizer state each (sharded over `shard` replicas), plus activations kept for backward",
)

_n, _keep, _transient = _s("n keep transient")
ACTIVATIONS = Formula(
    "ACTIVATIONS",
    _n * _keep + _transient,
    "activation bytes: n units (sequences or expert rows) in flight keep `keep` bytes each; with "
    "recomputation, the one unit being recomputed needs `transient` more",
)

FORMULAS: dict[str, Formula] = {
    f.name: f
    for f in (REGION_TIME, COMPUTE_ACTION, TRANSFER_TIME, ATTENTION_STAGE, PIPELINE_TIME, STEP_TIME, ALLREDUCE_TIME, MEMORY, ACTIVATIONS)
}


@dataclass
class Evaluation:
    label: str
    formula: str
    inputs: dict[str, float]
    result: float

    def to_dict(self) -> dict:
        return {"label": self.label, "formula": self.formula, "inputs": self.inputs, "result": self.result}


@dataclass
class Recorder:
    """Keeps the formula evaluations that produced a plan (for ``Plan.explain``)."""

    evaluations: list[Evaluation] = field(default_factory=list)

    def record(self, label: str, formula: Formula, values: dict[str, float], result: float) -> None:
        self.evaluations.append(Evaluation(label, formula.name, {k: float(v) for k, v in values.items()}, result))


def explain(evaluations: list[dict]) -> str:
    """Formulas, then every recorded evaluation: label, inputs and result."""
    used = []
    for ev in evaluations:
        if ev["formula"] not in used:
            used.append(ev["formula"])
    lines = ["Formulas (fxdisag/planner/roofline.py):"]
    for name in used:
        f = FORMULAS[name]
        lines.append(f"  {f}")
        lines.append(f"      {f.doc}")
    lines.append("")
    lines.append("Evaluations:")
    for ev in evaluations:
        inputs = ", ".join(f"{k}={_fmt(v)}" for k, v in ev["inputs"].items())
        lines.append(f"  {ev['label']}: {ev['formula']}({inputs}) = {_fmt(ev['result'])}")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "inf"
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}"


# ====================================================================== the model's inputs


def optimizer_bytes_per_param(optimizer: str, dtype_bytes: int) -> float:
    """Optimizer-state bytes per parameter: Adam keeps fp32 m and v, plus an fp32 master copy
    when training in a 16-bit dtype (mixed precision); SGD keeps only the master copy."""
    master = 4.0 if dtype_bytes < 4 else 0.0
    if optimizer in ("adam", "adamw"):
        return 8.0 + master
    if optimizer == "sgd":
        return master
    raise ValueError(f"optimizer={optimizer!r}: choose 'adam', 'adamw' or 'sgd'")


@dataclass(frozen=True)
class RegionCost:
    """One attention-side region, per sequence at the planned length."""

    fwd_flops: float
    bwd_flops: float
    io_bytes: float
    weight_bytes: float
    layered: bool = True  # inside a decoder layer (recomputed under activation checkpointing)


@dataclass
class Workload:
    """A ModelProfile evaluated at one sequence length, cut the way AF-pipe cuts it.

    ``pre``: regions before the first MoE layer's attention (embedding, dense layers);
    ``layers[j]``: attention-side regions of MoE layer j (and of dense layers between MoE
    layers); ``post``: final norm, head, loss. Experts: one homogeneous MoE layer
    description (all registry models have identical MoE layers; mean values otherwise).
    """

    seq_len: int
    dtype: str
    dtype_bytes: int
    pre: list[RegionCost]
    layers: list[list[RegionCost]]
    post: list[RegionCost]
    attention_params: int  # everything but the routed experts (lives on attention devices)
    attention_saved_bytes: float  # per sequence, all attention-side regions
    attention_saved_unlayered: float  # per sequence, regions outside decoder layers (embed, head, loss)
    attention_saved_layer_max: float  # per sequence, the largest decoder layer's attention-side activations
    num_decoder_layers: int
    layer_input_bytes: float  # per sequence: one decoder layer's input (S x H x dtype)
    num_experts: int
    top_k: int
    params_per_expert: float
    expert_weight_bytes: float
    expert_flops_per_row: float
    expert_io_per_row: float
    expert_saved_per_row: float
    expert_input_per_row: float  # H x dtype: what a recomputing expert device keeps per row
    dispatch_per_token: float
    combine_per_token: float
    combine_grad_per_token: float
    dispatch_grad_per_token: float
    model_flops_per_seq: float  # forward + backward, the whole model

    @property
    def num_moe_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def from_profile(cls, profile, seq_len: int) -> "Workload":
        if not profile.moe:
            raise ValueError(f"profile of {profile.model} has no MoE layers: nothing to disaggregate")
        moe_layers = [m.layer for m in profile.moe]
        first, last = moe_layers[0], moe_layers[-1]
        pre: list[RegionCost] = []
        post: list[RegionCost] = []
        layers: list[list[RegionCost]] = [[] for _ in moe_layers]
        params = 0
        saved = 0.0
        unlayered = 0.0
        per_layer: dict[int, float] = {}
        total_flops = 0.0
        for r in profile.regions:
            f, b = r.fwd_flops.at(seq_len), r.bwd_flops.at(seq_len)
            total_flops += f + b
            if r.kind == "experts":
                continue
            cost = RegionCost(f, b, r.io_bytes.at(seq_len), float(r.weight_bytes), r.layer is not None)
            params += r.params
            kept = r.saved_bytes.at(seq_len)
            saved += kept
            if r.layer is None:
                unlayered += kept
            else:
                per_layer[r.layer] = per_layer.get(r.layer, 0.0) + kept
            if r.layer is None:
                (pre if r.kind == "embed" else post).append(cost)
            elif r.layer < first:
                pre.append(cost)
            elif r.layer > last:
                post.append(cost)
            else:
                # a dense layer between MoE layers belongs to the next MoE layer's stage
                j = next(i for i, layer in enumerate(moe_layers) if layer >= r.layer)
                layers[j].append(cost)
        n = len(profile.moe)

        def mean(attr: str) -> float:
            return sum(getattr(m, attr) for m in profile.moe) / n

        return cls(
            seq_len=seq_len,
            dtype=profile.dtype,
            dtype_bytes=profile.dtype_bytes,
            pre=pre,
            layers=layers,
            post=post,
            attention_params=params,
            attention_saved_bytes=saved,
            attention_saved_unlayered=unlayered,
            attention_saved_layer_max=max(per_layer.values(), default=0.0),
            num_decoder_layers=profile.num_layers,
            layer_input_bytes=seq_len * profile.hidden_size * profile.dtype_bytes,
            num_experts=profile.moe[0].num_experts,
            top_k=profile.moe[0].top_k,
            params_per_expert=mean("params_per_expert"),
            expert_weight_bytes=mean("expert_weight_bytes"),
            expert_flops_per_row=mean("fwd_flops_per_row"),
            expert_io_per_row=mean("io_bytes_per_row"),
            expert_saved_per_row=mean("saved_bytes_per_row"),
            expert_input_per_row=float(profile.hidden_size * profile.dtype_bytes),
            dispatch_per_token=mean("dispatch_bytes_per_token"),
            combine_per_token=mean("combine_bytes_per_token"),
            combine_grad_per_token=mean("combine_grad_bytes_per_token"),
            dispatch_grad_per_token=mean("dispatch_grad_bytes_per_token"),
            model_flops_per_seq=total_flops,
        )


# ====================================================================== layouts


@dataclass(frozen=True)
class NodeShare:
    """What one node holds of an AF-pipe layout (identical nodes are folded into one).

    Shares are of the rows produced by the node's *routing domain* (the nodes whose
    attention ranks route to the same set of expert replicas)."""

    attention: int  # attention devices on the node
    domain_attention: int  # attention devices in the node's routing domain
    experts: int  # expert devices on the node
    row_share: float  # fraction of the domain's routed rows processed on this node
    max_device_share: float  # largest fraction of the domain's rows on one expert device of the node
    nics_attention: float  # NICs the attention devices use (a shared single NIC counts 1/2)
    nics_experts: float


STRATEGIES = ("pairs", "replicas")


def domain_owners(strategy: str, num_experts: int, attention: list[int], experts: list[int]) -> dict[int, tuple[int, ...]]:
    """Routing inside one domain: attention rank -> the expert rank it sends each expert's rows to.

    ``"pairs"``: the (t, e) pairs (t-th attention rank, expert e) go round-robin over the
    expert ranks: owner = experts[(t * E + e) mod F]. Every expert rank gets the rows of
    floor or ceil(A * E / F) pairs (balanced load), and holds the experts of its pairs.
    ``"replicas"``: expert rank j holds experts (j * c + s) mod E for s < c = ceil(E / F)
    (fewest experts per rank); the t-th attention rank uses replica t mod q of an expert's
    q replicas.
    """
    E, F = num_experts, len(experts)
    if strategy == "pairs":
        return {a: tuple(experts[(t * E + e) % F] for e in range(E)) for t, a in enumerate(attention)}
    if strategy == "replicas":
        c = -(-E // F)
        replicas: list[list[int]] = [[] for _ in range(E)]
        for j, r in enumerate(experts):
            for s_ in range(c):
                replicas[(j * c + s_) % E].append(r)
        return {a: tuple(rs[t % len(rs)] for rs in replicas) for t, a in enumerate(attention)}
    raise ValueError(f"unknown placement strategy {strategy!r}; choose from {STRATEGIES}")


def _domain_loads(strategy: str, E: int, a: int, F: int) -> tuple[list[float], list[int], int]:
    """Fast path of :func:`domain_owners`: per expert rank (index j) its rows in attention
    devices' worth and its expert count, and the fewest replicas of an expert in the domain."""
    g = math.gcd(E, F)
    if strategy == "pairs":
        pairs = a * E
        count = [pairs // F + (1 if j < pairs % F else 0) for j in range(F)]
        return [c / E for c in count], [min(c, E // g) for c in count], min(a, F // g)
    c = -(-E // F)
    holders: list[list[int]] = [[] for _ in range(E)]  # expert -> indices j of its holders, in rank order
    for j in range(F):
        for s_ in range(c):
            holders[(j * c + s_) % E].append(j)
    load = [0.0] * F
    held = [0] * F
    for hs in holders:
        q = len(hs)
        for index, j in enumerate(hs):
            load[j] += (a // q + (1 if index < a % q else 0)) / E
            # Only replicas that some attention rank routes to exist (placement() lists
            # exactly those): with a < q attention ranks, replicas a..q-1 are never made.
            held[j] += 1 if index < a else 0
    return load, held, min(min(len(hs), a) for hs in holders)


@dataclass
class GroupLayout:
    """Where the two groups sit: ranks, routing domains, expert placement, per-node shares
    and NIC split.

    Routing domains: the nodes are cut into domains of ``domain_nodes`` consecutive
    nodes; every domain holding attention ranks holds a replica of every expert, and its
    attention ranks send rows only to expert ranks of the domain, as
    :func:`domain_owners` (``strategy``) says."""

    attention_ranks: list[int]
    expert_ranks: list[int]
    num_experts: int
    strategy: str
    domain_nodes: int
    devices_per_node: int
    nodes: list[NodeShare]  # one per node of the cluster, in node order
    device_load: dict[int, float]  # expert rank -> rows per micro-batch, in attention devices' worth of tokens
    experts_held: dict[int, int]  # expert rank -> experts it holds
    min_replicas: int  # fewest replicas of any expert (all domains)

    @cached_property
    def max_load(self) -> float:
        """Routed rows on the busiest expert device per micro-batch, per (token x top_k) of one
        attention device: rows = tokens_per_attention_device x top_k x max_load."""
        return max(self.device_load.values())

    @cached_property
    def experts_per_device(self) -> int:
        return max(self.experts_held.values())

    @cached_property
    def distinct_nodes(self) -> list["NodeShare"]:
        return list(dict.fromkeys(self.nodes))

    def domains(self) -> list[list[int]]:
        """Ranks (attention and expert) of each routing domain."""
        per = self.domain_nodes * self.devices_per_node
        out: dict[int, list[int]] = {}
        for r in sorted(self.attention_ranks + self.expert_ranks):
            out.setdefault(r // per, []).append(r)
        return list(out.values())

    def owners(self) -> dict[int, tuple[int, ...]]:
        """attention rank -> expert rank per expert (the routing table, all domains)."""
        out: dict[int, tuple[int, ...]] = {}
        for domain in self.domains():
            members = set(domain)
            attention = [r for r in self.attention_ranks if r in members]
            experts = [r for r in self.expert_ranks if r in members]
            if attention:
                out.update(domain_owners(self.strategy, self.num_experts, attention, experts))
        return out

    def placement(self) -> list[list[int]]:
        """expert id -> the expert ranks that receive its rows (sorted)."""
        holders: list[set[int]] = [set() for _ in range(self.num_experts)]
        for own in self.owners().values():
            for e, r in enumerate(own):
                holders[e].add(r)
        return [sorted(h) for h in holders]

    def replica_group(self, expert: int = 0) -> list[int]:
        """Ranks that receive ``expert``'s rows, all domains (cheap: one expert only)."""
        E = self.num_experts
        ranks: set[int] = set()
        for domain in self.domains():
            members = set(domain)
            a = sum(1 for r in self.attention_ranks if r in members)
            experts = [r for r in self.expert_ranks if r in members]
            F = len(experts)
            if not a:
                continue
            if self.strategy == "pairs":
                ranks |= {experts[(t * E + expert) % F] for t in range(a)}
            else:
                c = -(-E // F)
                holders = [r for j, r in enumerate(experts) if any((j * c + s_) % E == expert for s_ in range(c))]
                ranks |= set(holders[:a])
        return sorted(ranks)

    @classmethod
    def build(
        cls,
        cluster,
        attention_ranks: list[int],
        expert_ranks: list[int],
        num_experts: int,
        *,
        strategy: str = "pairs",
        domain_nodes: int | None = None,
        nic_split: list[float] | None = None,
        transfer_bytes: tuple[float, float, float, float] | None = None,
        sync_bytes: tuple[float, float] | None = None,
    ) -> "GroupLayout":
        """``nic_split[n]``: NICs of node n given to its attention devices (the rest go to
        its experts). None chooses, per node, the split that minimises the node's slowest
        transfer of ``transfer_bytes`` = per-token (dispatch, combine, combine-grad,
        dispatch-grad) bytes (evaluated with TRANSFER_TIME); ties (no cross-node traffic)
        go to the split closest to the node's share of gradient all-reduce bytes,
        ``sync_bytes`` = (per attention device, per expert of all layers), or to the
        device ratio without it."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy {strategy!r}; choose from {STRATEGIES}")
        dpn, N = cluster.devices_per_node, cluster.num_nodes
        d = domain_nodes or N
        if N % d:
            raise ValueError(f"domain_nodes={d} does not divide the {N} nodes")
        per_domain = d * dpn
        E = num_experts
        attn_by_domain: dict[int, list[int]] = {}
        exp_by_domain: dict[int, list[int]] = {}
        for r in attention_ranks:
            attn_by_domain.setdefault(r // per_domain, []).append(r)
        for r in expert_ranks:
            exp_by_domain.setdefault(r // per_domain, []).append(r)
        load: dict[int, float] = {r: 0.0 for r in expert_ranks}
        held: dict[int, int] = {r: 0 for r in expert_ranks}
        min_replicas = math.inf
        for D, attention in attn_by_domain.items():
            experts = exp_by_domain.get(D)
            if not experts:
                raise ValueError(f"routing domain {D} (nodes {D * d}..{D * d + d - 1}) has attention ranks but no "
                                 "expert ranks")
            loads, counts, replicas = _domain_loads(strategy, E, len(attention), len(experts))
            for r, x, c in zip(experts, loads, counts):
                load[r], held[r] = x, c
            min_replicas = min(min_replicas, replicas)
        min_replicas = int(min_replicas) * len(attn_by_domain)  # every domain holds each expert
        domain_attention = {D: len(v) for D, v in attn_by_domain.items()}
        share = {r: load[r] / max(domain_attention.get(r // per_domain, 0), 1) for r in expert_ranks}
        attn_set = set(attention_ranks)
        nodes: list[NodeShare] = []
        chosen: dict[tuple, float] = {}
        NIC = cluster.nics_per_node
        for n in range(N):
            ranks = range(n * dpn, (n + 1) * dpn)
            a = sum(1 for r in ranks if r in attn_set)
            a_dom = domain_attention.get(n // d, 0)
            exp = [r for r in ranks if r in share]
            rows = sum(share[r] for r in exp) if a_dom else 0.0
            top = max((share[r] for r in exp), default=0.0) if a_dom else 0.0
            if a and exp:
                if NIC == 1:
                    na = 0.5
                elif nic_split is not None:
                    na = float(nic_split[n])
                else:
                    if sync_bytes is None:
                        weight = a / (a + len(exp))
                    else:
                        wa = a * sync_bytes[0]
                        we = sum(held[r] for r in exp) * sync_bytes[1]
                        weight = wa / (wa + we) if wa + we > 0 else a / (a + len(exp))
                    key = (a, a_dom, len(exp), rows, top, weight)
                    if key not in chosen:
                        chosen[key] = _best_nic_split(cluster, a, len(exp), a_dom, rows, top, transfer_bytes, weight)
                    na = chosen[key]
                ne = NIC - na if NIC > 1 else 0.5
            else:
                na, ne = (float(NIC), 0.0) if a else (0.0, float(NIC) if exp else 0.0)
            nodes.append(NodeShare(a, a_dom, len(exp), rows, top, na, ne))
        return cls(list(attention_ranks), list(expert_ranks), E, strategy, d, dpn, nodes, load, held, min_replicas)

    def nic_split(self) -> list[tuple[float, float]]:
        return [(n.nics_attention, n.nics_experts) for n in self.nodes]


def expert_owners(attention_ranks: list[int], placement: list[list[int]], domains: list[list[int]]) -> dict[int, tuple[int, ...]]:
    """Routing from a placement alone (manual plans): the t-th attention rank of a routing
    domain uses replica t mod q of the domain's q replicas of each expert."""
    out: dict[int, tuple[int, ...]] = {}
    for domain in domains:
        members = set(domain)
        peers = [r for r in attention_ranks if r in members]
        local = [[r for r in ranks if r in members] for ranks in placement]
        for e, ranks in enumerate(local):
            if peers and not ranks:
                raise ValueError(f"expert {e} has no replica in the routing domain of ranks {sorted(members)}")
        for t, rank in enumerate(peers):
            out[rank] = tuple(ranks[t % len(ranks)] for ranks in local)
    return out


def _best_nic_split(cluster, a: int, f: int, a_dom: int, rows: float, top: float, transfer_bytes,
                    weight: float) -> float:
    """NICs for the attention devices of a node: the split with the fastest slowest transfer;
    ties (e.g. no cross-node traffic) go to the split closest to ``weight`` x NICs."""
    if transfer_bytes is None:
        raise ValueError("GroupLayout.build needs nic_split or transfer_bytes to choose the NIC split")
    N = cluster.nics_per_node
    best, best_key = 1.0, (math.inf, math.inf)
    for na in range(1, N):
        node = NodeShare(a, a_dom, f, rows, top, float(na), float(N - na))
        t = max(
            _node_transfer(cluster, node, b, toward_experts=(i % 2 == 0), latency=0.0)
            for i, b in enumerate(transfer_bytes)
        )
        key = (round(t, 15), abs(na - N * weight))
        if key < best_key:
            best, best_key = float(na), key
    return best


def _node_transfer(cluster, node: NodeShare, per_device: float, *, toward_experts: bool,
                   latency: float | None = None, recorder=None, label=None) -> float:
    """One node's time for a transfer where every attention device exchanges ``per_device``
    bytes with the expert replicas of its routing domain (spread by row share)."""
    a, rows, top = node.attention, node.row_share, node.max_device_share
    attn_nic = a * per_device * (1.0 - rows)  # leaves/enters the node at its attention devices
    exp_nic = (node.domain_attention - a) * per_device * rows  # enters/leaves at its expert devices
    attn_link = per_device * rows if a else 0.0  # one attention device <-> local experts
    exp_link = a * per_device * top  # local attention devices <-> the busiest local expert
    cross = attn_nic > 1e-9 * per_device or exp_nic > 1e-9 * per_device
    if latency is None:
        latency = cluster.inter_node_latency if cross else (cluster.intra_node_latency if attn_link or exp_link else 0.0)
    n_a = node.nics_attention or 1.0
    n_e = node.nics_experts or 1.0
    if toward_experts:
        values = dict(nic_out=attn_nic, n_out=n_a, nic_in=exp_nic, n_in=n_e, link_out=attn_link, link_in=exp_link)
    else:
        values = dict(nic_out=exp_nic, n_out=n_e, nic_in=attn_nic, n_in=n_a, link_out=exp_link, link_in=attn_link)
    return TRANSFER_TIME(
        recorder, label, **values, bw_nic=cluster.nic_bandwidth, bw_link=cluster.intra_node_bandwidth, latency=latency
    )


def afpipe_transfer(cluster, layout: GroupLayout, per_device: float, *, toward_experts: bool,
                    recorder=None, label: str = "transfer") -> float:
    """Time of one micro-batch's transfer between the groups: the slowest node."""
    worst, worst_node = -1.0, None
    for node in layout.distinct_nodes:
        t = _node_transfer(cluster, node, per_device, toward_experts=toward_experts)
        if t > worst:
            worst, worst_node = t, node
    if recorder is not None:  # record the formula on the node that sets the time
        _node_transfer(cluster, worst_node, per_device, toward_experts=toward_experts, recorder=recorder, label=label)
    return worst


def group_span(ranks: list[int], devices_per_node: int) -> tuple[int, int]:
    """(most devices of the group on one node, nodes the group spans)."""
    per_node: dict[int, int] = {}
    for r in ranks:
        per_node[r // devices_per_node] = per_node.get(r // devices_per_node, 0) + 1
    return max(per_node.values()), len(per_node)


# ====================================================================== step times


def _stage_time(cluster, dtype: str, regions: list[RegionCost], seqs: float, backward: bool,
                recompute: bool = False) -> float:
    peak, bw = cluster.peak(dtype), cluster.memory_bandwidth
    total = 0.0
    for r in regions:
        flops = seqs * (r.bwd_flops if backward else r.fwd_flops)
        # backward reads the weights and writes their gradients; activations: read + grad written
        moved = (2.0 if backward else 1.0) * (r.weight_bytes + seqs * r.io_bytes)
        if backward and recompute and r.layered:
            flops += seqs * r.fwd_flops
            moved += r.weight_bytes + seqs * r.io_bytes
        total += REGION_TIME(F=flops, peak=peak, B=moved, mem_bw=bw)
    return total


def attention_times(work: Workload, cluster, seqs: float, recorder=None, recompute: bool = False) -> dict[str, float]:
    """Attention-side compute per micro-batch of ``seqs`` sequences: pre, one MoE layer's
    stage (mean over layers) and post, forward and backward (+ recomputation).

    ``attn_*`` and ``post_*`` are COMPUTE_ACTIONs (each one stage action, with the per-action
    overhead); ``pre_*`` is pure work, since it runs inside the first layer's stage action."""
    out = {}
    overhead = cluster.action_overhead
    for bwd in (False, True):
        sfx = "b" if bwd else "f"
        direction = "bwd" if bwd else "fwd"
        out[f"pre_{sfx}"] = _stage_time(cluster, work.dtype, work.pre, seqs, bwd, recompute)
        post = _stage_time(cluster, work.dtype, work.post, seqs, bwd, recompute)
        per_layer = [_stage_time(cluster, work.dtype, regs, seqs, bwd, recompute) for regs in work.layers]
        out[f"attn_{sfx}"] = COMPUTE_ACTION(recorder, f"attention stage action (mean over layers), {direction}, "
                                            f"{seqs:g} seq", t_work=sum(per_layer) / len(per_layer),
                                            overhead=overhead)
        out[f"post_{sfx}"] = COMPUTE_ACTION(recorder, f"post stage action, {direction}, {seqs:g} seq",
                                            t_work=post, overhead=overhead)
    if recorder is not None:  # record one representative region evaluation per stage kind
        for name, regs in (("pre", work.pre), ("attention stage", work.layers[0]), ("post", work.post)):
            if regs:
                r = max(regs, key=lambda x: x.fwd_flops)
                REGION_TIME(recorder, f"largest region of {name}, fwd, {seqs:g} seq",
                            F=seqs * r.fwd_flops, peak=cluster.peak(work.dtype),
                            B=r.weight_bytes + seqs * r.io_bytes, mem_bw=cluster.memory_bandwidth)
    return out


def expert_time(work: Workload, cluster, rows: float, experts_held: int, backward: bool, recorder=None,
                label: str = "experts", recompute: bool = False) -> float:
    """One expert action (EF or EB) of one micro-batch and MoE layer: COMPUTE_ACTION of its
    roofline time."""
    k = (3.0 if recompute else 2.0) if backward else 1.0
    work_time = REGION_TIME(
        recorder, label,
        F=k * rows * work.expert_flops_per_row,
        peak=cluster.peak(work.dtype),
        B=k * (experts_held * work.expert_weight_bytes + rows * work.expert_io_per_row),
        mem_bw=cluster.memory_bandwidth,
    )
    return COMPUTE_ACTION(recorder, f"{label}, one action", t_work=work_time, overhead=cluster.action_overhead)


def afpipe_stage_times(work: Workload, cluster, layout: GroupLayout, seqs_per_mb: float, recorder=None,
                       attn: dict | None = None, recompute: tuple[bool, bool] = (False, False)) -> dict[str, float]:
    """Per-micro-batch stage times of AF-pipe: attention side (pre, per layer, post), the
    busiest expert device, and the four transfers (slowest node), forward and backward.
    ``recompute`` = (attention side recomputes, experts recompute)."""
    S = work.seq_len
    t = dict(attn or attention_times(work, cluster, seqs_per_mb, recorder, recompute[0]))
    tokens = seqs_per_mb * S  # per attention device per micro-batch
    rows = tokens * work.top_k * layout.max_load  # on the busiest expert device
    held = layout.experts_per_device
    t["expert_f"] = expert_time(work, cluster, rows, held, False, recorder, "experts fwd, busiest device")
    t["expert_b"] = expert_time(work, cluster, rows, held, True, recorder, "experts bwd, busiest device",
                                recompute[1])
    for key, per_token, toward in (("dispatch", work.dispatch_per_token, True),
                                   ("combine", work.combine_per_token, False),
                                   ("combine_grad", work.combine_grad_per_token, True),
                                   ("dispatch_grad", work.dispatch_grad_per_token, False)):
        t[key] = afpipe_transfer(cluster, layout, tokens * per_token, toward_experts=toward, recorder=recorder,
                                 label=f"{key} per micro-batch (slowest node)")
    return t


def afpipe_step(work: Workload, stages: dict[str, float], m: int, rounds: int, sync: float,
                recorder=None) -> dict[str, float]:
    """AF-pipe step time from stage times (module docstring), with utilisation per group."""
    L = work.num_moe_layers
    t = dict(stages)
    for sfx in ("f", "b"):
        t[f"stage_{sfx}"] = ATTENTION_STAGE(recorder, f"attention stage, {'fwd' if sfx == 'f' else 'bwd'}",
                                            t_attn=t[f"attn_{sfx}"], t_pre=t[f"pre_{sfx}"],
                                            t_post=t[f"post_{sfx}"], L=L)
    fwd_stages = (t["stage_f"], t["dispatch"], t["expert_f"], t["combine"])
    bwd_stages = (t["stage_b"], t["combine_grad"], t["expert_b"], t["dispatch_grad"])
    for phase, st in (("fwd", fwd_stages), ("bwd", bwd_stages)):
        t[f"T_{phase}"] = PIPELINE_TIME(recorder, f"MoE pipeline, {phase}", L=L, m=m, t_b=max(st), R=sum(st))
    t["sync"] = sync
    t["step"] = STEP_TIME(recorder, "AF-pipe step", r=rounds, T_fwd=t["T_fwd"], T_bwd=t["T_bwd"], t_sync=sync, o=1)
    busy_a = rounds * m * (t["pre_f"] + t["post_f"] + t["pre_b"] + t["post_b"] + L * (t["attn_f"] + t["attn_b"]))
    busy_e = rounds * m * L * (t["expert_f"] + t["expert_b"])
    t["util_attention"] = busy_a / t["step"] if t["step"] > 0 else 0.0
    t["util_experts"] = busy_e / t["step"] if t["step"] > 0 else 0.0
    # ideal: every stage perfectly overlapped, only the busiest resource counts
    t["bubble"] = 1.0 - max(busy_a, busy_e) / t["step"] if t["step"] > 0 else 0.0
    return t


def afpipe_times(work: Workload, cluster, layout: GroupLayout, seqs_per_mb: int, m: int, rounds: int,
                 recorder=None, recompute: tuple[bool, bool] = (False, False)) -> dict[str, float]:
    """Predicted AF-pipe step (seconds) and its parts."""
    stages = afpipe_stage_times(work, cluster, layout, seqs_per_mb, recorder, recompute=recompute)
    return afpipe_step(work, stages, m, rounds, afpipe_sync(work, cluster, layout, recorder), recorder)


def afpipe_sync(work: Workload, cluster, layout: GroupLayout, recorder=None) -> float:
    """Gradient all-reduce time: the slower of the two groups' (:func:`afpipe_sync_parts`)."""
    return max(afpipe_sync_parts(work, cluster, layout, recorder))


def afpipe_sync_parts(work: Workload, cluster, layout: GroupLayout, recorder=None) -> tuple[float, float]:
    """(attention, experts) gradient all-reduce: attention parameters over the attention
    group, replicated experts over their replicas (each group on its own NIC share)."""
    dpn = cluster.devices_per_node
    nodes = layout.nodes
    g, k = group_span(layout.attention_ranks, dpn)
    nics = min(n.nics_attention * g / n.attention for n in nodes if n.attention)
    t_attn = ALLREDUCE_TIME(
        recorder, "all-reduce attention grads", bytes=work.attention_params * work.dtype_bytes,
        g=g, k=k, nics=nics, bw_link=cluster.intra_node_bandwidth, bw_nic=cluster.nic_bandwidth,
        lat_link=cluster.intra_node_latency, lat_nic=cluster.inter_node_latency,
    )
    if layout.min_replicas <= 1:
        return t_attn, 0.0
    g, k = group_span(layout.replica_group(0), dpn)
    nics = min(n.nics_experts * g / n.experts for n in nodes if n.experts)
    held = layout.experts_per_device
    t_exp = ALLREDUCE_TIME(
        recorder, "all-reduce replicated expert grads", bytes=held * work.params_per_expert * work.num_moe_layers
        * work.dtype_bytes, g=g, k=k, nics=nics, bw_link=cluster.intra_node_bandwidth,
        bw_nic=cluster.nic_bandwidth, lat_link=cluster.intra_node_latency, lat_nic=cluster.inter_node_latency,
    )
    return t_attn, t_exp


def ep_transfer(cluster, ep: int, per_device: float, recorder=None, label: str = "all-to-all") -> float:
    """All-to-all inside EP groups of ``ep`` consecutive ranks; each device sends
    ``per_device`` bytes spread evenly over the group (its own share stays local)."""
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
        d = ep_transfer(cluster, ep, tokens * work.dispatch_per_token, rec, f"{tag}: dispatch all-to-all")
        c = ep_transfer(cluster, ep, tokens * work.combine_per_token, rec, f"{tag}: combine all-to-all")
        gc = ep_transfer(cluster, ep, tokens * work.combine_grad_per_token)
        gd = ep_transfer(cluster, ep, tokens * work.dispatch_grad_per_token)
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


# ====================================================================== memory


def param_bytes(optimizer: str, dtype_bytes: int) -> tuple[float, float, float]:
    """(weight, gradient, optimizer) bytes per parameter."""
    return float(dtype_bytes), float(dtype_bytes), optimizer_bytes_per_param(optimizer, dtype_bytes)


def _attention_activations(work: Workload, seqs_in_flight: float, seqs_per_unit: float, recompute: bool,
                           recorder=None, label: str = "activations") -> float:
    if recompute:
        keep = work.num_decoder_layers * work.layer_input_bytes + work.attention_saved_unlayered
        transient = seqs_per_unit * work.attention_saved_layer_max
    else:
        keep, transient = work.attention_saved_bytes, 0.0
    return ACTIVATIONS(recorder, label, n=seqs_in_flight, keep=keep, transient=transient)


def _expert_activations(work: Workload, rows_in_flight: float, rows_per_unit: float, recompute: bool,
                        recorder=None, label: str = "activations") -> float:
    if recompute:
        keep, transient = work.expert_input_per_row, rows_per_unit * work.expert_saved_per_row
    else:
        keep, transient = work.expert_saved_per_row, 0.0
    return ACTIVATIONS(recorder, label, n=rows_in_flight, keep=keep, transient=transient)


def afpipe_memory(work: Workload, layout: GroupLayout, seqs_per_mb: int, m: int, optimizer: str,
                  shard_optimizer: bool, recorder=None, recompute: tuple[bool, bool] = (False, False)) -> dict[str, float]:
    w, g, o = param_bytes(optimizer, work.dtype_bytes)
    A = len(layout.attention_ranks)
    S, L = work.seq_len, work.num_moe_layers
    act_a = _attention_activations(work, m * seqs_per_mb, seqs_per_mb, recompute[0], recorder,
                                   "activations per attention device")
    attention = MEMORY(recorder, "memory per attention device", P=work.attention_params, w=w, grad=g, opt=o,
                       shard=A if shard_optimizer else 1, act=act_a)
    rows = seqs_per_mb * S * work.top_k * layout.max_load  # per micro-batch and layer, busiest device
    act_e = _expert_activations(work, m * L * rows, rows, recompute[1], recorder, "activations per expert device")
    # optimizer state of an expert is sharded over its replicas; use the least replicated one held
    held = layout.experts_per_device
    replicas = layout.min_replicas
    experts = MEMORY(recorder, "memory per expert device", P=held * work.params_per_expert * L, w=w, grad=g, opt=o,
                     shard=replicas if shard_optimizer else 1, act=act_e)
    return {"attention": attention, "experts": experts}


def ep_memory(work: Workload, cluster, ep: int, seqs: int, optimizer: str, shard_optimizer: bool,
              recorder=None, recompute: tuple[bool, bool] = (False, False)) -> float:
    w, g, o = param_bytes(optimizer, work.dtype_bytes)
    W = cluster.world_size
    S, L = work.seq_len, work.num_moe_layers
    act_a = _attention_activations(work, seqs, seqs, recompute[0], recorder, "EP activations: attention part")
    attention = MEMORY(recorder, "EP memory: attention part", P=work.attention_params, w=w, grad=g, opt=o,
                       shard=W if shard_optimizer else 1, act=act_a)
    rows = seqs * S * work.top_k
    act_e = _expert_activations(work, L * rows, rows, recompute[1], recorder, "EP activations: experts part")
    experts = MEMORY(recorder, "EP memory: experts part", P=work.num_experts // ep * work.params_per_expert * L,
                     w=w, grad=g, opt=o, shard=W // ep if shard_optimizer else 1, act=act_e)
    return attention + experts
