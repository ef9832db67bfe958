"""profile: a captured model -> per-region FLOPs and bytes (:class:`ModelProfile`).

Contract
--------
``profile(captured, batch_size, seq_len, dtype)`` runs the captured FX graph node by node
on fake meta tensors (no memory, no real compute: a full-size DeepSeek-V3 works) and
returns, for every region ``(kind, layer)`` of the region tags:

* forward FLOPs (``torch.utils.flop_counter.FlopCounterMode`` on each node's aten ops);
* backward FLOPs = 2 x forward (matmul-dominated regions: one matmul for the input
  gradient, one for the weight gradient) -- not measured;
* parameters and weight bytes at ``dtype``;
* activation bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``;
  each storage counted once, parameters and buffers excluded);
* memory traffic: bytes of the tensors each leaf module / op reads and writes
  (the activations; weights are counted separately);
* per MoE layer, the bytes of the activations live across its experts call (what a
  pipeline hop between attention groups carries at p > 1: ``hop_bytes``; under
  ``fused_attention`` without the S x S mask), and the
  attention-side parameters of each pipeline stage (``stage_params``);

all *per sequence*, as ``linear * S + quadratic * S**2`` (:class:`SeqCost`) fitted exactly
from two runs at ``seq_len`` and ``seq_len // 2``: attention FLOPs grow with S^2 and
the profile scales to any sequence length and micro-batch size.

The routed experts are not run (routing on fake tensors has no values); their cost is
analytic, assuming **uniform routing** (every expert gets the same share of the
``tokens x top_k`` routed rows, one per (token, expert) pair): FLOPs per routed row =
2 x (parameters of one expert);
saved activations per row = the expert input, the first projection's output, and the
activation output (+ the gated product for gated experts); traffic per row = inputs and
outputs of every projection and of the activation. Per MoE layer the profile also holds
the bytes of one *message row* crossing the attention/experts boundary: a token crosses as
one row per expert rank holding >= 1 of its top_k experts (the runtime's wire format,
``runtime/dispatch.py``), so a token sends between 1 and top_k rows; how many, on average,
depends on the routing table and is the cost model's (``formulas.ROWS_PER_RANK``,
``placement.expected_rows_per_token``). Per row, with K = top_k:

    dispatch  (attention -> experts, forward)  = H x dtype + K x (dtype (weight) + 4 (int32 local expert id))
    combine   (experts -> attention, forward)  = H x dtype   (the token's weighted expert outputs, summed)
    combine gradient  (attention -> experts)   = H x dtype
    dispatch gradient (experts -> attention)   = H x dtype + K x dtype (routing-weight gradients)

(slots of a row routed to another rank are padded: weight 0, id -1). Profiles written
before this format (``*_bytes_per_token`` fields, top_k rows per token) are read by
:meth:`ModelProfile.from_dict`, which checks them against the old format and replaces
them with these.

``fused_attention=True`` (the default) models the fused attention kernels GPUs train
with: the S^2 terms of saved activations and memory traffic (materialised attention
probabilities and masks, which eager attention keeps) are dropped; they stay in
``materialised_bytes`` for reference. FLOPs are unchanged (FlopCounterMode counts
the full S x S score matmuls, without causal skipping).

Batch-independent work (rotary tables, the mask) is amortised over ``batch_size``.
"""

from __future__ import annotations

import dataclasses
import operator
import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["SeqCost", "RegionProfile", "MoELayerProfile", "ModelProfile", "profile", "synthetic_profile", "ProfileError"]


class ProfileError(RuntimeError):
    """Profiling failed; the message names the node or argument."""


@dataclass(frozen=True)
class SeqCost:
    """A per-sequence cost: ``linear * S + quadratic * S**2`` for sequence length S."""

    linear: float = 0.0
    quadratic: float = 0.0

    def at(self, seq_len: float) -> float:
        return self.linear * seq_len + self.quadratic * seq_len * seq_len

    def __add__(self, other: "SeqCost") -> "SeqCost":
        return SeqCost(self.linear + other.linear, self.quadratic + other.quadratic)

    def scale(self, k: float) -> "SeqCost":
        return SeqCost(self.linear * k, self.quadratic * k)

    @staticmethod
    def fit(s1: int, per_seq1: Fraction, s2: int, per_seq2: Fraction) -> "SeqCost":
        """The exact a, c of a*S + c*S^2 through (s1, per_seq1) and (s2, per_seq2)."""
        c = (per_seq1 / s1 - per_seq2 / s2) / (s1 - s2)
        a = per_seq1 / s1 - c * s1
        return SeqCost(float(a), float(c))


