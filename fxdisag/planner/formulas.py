"""The cost model's formulas: every formula once, as a sympy expression, and the record of
its evaluations.

Contract
--------
Each :class:`Formula` below is the single definition of one quantity. Numbers are
computed by calling the formula (a ``sympy.lambdify`` of the same expression), never by
a second hand-written copy, and :class:`Recorder` keeps the inputs and outputs of the
calls that produced a plan so that ``plan.explain()`` can print expression, values and
result side by side (:func:`explain`). ``FORMULAS`` maps each name to its formula.

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
                    At pipeline depth p the cycle is the ring of the p group pairs: L = laps =
                    ceil(J / p) (the MoE layers each group runs), R = the round trip of p layers,
                    t_b the busiest resource of one group.
    PIPELINE_1F1B   T = max(m n (t_fw + t_bw) - (t_fw + t_bw) + R_f + R_b,
                            (m / k) n (R_f + R_b) + (k - 1) (t_fw + t_bw))
                    1F1B over the ring with at most k micro-batches in flight: the busiest
                    resource's work (t_fw, t_bw per micro-batch and lap; m micro-batches x n
                    laps) plus one fill and drain, or, when
                    k is too small to fill the ring, m / k waves of k micro-batches each taking
                    one forward + backward chain n (R_f + R_b) (R_f, R_b: ring round trips)
    INTERLEAVED_1F1B T = (m + (pp - 1) / v) (t_F + t_B) + 2 (pp v - 1) t_p2p
                    Megatron-LM's interleaved 1F1B over pp pipeline stages of v virtual chunks
                    each: m micro-batches of per-device time t_F + t_B plus the bubble
                    (pp - 1) / v of them; the P2P sends between stages hide behind compute in
                    steady state, exposed on the first forward's and last backward's chain
    INTERLEAVED_IN_FLIGHT n = min(m, pp - s)                          v = 1 (plain 1F1B)
                          n = min(m, (2 (pp - s - 1) + (v - 1) pp + 1) / v)   v > 1
                    micro-batches (of the stage's layers) whose activations pipeline stage s
                    keeps at the end of Megatron-LM's warm-up; s = 0, v > 1 gives
                    pp (1 + (pp - 1) / (pp v)) (Korthikanti et al., 2022)
    STEP_TIME       T = r (T_fwd + T_bwd) + max(0, t_sync - o T_bwd)
                    r gradient-accumulation rounds; the gradient all-reduce hides behind
                    the last backward when o = 1, is fully exposed when o = 0
    ALLREDUCE_TIME  hierarchical ring: 2 (g-1)/g bytes / bw_link + 2 (k-1)/k bytes / (nics bw_nic)
                    + 2 (g-1) lat_link + 2 (k-1) lat_nic      (g devices per node, k nodes)
    MEMORY          M = P (w + g) + P o / s + A                   params P, bytes/param of weights
                    w, grads g, optimizer o (sharded s ways), activations A
    ACTIVATIONS     A = n keep + transient                        n sequences / rows in flight
    ROWS_PER_RANK   P = 1 - C(E - g, K) / C(E, K)
                    rows per token an attention rank sends to an expert rank that receives
                    the rows of g of the E experts from it: a token sends one row to every
                    expert rank holding >= 1 of its K = top_k experts (chosen uniformly,
                    without replacement), so P is the chance that >= 1 of the K falls among
                    the g. A token's rows (its distinct destination ranks) are the sum of P
                    over the ranks; every dispatch / combine byte count is rows x bytes per
                    row (``placement.expected_rows_per_token``)
    HOP_BYTES       h = h_live + r b_index
                    bytes per token a pipeline hop (p > 1) carries from attention group g to
                    g + 1 besides the experts' combine: the values live across the cut
                    (h_live, profiled per token: ``Workload.hop_per_seq`` / S) plus the
                    combine's row -> token index, b_index bytes (int64) for each of the
                    token's r message rows (its distinct destination expert ranks,
                    ROWS_PER_RANK summed), because the combine that reads it runs on g + 1
    SHARED_ROWS     r_s = r + 1 - P_h
                    message rows per token when an expert rank (the host) runs the shared
                    experts as an always-selected expert: the r routed rows, plus one to the
                    host unless the token reaches it already (P_h: ROWS_PER_RANK of the host)

The cost model built from them: the inputs (``workload.py``: :class:`Workload`), where
the two groups sit and what their transfers cost (``placement.py``), the step-time
models (``cost_afpipe.py``: AF-pipe at any pipeline depth; ``cost_megatron.py``: the
Megatron-LM PP x EP x DP baseline, all-to-all exposed and overlapped; ``cost_ep.py``: its
pp = 1 case, the runtime's EP mode) and per-device memory (``memory.py``).

Assumptions of the whole cost model, stated once: uniform routing (every expert gets the
same share of a token's top_k (token, expert) pairs); an attention rank sends all rows of
one expert to one expert rank (the routing table ``Plan.expert_owner``, which is what the
runtime's dispatch supports), so replicas balance load only across attention ranks;
transfers count distinct destination ranks: a token crosses as one row per expert rank
holding >= 1 of its top_k experts (ROWS_PER_RANK; the expert rank sums its experts'
weighted outputs), while expert compute and activations count the top_k pairs; backward
FLOPs and bytes are 2x forward; bytes per region = weights + activations read and written
by the region's leaf modules (no caching across regions); NIC sharing between devices of
a node (PXN-style) is free; a NIC shared by both groups of a node counts half for each;
the optimizer update itself is not timed.
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
    "PIPELINE_1F1B",
    "INTERLEAVED_1F1B",
    "INTERLEAVED_IN_FLIGHT",
    "ALLREDUCE_TIME",
    "MEMORY",
    "ACTIVATIONS",
    "ROWS_PER_RANK",
    "HOP_BYTES",
    "CHUNKED_SEGMENT",
    "SHARED_ROWS",
    "FORMULAS",
    "Evaluation",
    "explain",
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
        return sp.lambdify(syms, self.expr, modules=[{"Max": max, "Min": min, "binomial": _binomial}, "math"])

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


def _binomial(n: float, k: float) -> int:
    """C(n, k) exactly (integers; 0 when k > n): math's gamma form overflows at E = 256 and
    has poles where C(E - g, K) = 0."""
    if n != int(n) or k != int(k) or n < 0 or k < 0:
        raise ValueError(f"binomial({n}, {k}): needs non-negative integers")
    return math.comb(int(n), int(k))


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

_n, _k, _tf1, _tb1, _Rf, _Rb = _s("n k t_fw t_bw R_f R_b")
PIPELINE_1F1B = Formula(
    "PIPELINE_1F1B",
    sp.Max(_m * _n * (_tf1 + _tb1) - (_tf1 + _tb1) + _Rf + _Rb,
           _m / _k * _n * (_Rf + _Rb) + (_k - 1) * (_tf1 + _tb1)),
    "1F1B over the ring, at most k micro-batches in flight: the busiest resource's work on m micro-batches "
    "over n laps plus one fill and drain, or m / k waves of k micro-batches each one forward + backward "
    "chain n (R_f + R_b) long",
)

_pp, _v, _tF, _tB, _tp2p = _s("pp v t_F t_B t_p2p")
INTERLEAVED_1F1B = Formula(
    "INTERLEAVED_1F1B",
    (_m + (_pp - 1) / _v) * (_tF + _tB) + 2 * (_pp * _v - 1) * _tp2p,
    "Megatron-LM interleaved 1F1B: m micro-batches of per-device time t_F + t_B, the bubble (pp - 1) / v of "
    "them, and the P2P sends of the first forward's and the last backward's chain across pp v chunks",
)

_stage = sp.Symbol("s", nonnegative=True)
INTERLEAVED_IN_FLIGHT = Formula(
    "INTERLEAVED_IN_FLIGHT",
    sp.Min(_m, sp.Piecewise((_pp - _stage, sp.Eq(_v, 1)), ((2 * (_pp - _stage - 1) + (_v - 1) * _pp + 1) / _v, True))),
    "micro-batches whose activations pipeline stage s keeps in Megatron-LM's 1F1B (v = 1) or interleaved "
    "1F1B (v > 1) warm-up",
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

_keep, _transient = _s("keep transient")
ACTIVATIONS = Formula(
    "ACTIVATIONS",
    _n * _keep + _transient,
    "activation bytes: n units (sequences or expert rows) in flight keep `keep` bytes each; with "
    "recomputation, the one unit being recomputed needs `transient` more",
)

_E, _K, _g = _s("E K g")
ROWS_PER_RANK = Formula(
    "ROWS_PER_RANK",
    1 - sp.binomial(_E - _g, _K) / sp.binomial(_E, _K),
    "rows per token an attention rank sends to an expert rank receiving the rows of g of the E experts from "
    "it (one row per (token, expert rank holding >= 1 of its top_k = K), uniform routing); a token's rows = "
    "the sum over the expert ranks",
)

_h_live, _r, _b_index = _s("h_live r b_index")
HOP_BYTES = Formula(
    "HOP_BYTES",
    _h_live + _r * _b_index,
    "bytes per token a pipeline hop (p > 1) carries to the next attention group besides the combine: h_live of "
    "values live across the cut (profiled), plus the combine's row -> token index, b_index bytes for each of the "
    "token's r message rows",
)

_rc, _td, _te, _tc, _ad, _ae, _ac = _s("r t_d t_e t_c a_d a_e a_c")
_wd, _we, _wc = (_td - _ad) / _rc, _ae + (_te - _ae) / _rc, (_tc - _ac) / _rc
CHUNKED_SEGMENT = Formula(
    "CHUNKED_SEGMENT",
    _ad + _ac + _wd + _we + _wc + (_rc - 1) * sp.Max(_wd, _we, _wc),
    "one MoE layer's dispatch -> expert compute -> combine of a micro-batch in r equal chunks, a flow shop of "
    "three stages (the dispatch direction, the expert device, the combine direction): a chunk occupies a "
    "transfer direction for (t - a) / r (t: the whole transfer, a: its latency, a delay that holds no "
    "resource) and the expert device for a_e + (t_e - a_e) / r (a_e: one action's overhead). The first chunk "
    "goes through all three with both latencies, then the busiest stage paces the other r - 1 (equal chunks: "
    "every order of them takes as long). r = 1 is t_d + t_e + t_c",
)

_rs, _Ph = _s("r P_h")
SHARED_ROWS = Formula(
    "SHARED_ROWS",
    _rs + 1 - _Ph,
    "message rows per token with the shared experts on an expert rank (an always-selected expert): the token's "
    "r routed rows, plus one to the host unless one of its top_k experts is there already (P_h: ROWS_PER_RANK "
    "of the host's experts)",
)

FORMULAS: dict[str, Formula] = {
    f.name: f
    for f in (REGION_TIME, COMPUTE_ACTION, TRANSFER_TIME, ATTENTION_STAGE, PIPELINE_TIME, PIPELINE_1F1B,
              INTERLEAVED_1F1B, INTERLEAVED_IN_FLIGHT, STEP_TIME, ALLREDUCE_TIME, MEMORY, ACTIVATIONS,
              ROWS_PER_RANK, HOP_BYTES, CHUNKED_SEGMENT, SHARED_ROWS)
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
    lines = ["Formulas (fxdisag/planner/formulas.py):"]
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

