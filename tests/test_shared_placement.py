"""Where the shared experts run: the cost model's terms, the planner's decision, the Plan field.

The runtime's parity for both placements is ``test_runtime.py`` (attention group: CASES'
qwen2_moe / deepseek_v3; an expert rank: SHARED_CASES), the graph pass's
``test_passes.py``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import fxdisag
from fxdisag.planner import ClusterSpec
from fxdisag.planner.plan import Plan
from fxdisag.planner.search import candidate_memory, candidate_step, plan, shared_host_for
from fxdisag.planner.workload import Workload
from fxdisag.testing.models import example_batch, tiny_model

SEQ = 64


@pytest.fixture(scope="module")
def qwen2_profile():
    model = tiny_model("qwen2_moe", num_layers=3)
    return fxdisag.profile(fxdisag.capture(model, example_batch(model, 2, SEQ)), 1, SEQ, torch.float32)


def _cluster(world: int, bandwidth: float) -> ClusterSpec:
    # memory_bandwidth inf: every region time is its FLOPs over the peak (checked by hand below)
    return ClusterSpec.cpu(world, flops=50e9, bandwidth=bandwidth, action_overhead=1e-4).replace(
        memory_bandwidth=float("inf"))


def test_profile_names_the_movable_shared_experts(qwen2_profile):
    model = tiny_model("qwen2_moe", num_layers=3)
    for m in qwen2_profile.moe:
        # the MLP moves; Qwen2-MoE's sigmoid gate (Linear H -> 1) stays on the attention side
        assert m.shared_module == f"model.layers.{m.layer}.mlp.shared_expert"
        assert m.shared_params == sum(p.numel() for p in model.get_submodule(m.shared_module).parameters())
    plain = tiny_model("qwen3_moe")
    prof = fxdisag.profile(fxdisag.capture(plain, example_batch(plain, 1, 8)), 1, 8, torch.float32)
    assert [(m.shared_module, m.shared_params) for m in prof.moe] == [("", 0)] * len(prof.moe)
    assert Workload.from_profile(prof, 8).shared_region is None


def test_cost_model_moves_the_shared_region_to_the_expert_group(qwen2_profile):
    cluster = _cluster(4, 10e9)
    best = plan(qwen2_profile, cluster, 8, seq_len=SEQ, pipeline_depth=1, num_attention=1, baseline=False,
                shared_experts="attention")
    work = Workload.from_profile(qwen2_profile, SEQ)
    from fxdisag.planner.search import _search  # the candidate the pinned search chose

    cand, _ = _search(work, cluster, 8, float("inf"), "adam", True, [1], 32, 1, best.num_microbatches,
                      best.microbatch_size, best.schedule_kind)
    host = shared_host_for(cand)
    assert host == max(cand.layout.expert_ranks)  # equal loads: the last
    every = tuple(cand.layout.expert_ranks)
    off = candidate_step(work, cluster, cand)
    one = candidate_step(work, cluster, dataclasses.replace(cand, shared=(host,)))
    rep = candidate_step(work, cluster, dataclasses.replace(cand, shared=every))
    P, S, seqs, peak = work.shared_params, SEQ, cand.seqs, cluster.peak(work.dtype)
    A = len(cand.layout.attention_ranks)
    for on in (one, rep):  # the attention stage loses the region either way
        assert on["attn_f"] == pytest.approx(off["attn_f"] - 2 * P * S * seqs / peak, rel=1e-9)
        assert on["attn_b"] == pytest.approx(off["attn_b"] - 4 * P * S * seqs / peak, rel=1e-9)
    # one host computes every attention device's tokens; with a copy per expert rank the
    # busiest computes the tokens whose first expert it holds (2 of 4 experts: half)
    assert one["expert_f"] == pytest.approx(off["expert_f"] + A * 2 * P * S * seqs / peak, rel=1e-9)
    assert one["expert_b"] == pytest.approx(off["expert_b"] + A * 4 * P * S * seqs / peak, rel=1e-9)
    share = max(cand.layout.experts_held.values()) / 4
    assert rep["expert_f"] == pytest.approx(off["expert_f"] + share * A * 2 * P * S * seqs / peak, rel=1e-9)
    # 3 expert ranks holding 4 / 3 experts each (top-2 of 4): a token reaches the host already
    # with probability P_h; otherwise it sends one more row there (SHARED_ROWS). Copies on
    # every rank: no row more, one slot (4 + 4 bytes) more per dispatched row.
    from math import comb

    g = cand.layout.experts_held[host]
    P_h = 1 - comb(4 - g, 2) / comb(4, 2)
    r = cand.layout.rows_per_token(2)
    lat = cluster.inter_node_latency
    assert (one["combine"] - lat) == pytest.approx((off["combine"] - lat) * (r + 1 - P_h) / r, rel=1e-6)
    assert rep["combine"] == pytest.approx(off["combine"], rel=1e-9)
    assert (rep["dispatch"] - lat) == pytest.approx((off["dispatch"] - lat) * (work.dispatch_per_row + 8)
                                                    / work.dispatch_per_row, rel=1e-6)
    # ... and their gradients' all-reduce over the expert ranks follows the experts'
    from fxdisag.planner.cost_afpipe import afpipe_sync_parts, shared_sync

    t_attn, t_exp = afpipe_sync_parts(work, cluster, cand.layout)
    assert rep["sync"] == pytest.approx(max(t_attn, t_exp + shared_sync(work, cluster, cand.layout)), rel=1e-12)
    assert shared_sync(work, cluster, cand.layout) > 0 and one["sync"] == off["sync"]


@pytest.mark.parametrize("bandwidth, expect", [(0.05e9, "attention"), (10e9, "replicated")])
def test_auto_takes_the_fastest_placement(qwen2_profile, bandwidth, expect):
    """Attention-bound on a fast link: the expert ranks' idle time takes the shared experts;
    on a slow link the wider rows cost more than the attention stage saves."""
    cluster = _cluster(4, bandwidth)
    kw = dict(seq_len=SEQ, pipeline_depth=1, num_attention=1, baseline=False)
    auto = plan(qwen2_profile, cluster, 8, **kw)
    pinned = {k: plan(qwen2_profile, cluster, 8, shared_experts=k, **kw) for k in ("attention", "expert", "replicated")}
    assert pinned["attention"].shared_expert_ranks == []
    assert pinned["expert"].shared_expert_ranks == [max(pinned["expert"].expert_ranks)]
    assert pinned["replicated"].shared_expert_ranks == sorted(pinned["replicated"].expert_ranks)
    assert auto.step_time == min(p.step_time for p in pinned.values())
    assert auto.shared_expert_ranks == pinned[expect].shared_expert_ranks
    assert auto.step_time == pinned[expect].step_time
    (note,) = [n for n in auto.notes if n.startswith("shared experts:")]
    where = {"attention": "on the attention group, beside the dispatch",
             "replicated": "on every expert rank, each token's with its first routed expert"}[expect]
    assert note.startswith(f"shared experts: {where} (chosen; attention: step ")
    assert auto.explain().startswith(f"decision: {note}\n")
    if expect != "attention":  # the formulas behind the moved terms are in the explanation
        assert "shared experts on the busiest expert rank" in auto.explain()
        assert "all-reduce the shared experts' grads over the expert ranks" in auto.explain()
    assert "SHARED_ROWS" in pinned["expert"].explain()
    assert not any(n.startswith("shared experts:") for n in pinned["attention"].notes)


def test_plan_field_is_checked_and_round_trips():
    base = Plan.manual(1, 2, 4, 2)
    for hosts, words in (([2], "on expert rank 2"), ([2, 1], "on every expert rank (1-2)")):
        moved = dataclasses.replace(base, shared_expert_ranks=hosts)
        assert moved.shared_expert_ranks == sorted(hosts)
        assert Plan.from_json(moved.to_json()) == moved
        assert json.loads(moved.to_json())["binding"]["shared_expert_ranks"] == sorted(hosts)
        assert f"shared experts: {words}" in str(moved)
    with pytest.raises(ValueError, match=r"shared_expert_ranks=\[0\]; give one expert rank, every expert rank \[1, 2\]"):
        dataclasses.replace(base, shared_expert_ranks=[0])
    with pytest.raises(ValueError, match=r"shared_expert_ranks=\[1, 2\]; give one expert rank"):
        dataclasses.replace(Plan.manual(1, 3, 4, 2), shared_expert_ranks=[1, 2])  # a subset of 2 of 3
    with pytest.raises(ValueError, match="an AF-pipe plan of depth 1"):
        dataclasses.replace(Plan.expert_parallel(2, 4, 2), shared_expert_ranks=[1])
    with pytest.raises(ValueError, match="an AF-pipe plan of depth 1"):
        dataclasses.replace(Plan.manual(1, 1, 4, 2, pipeline_depth=2), shared_expert_ranks=[2])


def test_search_refuses_shared_experts_the_model_lacks():
    model = tiny_model("qwen3_moe")
    prof = fxdisag.profile(fxdisag.capture(model, example_batch(model, 1, 8)), 1, 8, torch.float32)
    with pytest.raises(ValueError, match="shared_experts='expert' but the profile has no shared experts"):
        plan(prof, _cluster(3, 1e9), 4, shared_experts="expert", baseline=False)
    with pytest.raises(ValueError, match="shared_experts='nowhere'; choose from"):
        plan(prof, _cluster(3, 1e9), 4, shared_experts="nowhere", baseline=False)
    assert plan(prof, _cluster(3, 1e9), 4, baseline=False).shared_expert_ranks == []


def test_hosts_hold_the_shared_experts_memory(qwen2_profile):
    """The hosts keep the shared experts' weights, gradients and optimizer state (the
    attention devices shed them); a placement that does not fit is refused when pinned and
    skipped by auto."""
    from fxdisag.planner.search import PlanError, _place_shared, _search

    cluster = _cluster(4, 10e9)
    work = Workload.from_profile(qwen2_profile, SEQ)
    cand, _ = _search(work, cluster, 8, float("inf"), "adam", True, [1], 32, 1, None, None, "gpipe")
    moved = dataclasses.replace(cand, shared=tuple(cand.layout.expert_ranks))
    off, on = (candidate_memory(work, cluster, c, "adam", False) for c in (cand, moved))
    L, P = work.num_moe_layers, work.shared_params
    per_param = 4 + 4 + 8  # fp32 weights, gradients and Adam's two moments, unsharded
    assert on["experts"] - off["experts"] == pytest.approx(P * L * per_param, rel=1e-9)
    assert off["attention"] - on["attention"] == pytest.approx(P * L * per_param, rel=1e-9)
    cap = off["experts"] + P * L * per_param / 2  # room for the routed experts, not for the shared ones
    with pytest.raises(PlanError, match="shared_experts='replicated' does not fit"):
        _place_shared(work, cluster, cand, "replicated", "adam", False, cap)
    kept, note = _place_shared(work, cluster, cand, "auto", "adam", False, cap)
    assert kept.shared == () and "replicated: step" in note and "does not fit in memory" in note