@dataclass
class RegionProfile:
    kind: str
    layer: int | None
    params: int
    weight_bytes: int
    fwd_flops: SeqCost
    bwd_flops: SeqCost
    saved_bytes: SeqCost
    io_bytes: SeqCost
    materialised_bytes: SeqCost = SeqCost()  # S^2 bytes dropped by fused_attention (saved + traffic)
    modules: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}[{self.layer}]"


@dataclass
class MoELayerProfile:
    layer: int
    num_experts: int
    top_k: int
    hidden_size: int
    params_per_expert: int
    expert_weight_bytes: int  # one expert at dtype
    fwd_flops_per_row: float  # 2 x params_per_expert
    saved_bytes_per_row: float
    io_bytes_per_row: float
    # Bytes of one message row (one token to one expert rank; module docstring). The three
    # fields above ending in _per_row count routed (token, expert) pairs; these, message rows.
    dispatch_bytes_per_row: float
    combine_bytes_per_row: float
    combine_grad_bytes_per_row: float
    dispatch_grad_bytes_per_row: float
    # The shared-experts module an expert rank can run as an always-selected expert
    # (codegen.insert_dispatch.movable_shared_experts) and its parameter count; "" / 0: none.
    shared_module: str = ""
    shared_params: int = 0
    # Seconds-per-FLOP scales of the shared experts' region on each side, set by a profiling
    # step's calibration (planner/calibrate.py: each side's fit over every probe; 1: a priori).
    shared_k_attention: float = 1.0
    shared_k_experts: float = 1.0

    def dispatch_bytes(self, batch_size: int, seq_len: int, rows_per_token: float) -> float:
        """Bytes an attention rank sends to the experts for one micro-batch of this layer, when
        a token sends ``rows_per_token`` rows (1..top_k: ``placement.expected_rows_per_token``)."""
        return batch_size * seq_len * rows_per_token * self.dispatch_bytes_per_row

    def combine_bytes(self, batch_size: int, seq_len: int, rows_per_token: float) -> float:
        return batch_size * seq_len * rows_per_token * self.combine_bytes_per_row


