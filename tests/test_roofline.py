"""The cost model: formulas against hand values, limit cases of the AF-pipe/EP comparison."""

import math

import pytest

from fxdisag.planner import ClusterSpec, plan
from fxdisag.planner.profile import synthetic_profile
from fxdisag.planner.formulas import (
    ALLREDUCE_TIME,
    PIPELINE_TIME,
    REGION_TIME,
    TRANSFER_TIME,
    Recorder,
    explain,
)

P = 1e12  # FLOP/s of every test device
S = 128
L = 4


def toy(attention_flops=4000.0, params_per_expert=1000, experts=4, top_k=2, **kw):
    """Every layer: attention `attention_flops` per token; experts 2*params*top_k per token."""
    return synthetic_profile(num_layers=L, hidden_size=64, num_experts=experts, top_k=top_k,
                             params_per_expert=params_per_expert, attention_flops_per_token=attention_flops,
                             seq_len=S, dtype_bytes=4, **kw)


# ---------------------------------------------------------------------- formulas


def test_region_time_is_the_roofline():
    assert REGION_TIME(F=2e12, peak=1e12, B=1e9, mem_bw=1e12) == 2.0  # compute-bound
    assert REGION_TIME(F=1e9, peak=1e12, B=3e12, mem_bw=1e12) == 3.0  # memory-bound


def test_transfer_time_takes_the_slowest_link_plus_latency():
    t = TRANSFER_TIME(nic_out=8e9, n_out=4, nic_in=2e9, n_in=1, link_out=1e9, link_in=0, bw_nic=1e9,
                      bw_link=1e10, latency=1e-3)
    assert t == pytest.approx(2.0 + 1e-3)  # 8 GB over 4 NICs = 2 s beats 2 GB over 1 NIC = 2 s, 0.1 s


def test_pipeline_time_limits():
    # one micro-batch: L round trips
    assert PIPELINE_TIME(L=3, m=1, t_b=2.0, R=2.0) == 6.0
    # resource-bound (m t_b >= R): (L m - 1) t_b + R
    assert PIPELINE_TIME(L=3, m=4, t_b=1.0, R=2.0) == (3 * 4 - 1) * 1.0 + 2.0
    # latency-bound (R > m t_b): L R + (m - 1) t_b
    assert PIPELINE_TIME(L=3, m=2, t_b=1.0, R=5.0) == 3 * 5.0 + 1.0


def test_allreduce_time():
    assert ALLREDUCE_TIME(bytes=1e9, g=1, k=1, nics=1, bw_link=1e9, bw_nic=1e9, lat_link=1, lat_nic=1) == 0.0
    t = ALLREDUCE_TIME(bytes=4e9, g=4, k=2, nics=2, bw_link=1e10, bw_nic=1e9, lat_link=1e-6, lat_nic=1e-5)
    assert t == pytest.approx(2 * 3 / 4 * 4e9 / 1e10 + 2 * 1 / 2 * 4e9 / 2e9 + 6e-6 + 2e-5)


def test_recorder_and_explain_show_formula_values_and_result():
    rec = Recorder()
    PIPELINE_TIME(rec, "demo", L=2, m=1, t_b=1.5, R=1.5)
    text = explain([e.to_dict() for e in rec.evaluations])
    assert "PIPELINE_TIME = R + t_b*(m - 1) + (L - 1)*Max(R, m*t_b)" in text
    assert "demo: PIPELINE_TIME(L=2, m=1, t_b=1.5, R=1.5) = 3" in text


def test_formula_rejects_missing_values():
    with pytest.raises(TypeError, match="REGION_TIME"):
        REGION_TIME(F=1.0, peak=1.0, B=1.0)


# ---------------------------------------------------------------------- limit cases

IDEAL = dict(flops=P, bandwidth=math.inf, latency=0.0)  # infinite network, no memory limit or traffic


@pytest.mark.parametrize("m", [2, 4, 8])
def test_infinite_bandwidth_leaves_only_the_bubble(m):
    # attention and experts cost the same per token: A = F = 2 balances them exactly, so the
    # AF-pipe step is the EP step plus one pipeline fill/drain per phase: ratio (Lm + 1) / (Lm).
    G = 16
    result = plan(toy(), ClusterSpec.cpu(4, **IDEAL), G, num_attention=2, num_microbatches=m)
    flops_per_token = 4000 + 2 * 1000 * 2  # attention + experts, forward
    ep_hand = 3 * L * (G / 4) * S * flops_per_token / P  # fwd + 2x bwd, every device a quarter
    af_hand = 3 * (L * m + 1) / m * (G / 2) * S * 4000 / P
    assert result.baseline_step_time == pytest.approx(ep_hand)
    assert result.baseline_step_time_overlap == pytest.approx(ep_hand)  # nothing to overlap
    assert result.step_time == pytest.approx(af_hand)
    assert result.speedup == pytest.approx(L * m / (L * m + 1))


