"""The baseline training systems run today: Megatron-LM's interleaved 1F1B pipeline with
expert and data parallelism (PP x EP x DP), its step time, memory and configuration search.

Contract
--------
:class:`MegatronConfig` is one configuration: ``pp`` pipeline stages of ``v`` virtual
chunks each, EP degree ``ep`` inside each stage, dense data parallelism dp = W / pp
(expert data parallelism W / (pp ep)), ``seqs`` sequences per device per micro-batch,
``m`` micro-batches per step, activation recomputation per part. The world is cut into
pp blocks of W / pp consecutive ranks (stage s = block s); EP groups are ep consecutive
ranks of a block. :func:`megatron_times` gives ``step_no_overlap`` and ``step_overlap``;
:func:`megatron_memory` the bytes on the fullest device; :func:`best_megatron` searches
the grid below for each variant on its own. Formulas (``formulas.py``)::

    per device and micro-batch, one chunk of c = ceil(J / (pp v)) layers, phase fwd/bwd:
      no overlap  t_chunk = PIPELINE_TIME(L=c, m=1, t_b=R, R)     R = t_a + t_d + t_e + t_c
      overlap     t_chunk = PIPELINE_TIME(L=c, m=2, t_b=max(t_a + t_e, t_d + t_c), R)
                  (two halves of the micro-batch: one's all-to-all hides behind the other's
                  compute, as DualPipe or --overlap-moe-expert-parallel-comm do)
      t_d, t_c (and gradients) = ep_transfer of the micro-batch's message rows: tokens x
      cost_ep.ep_rows_per_token (ROWS_PER_RANK: a token goes once to each EP rank holding
      >= 1 of its top_k experts) x bytes per row
      t_a = ATTENTION_STAGE(t_attn, t_pre, t_post, L = v c): the embedding on the first
      stage and head + loss on the last, spread over the device's layers (the slowest
      stage holds the larger of the two; pp = 1 holds both)
    t_F = v t_chunk_fwd, t_B = v t_chunk_bwd
    T_pipe = INTERLEAVED_1F1B(m, pp, v, t_F, t_B, t_p2p)    t_p2p: one micro-batch's S x H
                                                          activations to the next stage
    step = STEP_TIME(r=1, T_fwd=T_pipe - t_B, T_bwd=t_B, t_sync, o)
           o = 0 without overlap, 1 with (--overlap-grad-reduce behind the last backward)
    t_sync = ALLREDUCE_TIME(dense grads of a stage over its dp replicas)
           + ALLREDUCE_TIME(expert grads over their W / (pp ep) replicas)
    memory = MEMORY(dense params of the fullest stage, sharded over dp)
           + MEMORY(E / ep experts x the stage's MoE layers, sharded over W / (pp ep))
           + activations of INTERLEAVED_IN_FLIGHT(m, pp, v, s) micro-batches of the stage's layers
    (the fullest stage s). Recomputation as Megatron does it: the attention side keeps each
    layer's input (as AF-pipe's); the experts' recomputation recomputes the whole MoE
    block, keeping none of its dispatched rows and re-running the forward all-to-all in
    backward (AF-pipe's expert side keeps its received rows: nothing is re-sent).

At pp = 1, v = 1 this is the EP baseline of ``cost_ep.py`` with m accumulation rounds
(tested). The search grid: pp dividing W / tp with pp <= J; v = 1 at pp = 1, else v <= 16
dividing ceil(J / pp); ep dividing gcd(E, W / pp); seqs dividing ceil(G / dp) with
m = ceil(G / dp) / seqs (every micro-batch of the step in one pipeline flush, as Megatron
runs), m a multiple of pp when v > 1 (Megatron's rule); every recomputation choice;
tp = 1, and only for a variant where no tp = 1 configuration fits, tp > 1 dividing a node
(dp = W / (pp tp)). Exhaustive: no point of the grid is skipped except by exact rules: later recompute
options only add time (so the first that fits is the fastest), and a point whose
least-memory option (recomputing both) does not fit is skipped whole.

Tensor parallelism (tp > 1, with sequence parallelism, experts not tensor-parallel): a
TP rank computes 1/tp of its group's attention-side work and keeps 1/tp of its dense
parameters and activations; each layer adds an all-gather and a reduce-scatter of the
micro-batch's S x H activations over NVLink (one ALLREDUCE_TIME's worth) to the attention
stage, forward and backward; a rank dispatches its 1/tp of the tokens.

Assumptions (besides the cost model's, ``formulas.py``): pipeline stages hold equal layer counts; P2P sends hide behind
compute in steady state (overlap_p2p_comm) and are exposed only on the first forward's
and last backward's chain; the all-to-all sends one row per (token, EP rank holding >= 1
of its experts), as de-duplicating dispatchers do (DeepEP, Megatron's flex dispatcher;
the plain alltoall dispatcher sends top_k copies, which this baseline does not charge).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from fxdisag.planner.cost_afpipe import attention_times, expert_time
from fxdisag.planner.cost_ep import ep_rows_per_token, ep_transfer
from fxdisag.planner.formulas import (
    ACTIVATIONS,
    ALLREDUCE_TIME,
    ATTENTION_STAGE,
    INTERLEAVED_1F1B,
    INTERLEAVED_IN_FLIGHT,
    MEMORY,
    PIPELINE_TIME,
    STEP_TIME,
    TRANSFER_TIME,
)
from fxdisag.planner.memory import _attention_activations, _expert_activations, param_bytes
from fxdisag.planner.placement import group_span
from fxdisag.planner.workload import GroupShare, Workload

__all__ = ["VARIANTS", "MegatronConfig", "best_megatron", "megatron_memory", "megatron_times"]

VARIANTS = ("no_overlap", "overlap")
_RECOMPUTE = ((False, False), (False, True), (True, False), (True, True))


@dataclass(frozen=True)
class MegatronConfig:
    pp: int
    v: int
    ep: int
    seqs: int  # sequences per device per micro-batch
    m: int  # micro-batches per step
    recompute: tuple[bool, bool] = (False, False)  # (attention side, experts)
    tp: int = 1  # tensor parallelism of the dense part (with sequence parallelism), inside a node

    def dp(self, world: int) -> int:
        return world // (self.pp * self.tp)

    def describe(self, world: int, num_experts: int) -> str:
        parts = [f"PP {self.pp}" + (f" x {self.v} virtual" if self.v > 1 else ""),
                 *([f"TP {self.tp}"] if self.tp > 1 else []),
                 f"EP {self.ep} ({num_experts // self.ep} expert(s) per device)", f"DP {self.dp(world)}",
                 f"{self.m} micro-batch(es) of {self.seqs} sequence(s)"]
        on = [k for k, x in zip(("attention", "experts"), self.recompute) if x]
        return ", ".join(parts) + f", recompute {'+'.join(on) or 'none'}"

    def to_dict(self, world: int, num_experts: int) -> dict:
        d = asdict(self)
        d["recompute"] = {"attention": self.recompute[0], "experts": self.recompute[1]}
        d["dp"] = self.dp(world)
        d["description"] = self.describe(world, num_experts)
        return d


def _layers_per_chunk(work: Workload, cfg: MegatronConfig) -> int:
    return math.ceil(work.num_moe_layers / (cfg.pp * cfg.v))


def _p2p(work: Workload, cluster, cfg: MegatronConfig, recorder=None) -> float:
    """One micro-batch's activations (seqs x S x H) from a stage to the next: every device of
    a node sends at once over the node's NICs when the stages sit on different nodes."""
    if cfg.pp == 1:
        return 0.0
    per_device = cfg.seqs * work.seq_len * work.expert_input_per_row / cfg.tp  # sequence parallel: 1/tp each
    block = cluster.world_size // cfg.pp
    dpn = cluster.devices_per_node
    if block % dpn == 0:  # stages on different nodes
        vals = dict(nic_out=dpn * per_device, nic_in=dpn * per_device, n_out=cluster.nics_per_node,
                    n_in=cluster.nics_per_node, link_out=0.0, link_in=0.0, latency=cluster.inter_node_latency)
    else:
        vals = dict(nic_out=0.0, nic_in=0.0, n_out=1, n_in=1, link_out=per_device, link_in=per_device,
                    latency=cluster.intra_node_latency)
    return TRANSFER_TIME(recorder, "Megatron P2P send between stages, one micro-batch", **vals,
                         bw_nic=cluster.nic_bandwidth, bw_link=cluster.intra_node_bandwidth)