@dataclass
class ModelProfile:
    model: str
    dtype: str
    dtype_bytes: int
    hidden_size: int
    num_layers: int
    seq_len: int  # the length it was measured at (costs scale to any length)
    batch_size: int
    fused_attention: bool
    regions: list[RegionProfile]
    moe: list[MoELayerProfile]
    profile_seconds: float = 0.0
    # Attention-side parameters (everything but the routed experts) per pipeline stage: stage s
    # holds what runs between MoE layer s-1's experts and MoE layer s's (stage J: after the
    # last). A parameter counts in the stage that first reads it. Empty: not measured
    # (synthetic profiles, older profile files).
    stage_params: list[int] = field(default_factory=list)
    # Per MoE layer, per sequence: bytes of the activations live across its experts call
    # (the residual stream and whatever later layers read: rotary tables, masks), i.e. what
    # a pipeline hop between attention groups carries. Empty: not measured.
    hop_bytes: list[SeqCost] = field(default_factory=list)

    # ------------------------------------------------------------------ queries
    def region(self, kind: str, layer: int | None = None) -> RegionProfile:
        for r in self.regions:
            if r.kind == kind and r.layer == layer:
                return r
        raise KeyError(f"no region {kind}[{layer}] in the profile of {self.model}")

    def total(self, attr: str, seq_len: int | None = None, batch_size: int = 1, kinds=None) -> float:
        """Sum of a SeqCost attribute over regions (optionally of some kinds), for a batch."""
        s = self.seq_len if seq_len is None else seq_len
        return batch_size * sum(getattr(r, attr).at(s) for r in self.regions if kinds is None or r.kind in kinds)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.regions)

    @property
    def active_params(self) -> float:
        """Parameters one token touches (routed experts: top_k of E)."""
        experts = sum(r.params for r in self.regions if r.kind == "experts")
        routed = sum(m.top_k * m.params_per_expert for m in self.moe)
        return self.total_params - experts + routed

    # ------------------------------------------------------------------ printing
    def table(self, seq_len: int | None = None, per_layer: bool = False) -> str:
        """Per region kind (identical layers folded), costs per sequence at ``seq_len``."""
        s = self.seq_len if seq_len is None else seq_len
        rows: list[tuple[str, list[RegionProfile]]] = []
        if per_layer:
            rows = [(r.name, [r]) for r in self.regions]
        else:
            groups: dict[tuple, list[RegionProfile]] = {}
            for r in self.regions:
                key = (r.kind, r.layer is None, r.params, r.fwd_flops, r.saved_bytes, r.io_bytes)
                groups.setdefault(key, []).append(r)
            for regs in groups.values():
                rows.append((_fold_name(regs), regs))
        header = f"{'region':<22} {'n':>3} {'params':>10} {'weights MB':>11} {'fwd GFLOP':>11} {'bwd GFLOP':>11} {'saved MB':>10} {'traffic MB':>11}"
        lines = [
            f"profile of {self.model}: dtype {self.dtype}, per sequence of {s} tokens"
            f"{' (fused attention)' if self.fused_attention else ''}; measured at batch {self.batch_size}, "
            f"seq {self.seq_len} in {self.profile_seconds:.2f} s",
            header,
        ]
        for name, regs in rows:
            r = regs[0]
            n = len(regs)
            lines.append(
                f"{name:<22} {n:>3} {_si(r.params):>10} {r.weight_bytes / 1e6:>11.2f} {r.fwd_flops.at(s) / 1e9:>11.3f} "
                f"{r.bwd_flops.at(s) / 1e9:>11.3f} {r.saved_bytes.at(s) / 1e6:>10.2f} {r.io_bytes.at(s) / 1e6:>11.2f}"
            )
        lines.append(
            f"{'total':<22} {len(self.regions):>3} {_si(self.total_params):>10} "
            f"{sum(r.weight_bytes for r in self.regions) / 1e6:>11.2f} {self.total('fwd_flops', s) / 1e9:>11.3f} "
            f"{self.total('bwd_flops', s) / 1e9:>11.3f} {self.total('saved_bytes', s) / 1e6:>10.2f} "
            f"{self.total('io_bytes', s) / 1e6:>11.2f}"
        )
        if self.moe:
            m = self.moe[0]
            lines.append(
                f"MoE layers: {len(self.moe)} x (E={m.num_experts}, top_k={m.top_k}, {_si(m.params_per_expert)} params "
                f"per expert); per row sent (one token to one expert rank; 1..{m.top_k} per token): dispatch "
                f"{m.dispatch_bytes_per_row:.0f} B, combine {m.combine_bytes_per_row:.0f} B (per sequence at one "
                f"row per token: {m.dispatch_bytes(1, s, 1) / 1e6:.2f} MB, {m.combine_bytes(1, s, 1) / 1e6:.2f} MB)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelProfile":
        data = dict(data)
        regions = []
        for r in data.pop("regions"):
            r = dict(r)
            for k in ("fwd_flops", "bwd_flops", "saved_bytes", "io_bytes", "materialised_bytes"):
                r[k] = SeqCost(**r[k])
            regions.append(RegionProfile(**r))
        moe = [MoELayerProfile(**_upgrade_moe(m, data["dtype_bytes"])) for m in data.pop("moe")]
        hop = [SeqCost(**c) for c in data.pop("hop_bytes", [])]
        return cls(regions=regions, moe=moe, hop_bytes=hop, **data)


def message_row_bytes(hidden: int, dtype_bytes: int, top_k: int) -> dict[str, float]:
    """Bytes of one message row of each boundary transfer (module docstring), as the
    ``*_bytes_per_row`` fields of :class:`MoELayerProfile`."""
    return {
        "dispatch_bytes_per_row": float(hidden * dtype_bytes + top_k * (dtype_bytes + 4)),
        "combine_bytes_per_row": float(hidden * dtype_bytes),
        "combine_grad_bytes_per_row": float(hidden * dtype_bytes),
        "dispatch_grad_bytes_per_row": float(hidden * dtype_bytes + top_k * dtype_bytes),
    }


_OLD_PER_TOKEN = ("dispatch_bytes_per_token", "combine_bytes_per_token", "combine_grad_bytes_per_token",
                  "dispatch_grad_bytes_per_token")


def _upgrade_moe(m: dict, dtype_bytes: int) -> dict:
    """A MoE layer entry of a profile file; one written with the old per-token fields (top_k
    rows per token) is checked against that format and given the per-row fields instead."""
    m = dict(m)
    if not any(k in m for k in _OLD_PER_TOKEN):
        return m
    H, K, d = m["hidden_size"], m["top_k"], dtype_bytes
    old = {"dispatch_bytes_per_token": K * (H * d + 4 + d), "combine_bytes_per_token": K * H * d,
           "combine_grad_bytes_per_token": K * H * d, "dispatch_grad_bytes_per_token": K * (H * d + d)}
    for key, want in old.items():
        if m.pop(key, None) != want:  # not the old wire format: nothing to convert it from
            raise ProfileError(f"MoE layer {m.get('layer')} of the profile file: {key} is missing or is not "
                               f"top_k x the old row (H = {H}, dtype {d} B): {want}; cannot convert it to bytes "
                               "per row")
    return {**m, **message_row_bytes(H, d, K)}


def _si(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _fold_name(regs: list[RegionProfile]) -> str:
    from fxdisag.planner.plan import _ranges

    layers = [r.layer for r in regs if r.layer is not None]
    if not layers:
        return regs[0].kind
    return f"{regs[0].kind}[{_ranges(layers)}]"


# ---------------------------------------------------------------------- measurement


@dataclass
class _Totals:
    flops: int = 0
    saved: int = 0
    io: int = 0


_NO_TRAFFIC = {operator.getitem, getattr}


class _Meter(fx.Interpreter):
    """Runs the graph on fake tensors, attributing FLOPs, saved and moved bytes to regions."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode, weights: set[int]):
        super().__init__(gm)
        self.counter = counter
        self.weights = weights  # ids of the fake parameters/buffers (not activations)
        self.totals: dict[tuple[str, int | None], _Totals] = {}
        self.current: _Totals | None = None
        self._seen: set[int] = set()
        self._keep: list[torch.Tensor] = []  # keeps counted storages alive so ids stay unique
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._order = order
        self._last_use = {n: max((order[u] for u in n.users), default=order[n]) for n in gm.graph.nodes}
        self.hop: dict[int, int] = {}  # MoE layer -> bytes live across its experts call

    def _live_bytes(self, at: fx.Node) -> int:
        """Bytes of the activations computed before ``at`` and read after it: what a
        pipeline hop at this experts call carries (inputs and constants excluded, each
        storage once)."""
        seen: set[int] = set()
        total = 0
        for node, value in self.env.items():
            if node.op in ("placeholder", "get_attr") or self._last_use[node] <= self._order[at]:
                continue
            for t in tree_leaves(value):
                if isinstance(t, torch.Tensor):
                    base = t._base if t._base is not None else t
                    if id(base) not in seen and id(base) not in self.weights:
                        seen.add(id(base))
                        total += base.numel() * base.element_size()
        return total

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        key = id(base)
        if key in self.weights or key in self._seen or self.current is None:
            return t
        self._seen.add(key)
        self._keep.append(base)
        self.current.saved += base.numel() * base.element_size()
        return t

    def run_node(self, n: fx.Node) -> Any:
        tag = n.meta.get("fxdisag_region")
        if tag is None:
            raise ProfileError(f"node {n.format_node()} has no fxdisag_region tag: profile needs a captured graph")
        totals = self.totals.setdefault((tag.kind, tag.layer), _Totals())
        self.current = totals
        before = self.counter.get_total_flops()
        if n.op == "call_module" and tag.kind == "experts":
            rows = self.env[n.args[0]]
            self.hop[tag.layer] = self._live_bytes(n)
            # Analytic (see module docstring): routing on fake tensors has no values.
            out = torch.empty_like(rows).requires_grad_(rows.requires_grad)
        else:
            out = super().run_node(n)
        totals.flops += self.counter.get_total_flops() - before
        if n.op in ("call_module", "call_function", "call_method") and n.target not in _NO_TRAFFIC and tag.kind != "experts":
            totals.io += self._traffic(n, out)
        return out

    def _traffic(self, n: fx.Node, out: Any) -> int:
        fresh = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t._base is None]
        if not fresh:  # views move no memory
            return 0
        ins = [t for t in tree_leaves(self.fetch_args_kwargs_from_env(n)) if isinstance(t, torch.Tensor)]

        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        read = sum(nbytes(t) for t in ins if id(t) not in self.weights and id(t._base) not in self.weights)
        return read + sum(nbytes(t) for t in fresh)


def _fake_parameters(gm: nn.Module, mode, dtype: torch.dtype):
    """Swap every parameter/buffer for a fake meta tensor (params cast to dtype); undo with restore()."""
    memo: dict[int, torch.Tensor] = {}
    saved = []

    def fake(t: torch.Tensor, cast: bool) -> torch.Tensor:
        if id(t) not in memo:
            target = dtype if cast and t.is_floating_point() else t.dtype
            f = mode.from_tensor(torch.empty_like(t, device="meta", dtype=target))
            if t.requires_grad:
                f.requires_grad_(True)
            memo[id(t)] = f
        return memo[id(t)]

    for mod in gm.modules():
        saved.append((mod, mod._parameters, mod._buffers))
        mod._parameters = {k: (None if v is None else fake(v, True)) for k, v in mod._parameters.items()}
        mod._buffers = {k: (None if v is None else fake(v, False)) for k, v in mod._buffers.items()}

    def restore() -> None:
        for mod, params, buffers in saved:
            mod._parameters, mod._buffers = params, buffers

    return {id(v) for v in memo.values()}, restore


def _measure(captured, batch_size: int, seq_len: int, dtype: torch.dtype) -> tuple[dict[tuple, _Totals], dict[int, int]]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    gm = captured.graph_module
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    weights, restore = _fake_parameters(gm, mode, dtype)
    counter = FlopCounterMode(display=False)
    meter = _Meter(gm, counter, weights)
    try:
        with mode:
            ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
            inputs = {
                "input_ids": ids,
                "labels": torch.zeros_like(ids),
                "attention_mask": torch.ones_like(ids),
            }
        with mode, counter, torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            meter.run(*(inputs[name] for name in captured.input_names))
    except Exception as exc:
        raise ProfileError(
            f"profiling {captured.layout.model_class} at batch {batch_size}, seq_len {seq_len} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    finally:
        restore()
    return meter.totals, meter.hop


def _region_params(captured) -> tuple[dict[tuple, int], dict[tuple, list[str]], list[int]]:
    """Parameters per region, the modules of each region, and attention-side parameters per
    pipeline stage (graph order: each experts call closes a stage)."""
    gm = captured.graph_module
    seen: set[int] = set()
    params: dict[tuple, int] = {}
    modules: dict[tuple, list[str]] = {}
    stage_params = [0]
    for n in gm.graph.nodes:
        tag = n.meta.get("fxdisag_region")
        if tag is None:
            continue
        key = (tag.kind, tag.layer)
        params.setdefault(key, 0)
        modules.setdefault(key, [])
        tensors: list[torch.Tensor] = []
        if n.op == "call_module":
            modules[key].append(n.target)
            tensors = list(gm.get_submodule(n.target).parameters())
        elif n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, nn.Parameter):
                tensors = [obj]
        for p in tensors:
            if id(p) not in seen:
                seen.add(id(p))
                params[key] += p.numel()
                if tag.kind != "experts":
                    stage_params[-1] += p.numel()
        if n.op == "call_module" and tag.kind == "experts":
            stage_params.append(0)
    return params, modules, stage_params


def _expert_row_costs(moe_layer, hidden: int, dtype_bytes: int) -> tuple[float, float]:
    """(saved bytes, traffic bytes) per routed row of one expert (analytic; see module docstring)."""
    mats = [shape[1:] for shape in moe_layer.expert_params.values() if len(shape) == 3]
    if not mats:
        raise ProfileError(f"experts module {moe_layer.experts} has no 3-D weight; cannot cost it")

    def other(dims):  # the non-hidden dimension of an [E, a, b] weight
        a, b = dims
        return b if a == hidden else a

    n_first, n_last = other(mats[0]), other(mats[-1])
    gated = n_first == 2 * n_last
    saved = hidden + n_first + n_last * (2 if gated else 1)
    traffic = sum(a + b for a, b in mats) + n_first + n_last
    return saved * dtype_bytes, traffic * dtype_bytes


def profile(
    captured,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype = torch.bfloat16,
    *,
    fused_attention: bool = True,
    name: str | None = None,
) -> ModelProfile:
    """Per-region costs of ``captured`` (see the module docstring), per sequence."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"profile: batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"profile: seq_len must be an int >= 2 (two lengths are measured), got {seq_len!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"profile: dtype must be a floating dtype, got {dtype}")
    t0 = time.perf_counter()
    built = captured  # the graph a build transforms: what it can move to expert ranks is read from it
    captured = captured.for_profile()  # runs on meta, at two sequence lengths
    layout = captured.layout
    dsize = torch.empty((), dtype=dtype).element_size()
    s1, s2 = seq_len, seq_len // 2
    measured = [_measure(captured, batch_size, s, dtype) for s in (s1, s2)]
    runs = [totals for totals, _ in measured]
    hops = [hop for _, hop in measured]
    params, modules, stage_params = _region_params(captured)
    moe_by_layer = {m.layer: m for m in layout.moe}
    from fxdisag.codegen.insert_dispatch import movable_shared_experts

    movable = {layout.moe[j].layer: fqn for j, fqn in movable_shared_experts(built.graph_module, built.layout).items()
               if isinstance(fqn, str)}
    hidden = layout.hidden_size

    def fit(attr: str, key) -> SeqCost:
        y1 = Fraction(getattr(runs[0].get(key, _Totals()), attr), batch_size)
        y2 = Fraction(getattr(runs[1].get(key, _Totals()), attr), batch_size)
        return SeqCost.fit(s1, y1, s2, y2)

    regions: list[RegionProfile] = []
    moe_profiles: list[MoELayerProfile] = []
    for key in runs[0]:
        kind, layer = key
        weight_bytes = params.get(key, 0) * dsize
        if kind == "experts":
            m = moe_by_layer[layer]
            per_expert = m.params_per_expert
            saved_row, io_row = _expert_row_costs(m, hidden, dsize)
            k = m.top_k
            moe_profiles.append(
                MoELayerProfile(
                    layer=layer,
                    num_experts=m.num_experts,
                    top_k=k,
                    hidden_size=hidden,
                    params_per_expert=per_expert,
                    expert_weight_bytes=per_expert * dsize,
                    fwd_flops_per_row=2.0 * per_expert,
                    saved_bytes_per_row=saved_row,
                    io_bytes_per_row=io_row,
                    **message_row_bytes(hidden, dsize, k),
                    shared_module=movable.get(layer, ""),
                    shared_params=sum(p.numel() for p in captured.model.get_submodule(movable[layer]).parameters())
                    if layer in movable else 0,
                )
            )
            fwd = SeqCost(2.0 * per_expert * k)
            saved, io, dropped = SeqCost(saved_row * k), SeqCost(io_row * k), SeqCost()
        else:
            fwd = fit("flops", key)
            saved, io = fit("saved", key), fit("io", key)
            dropped = SeqCost()
            if fused_attention:
                dropped = SeqCost(0.0, saved.quadratic + io.quadratic)
                saved, io = SeqCost(saved.linear), SeqCost(io.linear)
        regions.append(
            RegionProfile(
                kind=kind,
                layer=layer,
                params=params.get(key, 0),
                weight_bytes=weight_bytes,
                fwd_flops=fwd,
                bwd_flops=fwd.scale(2.0),
                saved_bytes=saved,
                io_bytes=io,
                materialised_bytes=dropped,
                modules=modules.get(key, []),
            )
        )
    hop_bytes = [SeqCost.fit(s1, Fraction(hops[0].get(m.layer, 0), batch_size),
                             s2, Fraction(hops[1].get(m.layer, 0), batch_size)) for m in moe_profiles]
    if fused_attention:  # a fused kernel takes no materialised S x S mask: none crosses the hop
        hop_bytes = [SeqCost(c.linear) for c in hop_bytes]
    missing = sorted(set(moe_by_layer) - {m.layer for m in moe_profiles})
    if missing:
        raise ProfileError(f"MoE layers {missing} of the layout have no experts node in the graph")
    return ModelProfile(
        model=name or layout.model_class,
        dtype=str(dtype).removeprefix("torch."),
        dtype_bytes=dsize,
        hidden_size=hidden,
        num_layers=layout.num_layers,
        seq_len=seq_len,
        batch_size=batch_size,
        fused_attention=fused_attention,
        regions=regions,
        moe=moe_profiles,
        profile_seconds=time.perf_counter() - t0,
        stage_params=stage_params,
        hop_bytes=hop_bytes,
    )


def synthetic_profile(
    *,
    num_layers: int,
    hidden_size: int,
    num_experts: int,
    top_k: int,
    params_per_expert: int,
    attention_flops_per_token: float,
    attention_flops_per_token2: float = 0.0,
    attention_params_per_layer: int = 0,
    attention_saved_per_token: float = 0.0,
    expert_saved_per_row: float = 0.0,
    head_flops_per_token: float = 0.0,
    head_params: int = 0,
    dtype_bytes: int = 2,
    seq_len: int = 1024,
    name: str = "synthetic",
) -> ModelProfile:
    """A hand-made profile of a homogeneous MoE model (every layer: attention + routed experts),
    for what-if planning and tests. Costs per sequence: attention ``attention_flops_per_token *
    S + attention_flops_per_token2 * S^2`` per layer, experts ``top_k * 2 * params_per_expert``
    FLOPs per token per layer, an optional head; backward = 2 x forward; no memory traffic
    beyond the weights."""
    dtype = {2: "bfloat16", 4: "float32"}[dtype_bytes]
    regions: list[RegionProfile] = []
    moe: list[MoELayerProfile] = []
    for layer in range(num_layers):
        attn = SeqCost(attention_flops_per_token, attention_flops_per_token2)
        regions.append(RegionProfile("attn", layer, attention_params_per_layer, attention_params_per_layer * dtype_bytes,
                                     attn, attn.scale(2.0), SeqCost(attention_saved_per_token), SeqCost()))
        fwd = SeqCost(2.0 * params_per_expert * top_k)
        regions.append(RegionProfile("experts", layer, num_experts * params_per_expert,
                                     num_experts * params_per_expert * dtype_bytes, fwd, fwd.scale(2.0),
                                     SeqCost(expert_saved_per_row * top_k), SeqCost()))
        moe.append(MoELayerProfile(
            layer=layer, num_experts=num_experts, top_k=top_k, hidden_size=hidden_size,
            params_per_expert=params_per_expert, expert_weight_bytes=params_per_expert * dtype_bytes,
            fwd_flops_per_row=2.0 * params_per_expert, saved_bytes_per_row=expert_saved_per_row,
            io_bytes_per_row=0.0,
            **message_row_bytes(hidden_size, dtype_bytes, top_k),
        ))
    if head_flops_per_token or head_params:
        head = SeqCost(head_flops_per_token)
        regions.append(RegionProfile("head", None, head_params, head_params * dtype_bytes, head, head.scale(2.0),
                                     SeqCost(), SeqCost()))
    return ModelProfile(model=name, dtype=dtype, dtype_bytes=dtype_bytes, hidden_size=hidden_size,
                        num_layers=num_layers, seq_len=seq_len, batch_size=1, fused_attention=True,
                        regions=regions, moe=moe)