def test_one_microbatch_idles_each_group_half_the_time():
    result = plan(toy(), ClusterSpec.cpu(4, **IDEAL), 16, num_attention=2, num_microbatches=1)
    assert result.speedup == pytest.approx(0.5)
    assert result.utilisation["attention"] == pytest.approx(0.5)
    assert result.utilisation["experts"] == pytest.approx(0.5)


def test_infinite_bandwidth_search_never_beats_ep():
    result = plan(toy(), ClusterSpec.cpu(4, **IDEAL), 16)
    assert result.speedup <= 1.0 + 1e-12
    assert len(result.attention_ranks) == 2  # the balanced split
    assert result.speedup == pytest.approx(L * 8 / (L * 8 + 1))  # the most micro-batches 16/2 allows


def test_zero_attention_cost_gives_all_but_one_device_to_experts():
    G = 12
    result = plan(toy(attention_flops=0.0, experts=6), ClusterSpec.cpu(4, **IDEAL), G)
    assert len(result.attention_ranks) == 1 and len(result.expert_ranks) == 3
    expert_work = 3 * L * G * S * (2 * 1000 * 2) / P  # fwd + bwd of all experts
    assert result.step_time == pytest.approx(expert_work / 3)  # split evenly over 3 devices, no bubble
    held = {r: sum(r in ranks for ranks in result.expert_placement) for r in result.expert_ranks}
    assert set(held.values()) == {2}


def test_one_attention_rank_cannot_spread_an_expert_over_replicas():
    # 4 experts on 3 expert devices: an attention rank sends each expert's rows to one replica
    # (Plan.expert_owner), so with one attention rank some device gets 2 of the 4 experts' rows.
    G = 12
    result = plan(toy(attention_flops=0.0, experts=4), ClusterSpec.cpu(4, **IDEAL), G, num_attention=1)
    expert_work = 3 * L * G * S * (2 * 1000 * 2) / P
    assert result.step_time == pytest.approx(expert_work / 2)
    rows = {}
    for e, r in enumerate(result.expert_owner(0)):
        rows[r] = rows.get(r, 0) + 1
    assert max(rows.values()) == 2


def test_more_microbatches_shrink_the_bubble():
    cluster = ClusterSpec.cpu(4, flops=P, bandwidth=1e9, latency=0.0)
    bubbles, steps = [], []
    for m in (1, 2, 4, 8):
        r = plan(toy(), cluster, 16, num_attention=2, num_microbatches=m, microbatch_size=1)
        assert r.num_microbatches == m and r.grad_accumulation == 8 // m
        bubbles.append(r.breakdown["bubble"])
        steps.append(r.step_time)
    assert bubbles == sorted(bubbles, reverse=True) and len(set(bubbles)) == 4
    assert steps == sorted(steps, reverse=True)


def test_compute_bound_and_network_bound_pick_different_splits():
    # experts cost 3x attention per token: compute-bound -> A:F = 1:3 (2:6 on 8 devices);
    # network-bound -> every row crosses a NIC once each way; attention and expert NICs
    # carry the same bytes in total, so A = F = 4 balances them.
    profile = toy(params_per_expert=3000)
    compute_bound = plan(profile, ClusterSpec.cpu(8, **IDEAL), 64)
    network_bound = plan(profile, ClusterSpec.cpu(8, flops=P, bandwidth=1e3, latency=0.0), 64)
    assert len(compute_bound.attention_ranks) == 2
    assert len(network_bound.attention_ranks) == 4


def test_attention_flops_grow_with_seq_len_squared_in_the_plan():
    quadratic = toy(attention_flops=0.0, attention_flops_per_token2=10.0, params_per_expert=1)
    cluster = ClusterSpec.cpu(2, **IDEAL)
    t1 = plan(quadratic, cluster, 4, seq_len=256, num_microbatches=1).breakdown["attn_f"]
    t2 = plan(quadratic, cluster, 4, seq_len=512, num_microbatches=1).breakdown["attn_f"]
    assert t2 == pytest.approx(4 * t1)


# ---------------------------------------------------------------------- per-action overhead


def test_compute_action_adds_the_overhead_once():
    from fxdisag.planner.formulas import COMPUTE_ACTION

    assert COMPUTE_ACTION(t_work=2.5, overhead=0.5) == 3.0
    assert COMPUTE_ACTION(t_work=2.5, overhead=0.0) == 2.5