def _stage_extras(attn: dict, pp: int, sfx: str) -> tuple[float, float]:
    """(t_pre, t_post) of the slowest stage: both on one stage at pp = 1, else the larger."""
    pre, post = attn[f"pre_{sfx}"], attn[f"post_{sfx}"]
    if pp == 1:
        return pre, post
    return (pre, 0.0) if pre >= post else (0.0, post)


def megatron_sync(work: Workload, cluster, cfg: MegatronConfig, recorder=None, tag: str = "Megatron") -> float:
    """Dense gradients of the fullest stage over its dp replicas, then expert gradients over
    their W / (pp ep) replicas (sequential: the same links)."""
    W, dpn = cluster.world_size, cluster.devices_per_node
    block = W // cfg.pp
    share = work.group_share(cfg.pp, "contiguous", cfg.pp - 1)
    common = dict(bw_link=cluster.intra_node_bandwidth, bw_nic=cluster.nic_bandwidth,
                  lat_link=cluster.intra_node_latency, lat_nic=cluster.inter_node_latency)
    g, k = group_span(list(range(0, block, cfg.tp)), dpn)  # same TP rank of every DP replica
    t = ALLREDUCE_TIME(recorder, f"{tag}: all-reduce dense grads over DP", bytes=max(share.attention_params)
                       * work.dtype_bytes / cfg.tp, g=g, k=k, nics=cluster.nics_per_node * g / dpn, **common)
    if block // cfg.ep > 1:
        g, k = group_span(list(range(0, block, cfg.ep)), dpn)
        held = work.num_experts // cfg.ep
        t += ALLREDUCE_TIME(recorder, f"{tag}: all-reduce expert grads over expert DP",
                            bytes=held * work.params_per_expert * share.laps * work.dtype_bytes,
                            g=g, k=k, nics=cluster.nics_per_node * g / dpn, **common)
    return t