@pytest.mark.parametrize("m", [2, 4])
def test_afpipe_pays_the_overhead_once_per_stage_and_microbatch(m):
    # The toy has no pre/post work and balanced groups (see the bubble test above). Per phase
    # the attention device runs m (L + 1) stage actions (L layer stages + the post stage) and
    # the pipeline fill/drain adds one expert action: the step grows by 2 (m (L + 1) + 1) o.
    # Charging per region, per layer only, or missing the post stage gives another count.
    o = 1e-3
    G = 16
    pinned = dict(num_attention=2, num_microbatches=m, microbatch_size=8 // m)
    with_o = plan(toy(), ClusterSpec.cpu(4, **IDEAL, action_overhead=o), G, **pinned)
    af_hand = 3 * (L * m + 1) / m * (G / 2) * S * 4000 / P  # the bubble test's step without overhead
    assert with_o.grad_accumulation == 1
    assert with_o.step_time == pytest.approx(af_hand + 2 * (m * (L + 1) + 1) * o)
    without = plan(toy(), ClusterSpec.cpu(4, **IDEAL), G, **pinned)
    for key, actions in (("attn_f", 1), ("attn_b", 1), ("post_f", 1), ("post_b", 1), ("pre_f", 0), ("pre_b", 0),
                         ("expert_f", 1), ("expert_b", 1), ("dispatch", 0), ("combine", 0)):
        assert with_o.breakdown[key] - without.breakdown[key] == pytest.approx(actions * o, abs=1e-15), key
    # busy time: m (L + 1) attention actions and m L expert actions per phase, 2 phases
    assert with_o.utilisation["attention"] * with_o.step_time == pytest.approx(
        without.utilisation["attention"] * without.step_time + 2 * m * (L + 1) * o)
    assert with_o.utilisation["experts"] * with_o.step_time == pytest.approx(
        without.utilisation["experts"] * without.step_time + 2 * m * L * o)
    assert "COMPUTE_ACTION = overhead + t_work" in with_o.explain()
    assert "t_work=" in with_o.explain() and "overhead=0.001" in with_o.explain()


def test_ep_pays_the_overhead_once_per_layer_and_microstep():
    # Per micro-step and phase an EP device runs L + 1 attention stage actions and L expert
    # actions, one after the other: + (2L + 1) o per phase. The two-half overlap runs every
    # action twice (once per half): + 2 (2L + 1) o per phase.
    o = 1e-3
    G = 16
    result = plan(toy(), ClusterSpec.cpu(4, **IDEAL, action_overhead=o), G, num_attention=2, num_microbatches=2)
    ep_hand = 3 * L * (G / 4) * S * (4000 + 2 * 1000 * 2) / P  # the bubble test's EP step
    for variant in ("no_overlap", "overlap"):  # PP 1: the baseline is plain EP x DP here
        config = result.baseline[variant]
        assert (config["pp"], config["v"], config["m"], config["seqs"]) == (1, 1, 1, 4)
    assert result.baseline_step_time == pytest.approx(ep_hand + 2 * (2 * L + 1) * o)
    assert result.baseline_step_time_overlap == pytest.approx(ep_hand + 2 * 2 * (2 * L + 1) * o)


def test_large_overhead_makes_the_search_pick_the_fewest_microbatches():
    # Free network, 1 s per action: every extra micro-batch costs 2 (L + 1) s of attention
    # actions while the bubble it removes is worth microseconds.
    G = 16
    big = plan(toy(), ClusterSpec.cpu(4, **IDEAL, action_overhead=1.0), G)
    A = len(big.attention_ranks)
    assert big.num_microbatches == 1 and big.grad_accumulation == 1
    assert big.microbatch_size == G // A


@pytest.mark.parametrize("bandwidth", [math.inf, 1e9, 1e6])
def test_zero_overhead_keeps_the_previous_choice(bandwidth):
    # action_overhead=0 is the model without the term: same choice and numbers as a spec
    # loaded from JSON written before the field existed (no action_overhead key), and as
    # the pinned-m expectations of the tests above (m = 8 on the free network).
    zero = ClusterSpec.cpu(4, flops=P, bandwidth=bandwidth, latency=0.0, action_overhead=0.0)
    old_json = {k: v for k, v in zero.to_dict().items() if k != "action_overhead"}
    old = plan(toy(), ClusterSpec.from_dict(old_json), 16)
    new = plan(toy(), zero, 16)
    key = lambda p: (p.attention_ranks, p.num_microbatches, p.microbatch_size, p.grad_accumulation, p.step_time,
                     p.baseline_step_time, p.baseline_step_time_overlap)
    assert key(new) == key(old)
    if math.isinf(bandwidth):
        assert new.num_microbatches == 8
    tiny = plan(toy(), zero.replace(action_overhead=1e-3), 16)
    if bandwidth >= 1e9:  # compute-bound: 1 ms per action outweighs the bubble of fewer micro-batches
        assert tiny.num_microbatches < new.num_microbatches
    else:  # 1 MB/s: seconds of transfers per step, the overhead hides behind them
        assert tiny.num_microbatches == new.num_microbatches