def megatron_times(work: Workload, cluster, cfg: MegatronConfig, recorder=None, variants=VARIANTS,
                   attn_cache: dict | None = None) -> dict[str, float]:
    """Step time of each variant (module docstring), and its parts."""
    S, K = work.seq_len, work.top_k
    held = work.num_experts // cfg.ep
    c = _layers_per_chunk(work, cfg)
    per_device_layers = cfg.v * c
    sync = megatron_sync(work, cluster, cfg, recorder)
    p2p = _p2p(work, cluster, cfg, recorder)
    out: dict[str, float] = {"sync": sync, "p2p": p2p}
    for variant in variants:
        halves = 1 if variant == "no_overlap" else 2
        tag = f"Megatron {variant.replace('_', ' ')}"
        part = cfg.seqs / halves / cfg.tp  # a TP rank computes 1/tp of its group's sequences' work
        key = (part, cfg.recompute[0])
        if attn_cache is not None and key in attn_cache:
            attn = attn_cache[key]
        else:
            attn = attention_times(work, cluster, part, recompute=cfg.recompute[0])
            if attn_cache is not None:
                attn_cache[key] = attn
        tokens = part * S
        rec = recorder
        ef = expert_time(work, cluster, tokens * K, held, False, rec, f"{tag}: experts fwd")
        eb = expert_time(work, cluster, tokens * K, held, True, rec, f"{tag}: experts bwd", cfg.recompute[1])
        rows = tokens * ep_rows_per_token(work, cfg.ep, rec, tag)  # message rows, not the top_k pairs
        d = ep_transfer(cluster, cfg.ep, rows * work.dispatch_per_row, rec, f"{tag}: dispatch all-to-all")
        cb = ep_transfer(cluster, cfg.ep, rows * work.combine_per_row, rec, f"{tag}: combine all-to-all")
        gc = ep_transfer(cluster, cfg.ep, rows * work.combine_grad_per_row)
        gd = ep_transfer(cluster, cfg.ep, rows * work.dispatch_grad_per_row)
        t_tp = 0.0
        if cfg.tp > 1:  # sequence parallel: all-gather before attention, reduce-scatter after, per layer
            t_tp = ALLREDUCE_TIME(rec, f"{tag}: TP all-gather + reduce-scatter, one layer",
                                  bytes=cfg.seqs / halves * S * work.expert_input_per_row, g=cfg.tp, k=1, nics=1,
                                  bw_link=cluster.intra_node_bandwidth, bw_nic=cluster.nic_bandwidth,
                                  lat_link=cluster.intra_node_latency, lat_nic=cluster.inter_node_latency)
        chunk = {}
        for phase, sfx, (t1, te, t2) in (("fwd", "f", (d, ef, cb)), ("bwd", "b", (gc, eb, gd))):
            pre, post = _stage_extras(attn, cfg.pp, sfx)
            ta = ATTENTION_STAGE(rec, f"{tag}: attention stage {phase}", t_attn=attn[f"attn_{sfx}"] + t_tp,
                                 t_pre=pre, t_post=post, L=per_device_layers)
            if phase == "bwd" and cfg.recompute[1]:  # a recomputed MoE block re-sends the forward all-to-all
                t1, t2 = t1 + d, t2 + cb
            R = ta + t1 + te + t2
            tb = R if halves == 1 else max(ta + te, t1 + t2)
            chunk[phase] = PIPELINE_TIME(rec, f"{tag}: one chunk of {c} layer(s), {phase}", L=c, m=halves, t_b=tb,
                                         R=R)
        t_F, t_B = cfg.v * chunk["fwd"], cfg.v * chunk["bwd"]
        pipe = INTERLEAVED_1F1B(rec, f"{tag}: interleaved 1F1B", m=cfg.m, pp=cfg.pp, v=cfg.v, t_F=t_F, t_B=t_B,
                                t_p2p=p2p)
        out[f"pipe_{variant}"] = pipe
        out[f"step_{variant}"] = STEP_TIME(rec, f"{tag}: step", r=1, T_fwd=pipe - t_B, T_bwd=t_B, t_sync=sync,
                                           o=0 if halves == 1 else 1)
    return out


def megatron_memory(work: Workload, cluster, cfg: MegatronConfig, optimizer: str, shard_optimizer: bool,
                    recorder=None, share: GroupShare | None = None) -> float:
    """Bytes on the fullest device: the largest over pipeline stages (module docstring)."""
    share = share or work.group_share(cfg.pp, "contiguous", cfg.pp - 1)
    per_stage = [_stage_memory(work, cluster, cfg, optimizer, shard_optimizer, share, s) for s in range(cfg.pp)]
    worst = max(range(cfg.pp), key=per_stage.__getitem__)
    if recorder is not None:
        _stage_memory(work, cluster, cfg, optimizer, shard_optimizer, share, worst, recorder)
    return per_stage[worst]


def _stage_memory(work: Workload, cluster, cfg: MegatronConfig, optimizer: str, shard_optimizer: bool,
                  share: GroupShare, stage: int, recorder=None) -> float:
    w, g, o = param_bytes(optimizer, work.dtype_bytes)
    W = cluster.world_size
    where = f" (stage {stage})" if cfg.pp > 1 else ""
    n = INTERLEAVED_IN_FLIGHT(recorder, f"Megatron: micro-batches in flight{where}", m=cfg.m, pp=cfg.pp, v=cfg.v,
                              s=stage)
    seqs = cfg.seqs / cfg.tp  # sequence parallel: a TP rank keeps 1/tp of the activations
    act_a = _attention_activations(work, n * seqs, seqs, cfg.recompute[0], recorder,
                                   f"Megatron activations: dense part{where}", share, stage)
    dense = MEMORY(recorder, f"Megatron memory: dense part{where}", P=share.attention_params[stage] / cfg.tp, w=w,
                   grad=g, opt=o, shard=cfg.dp(W) if shard_optimizer else 1, act=act_a)
    rows = seqs * work.seq_len * work.top_k
    layers = share.moe_layers[stage]
    if cfg.recompute[1]:  # the MoE block recomputed: no dispatched row is kept, backward re-runs its all-to-all
        act_e = ACTIVATIONS(recorder, f"Megatron activations: experts part{where}, full-layer recompute", n=0.0,
                            keep=0.0, transient=rows * work.expert_saved_per_row)
    else:
        act_e = _expert_activations(work, n * layers * rows, rows, False, recorder,
                                    f"Megatron activations: experts part{where}")
    experts = MEMORY(recorder, f"Megatron memory: experts part{where}",
                     P=work.num_experts // cfg.ep * work.params_per_expert * layers, w=w, grad=g, opt=o,
                     shard=W // (cfg.pp * cfg.ep) if shard_optimizer else 1, act=act_e)
    return dense + experts


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def megatron_grid(work: Workload, cluster, global_batch: int, tps=(1,)):
    """Every configuration of the search grid (module docstring) with TP degree in ``tps``,
    without recomputation."""
    W, J, E = cluster.world_size, work.num_moe_layers, work.num_experts
    for tp in tps:
        if cluster.devices_per_node % tp or W % tp:
            continue
        for pp in _divisors(W // tp):
            if pp > J:
                continue
            vs = [1] if pp == 1 else [v for v in _divisors(math.ceil(J / pp)) if v <= 16]
            dp = W // (pp * tp)
            s_dev = math.ceil(global_batch / dp)
            for ep in _divisors(math.gcd(E, W // pp)):
                for v in vs:
                    for seqs in _divisors(s_dev):
                        m = s_dev // seqs
                        if v > 1 and m % pp:
                            continue
                        yield MegatronConfig(pp, v, ep, seqs, m, tp=tp)


def tp_degrees(cluster) -> list[int]:
    """TP degrees above 1 the search tries when nothing fits without: divisors of a node."""
    return [t for t in _divisors(cluster.devices_per_node) if t > 1]


def best_megatron(work: Workload, cluster, global_batch: int, optimizer: str, shard: bool, cap: float,
                  ) -> dict[str, tuple[float, MegatronConfig] | None]:
    """Per variant, (predicted step, configuration) of the fastest configuration that fits,
    or None when none fits."""
    best: dict[str, tuple[float, MegatronConfig] | None] = {v: None for v in VARIANTS}
    cache: dict = {}
    for tps in ((1,), tp_degrees(cluster)):
        open_variants = [v for v in VARIANTS if best[v] is None]  # TP only where nothing fits without it
        if not open_variants:
            break
        for base in megatron_grid(work, cluster, global_batch, tps):
            least = MegatronConfig(base.pp, base.v, base.ep, base.seqs, base.m, (True, True), base.tp)
            if megatron_memory(work, cluster, least, optimizer, shard) > cap:
                continue  # recomputing everything needs the least memory: nothing of this point fits
            for recompute in _RECOMPUTE:
                cfg = MegatronConfig(base.pp, base.v, base.ep, base.seqs, base.m, recompute, base.tp)
                if megatron_memory(work, cluster, cfg, optimizer, shard) > cap:
                    continue
                times = megatron_times(work, cluster, cfg, attn_cache=cache)
                for variant in open_variants:
                    t = times[f"step_{variant}"]
                    if best[variant] is None or t < best[variant][0] * (1 - 1e-12):
                        best[variant] = (t, cfg)
                break  # later recompute options only add work
    return best
