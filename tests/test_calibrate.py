"""The profiling-step calibration (fxdisag/planner/calibrate.py): the fit, what it changes in
the cost model, and a real probe on 2 ranks that leaves the model as it found it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from distributed import run_distributed
from fxdisag.planner import ClusterSpec
from fxdisag.planner.calibrate import Calibration, CalibrationError, SideFit, _probe_microbatches, fit_side
from fxdisag.planner.cost_afpipe import attention_times, expert_time
from fxdisag.planner.profile import synthetic_profile
from fxdisag.planner.workload import Workload


def _points(overhead, k, w, ns, noise=()):
    noise = list(noise) + [0.0] * len(ns)
    return [(n, w, n * overhead + k * w + e, 0.0) for n, e in zip(ns, noise)]


def test_fit_recovers_overhead_and_scale_and_takes_the_median_over_ranks():
    pts = {0: _points(1.3e-3, 1.7, 0.09, [6, 24, 96]),
           1: _points(1.1e-3, 1.5, 0.12, [6, 24, 96]),
           2: _points(0.9e-3, 2.5, 0.05, [6, 24, 96])}
    fit = fit_side(pts, fallback_overhead=0.0)
    assert fit.overhead == pytest.approx(1.1e-3, rel=1e-9)
    assert fit.k == pytest.approx(1.7, rel=1e-9)


def test_fit_is_least_squares_over_the_probes():
    # noise on the middle probe only moves the line by its least-squares share
    ns, noise = [6, 24, 96], [0.0, 0.006, 0.0]
    fit = fit_side({0: _points(1e-3, 1.0, 0.1, ns, noise)}, 0.0)
    slope = sum((n - 42) * (e - 0.002) for n, e in zip(ns, noise)) / sum((n - 42) ** 2 for n in ns)
    assert fit.overhead == pytest.approx(1e-3 + slope, rel=1e-9)


def test_a_negative_slope_means_no_overhead_and_one_probe_keeps_the_proxy():
    fit = fit_side({0: [(6, 0.1, 0.20, 0.0), (96, 0.1, 0.19, 0.0)]}, 0.0)
    assert fit.overhead == 0.0 and fit.k == pytest.approx(1.95)
    one = fit_side({0: [(6, 0.1, 0.112, 0.0)]}, fallback_overhead=2e-3)
    assert one.overhead == 2e-3 and one.k == pytest.approx(1.0)


def test_stages_that_are_all_overhead_fit_no_flop_term():
    fit = fit_side({0: [(4, 2e-4, 0.0025, 0.0), (8, 2e-4, 0.0042, 0.0), (32, 2e-4, 0.022, 0.0)]}, 0.0)
    assert fit.k == 0.0 and fit.overhead == pytest.approx((4 * 0.0025 + 8 * 0.0042 + 32 * 0.022) / (16 + 64 + 1024))


def test_a_fit_without_compute_is_an_error():
    with pytest.raises(CalibrationError, match="no compute time"):
        fit_side({0: [(6, 0.1, 0.0, 0.0), (96, 0.1, 0.0, 0.0)]}, 0.0)
    with pytest.raises(CalibrationError, match="no rank"):
        fit_side({}, 0.0)


def test_probe_microbatch_counts():
    assert _probe_microbatches(16, 16) == (1, 4, 16)
    assert _probe_microbatches(8, 16) == (1, 2, 8)  # 2 and 4 tie around sqrt(8): the smaller
    assert _probe_microbatches(32, 16) == (1, 4, 16)
    assert _probe_microbatches(1, 16) == (1,)
    assert _probe_microbatches(7, 16) == (1, 7)


def test_applied_calibration_prices_an_action_as_overhead_plus_k_times_the_work():
    prof = synthetic_profile(num_layers=4, hidden_size=256, num_experts=8, top_k=2, params_per_expert=3 * 256 * 512,
                             attention_flops_per_token=2e6, attention_params_per_layer=4 * 256 * 256,
                             head_flops_per_token=1e5, dtype_bytes=4)
    cluster = ClusterSpec.cpu(2, flops=80e9, bandwidth=0.05e9, action_overhead=3e-4)
    cal = Calibration(SideFit(1.2e-3, 1.8), SideFit(2.0e-3, 0.7), (1, 4, 16), "1A+1E", 1.0)
    prof2, cluster2 = cal.apply(prof, cluster)
    assert cluster2.memory_bandwidth == math.inf
    assert cluster2.action_overhead == 1.2e-3 and cluster2.expert_overhead == 2.0e-3
    assert cluster2.nic_bandwidth == cluster.nic_bandwidth and cluster2.inter_node_latency == cluster.inter_node_latency
    flat = cluster.replace(memory_bandwidth=math.inf, action_overhead=0.0)
    seq = 128
    w, w2 = Workload.from_profile(prof, seq), Workload.from_profile(prof2, seq)
    for seqs in (1, 4):
        base, tuned = attention_times(w, flat, seqs), attention_times(w2, cluster2, seqs)
        for key in ("attn_f", "attn_b", "post_f", "post_b"):
            assert tuned[key] == pytest.approx(1.2e-3 + 1.8 * base[key], rel=1e-9)
    for bwd in (False, True):
        assert expert_time(w2, cluster2, 4096, 4, bwd) == pytest.approx(
            2.0e-3 + 0.7 * expert_time(w, flat, 4096, 4, bwd), rel=1e-9)
    assert ClusterSpec.from_dict(cluster2.to_dict()) == cluster2
    old = cluster.to_dict()
    del old["expert_action_overhead"]  # JSON written before the field existed
    assert ClusterSpec.from_dict(old).expert_overhead == cluster.action_overhead


def _probe(rank: int, world: int) -> dict:
    import fxdisag
    from fxdisag.api import build
    from fxdisag.planner.calibrate import probe
    from fxdisag.planner.plan import Plan, contiguous_placement
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model("qwen3_moe")
    batch = example_batch(model, 8, 16)
    captured = fxdisag.capture(model, batch)
    cluster = ClusterSpec.cpu(world, flops=50e9, bandwidth=1e9)
    prof = fxdisag.profile(captured, 1, 16, torch.float32)
    plan = Plan(attention_ranks=[0], expert_ranks=[1, 2], expert_placement=contiguous_placement(8, [1, 2]),
                num_microbatches=1)
    for i, p in enumerate(model.parameters()):  # a user's gradients, e.g. mid-accumulation
        p.grad = torch.full_like(p, float(i)) if i % 3 == 0 else None
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    cal = probe(captured, batch, prof, cluster, plan, steps=1)
    kept = all((g is None and p.grad is None) or (g is not None and torch.equal(g, p.grad))
               for g, p in zip(grads, model.parameters()))
    # the same captured model still builds and trains after the probe's builds
    dmodel = build(captured, batch, plan)
    loss = dmodel(**batch).loss
    return {"cal": cal.to_dict(), "kept_grads": kept, "rng": torch.equal(rng, torch.get_rng_state()),
            "loss": loss.item(), "layers": len(captured.layout.moe)}


def _eager_routing(batch_size: int, seq: int, owner: list[int]) -> tuple[float, int]:
    """Eager's own routing: mean distinct expert ranks per token, and the busiest rank's pairs."""
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model("qwen3_moe")
    ids = []
    for layer in model.model.layers:
        layer.mlp.experts.register_forward_pre_hook(lambda mod, args: ids.append(args[1].clone()))
    model(**example_batch(model, batch_size, seq), use_cache=False)
    table = torch.tensor(owner)
    ranks = torch.cat([table[i] for i in ids])
    rows = sum(len(set(r.tolist())) for r in ranks) / ranks.shape[0]
    pairs = torch.bincount(ranks.flatten(), minlength=max(owner) + 1)
    return rows, int(pairs.max())


@pytest.mark.dist
def test_probe_fits_real_steps_and_leaves_the_model_as_it_was():
    from fxdisag.planner.placement import expected_rows_per_token
    from fxdisag.testing.models import example_batch, tiny_model

    results = run_distributed(_probe, 3, timeout=300)
    r0 = results[0]
    assert results[1]["cal"] == r0["cal"] == results[2]["cal"]  # one calibration on every rank
    assert all(r["kept_grads"] and r["rng"] for r in results)
    cal = r0["cal"]
    assert list(cal["microbatches"]) == [1, 2, 8]
    J = r0["layers"]
    for side, ranks, per_mb in (("attention", [0], 2 * (J + 1)), ("experts", [1, 2], 2 * J)):
        fit = cal[side]
        # tiny stages may be all overhead on a loaded host: k = 0 is a valid fit there
        assert fit["overhead"] >= 0 and fit["k"] >= 0 and fit["overhead"] + fit["k"] > 0
        for r in ranks:
            pts = fit["points"][r]
            # every compute action of the schedule was counted, at each probe's m
            assert [p[0] for p in pts] == [per_mb * m for m in cal["microbatches"]]
            assert all(p[1] > 0 and 0 < p[2] <= p[3] for p in pts)
            # the side's fit (median over its ranks) prices each probe of each rank within 2x
            assert all(0.5 * y <= n * fit["overhead"] + fit["k"] * w <= 2 * y for n, w, y, *_ in pts)
            # each timed step's compute is kept (one here), and the point's compute is their median
            assert all(p[4] == (p[2],) for p in pts)
    # the measured routing is eager's own routing on this placement (experts 0-3 on rank 1, 4-7 on rank 2)
    rows, busiest = _eager_routing(8, 16, [1] * 4 + [2] * 4)
    routing = cal["routing"]
    assert routing["rows_per_token"] == pytest.approx(rows, rel=1e-12)
    assert routing["busiest_pairs"] == pytest.approx(busiest, rel=1e-12)
    assert routing["modelled_rows_per_token"] == pytest.approx(expected_rows_per_token(8, 2, [4, 4]))
    assert routing["modelled_busiest_pairs"] == pytest.approx(8 * 16 * 2 * J / 2)
    model = tiny_model("qwen3_moe")
    assert abs(r0["loss"] - model(**example_batch(model, 8, 16), use_cache=False).loss.item()) <= 1e-5


def test_a_step_that_cannot_run_is_named():
    import fxdisag
    from fxdisag.planner.calibrate import probe
    from fxdisag.planner.plan import Plan
    from fxdisag.testing.models import example_batch, tiny_config, tiny_model

    from transformers import AutoModelForCausalLM

    cfg = tiny_config("qwen3_moe")
    batch = example_batch(cfg, 4, 16)
    plan = Plan(attention_ranks=[0], expert_ranks=[1], expert_placement=[[1]] * cfg.num_experts, num_microbatches=1)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    for model, b, match in ((meta, batch, "meta device"),
                            (tiny_model("qwen3_moe"), {k: v for k, v in batch.items() if k != "labels"}, "labels")):
        captured = fxdisag.capture(model, b)
        prof = fxdisag.profile(captured, 1, 16, torch.float32)
        with pytest.raises(CalibrationError, match=match):  # before any collective: no process group here
            probe(captured, b, prof, ClusterSpec.cpu(2, flops=50e9, bandwidth=1e9), plan)


def test_the_planner_takes_the_fewest_microbatches_among_near_ties():
    from fxdisag.planner.auto import runnable_plan
    from fxdisag.planner.search import plan

    prof = synthetic_profile(num_layers=2, hidden_size=256, num_experts=8, top_k=2, params_per_expert=3 * 256 * 256,
                             attention_flops_per_token=3e6, head_flops_per_token=1e5, dtype_bytes=4)
    cluster = ClusterSpec.cpu(2, flops=80e9, bandwidth=0.05e9, action_overhead=1e-3)
    steps = {m: plan(prof, cluster, 16, seq_len=128, num_attention=1, num_microbatches=m, microbatch_size=16 // m,
                     pipeline_depth=1, schedule="gpipe").step_time for m in (1, 2, 4, 8, 16)}
    fastest = min(steps, key=steps.get)
    assert runnable_plan(prof, cluster, 16, 128, tie=0.0)[0].num_microbatches == fastest
    for tie in (0.02, 0.05, 0.2, 1.0):
        chosen = runnable_plan(prof, cluster, 16, 128, tie=tie)[0]
        near = [m for m, t in steps.items() if t <= steps[fastest] * (1 + tie)]
        assert chosen.num_microbatches == min(near)
    assert len({runnable_plan(prof, cluster, 16, 128, tie=t)[0].num_microbatches for t in (0.0, 1.0)}) == 2


def test_measured_routing_scales_message_bytes_and_the_busiest_experts_compute():
    from fxdisag.planner.calibrate import MeasuredRouting

    prof = synthetic_profile(num_layers=2, hidden_size=256, num_experts=8, top_k=2, params_per_expert=3 * 256 * 256,
                             attention_flops_per_token=3e6, dtype_bytes=4)
    cluster = ClusterSpec.cpu(2, flops=80e9, bandwidth=0.05e9)
    plain = Calibration(SideFit(1e-3, 1.5), SideFit(1e-3, 0.8), (1, 4, 16), "1A+1E", 1.0)
    skewed = dataclasses.replace(plain, routing=MeasuredRouting(1.5, 1.2, 110.0, 100.0))
    (p1, _), (p2, _) = plain.apply(prof, cluster), skewed.apply(prof, cluster)
    for m1, m2 in zip(p1.moe, p2.moe):
        assert m2.fwd_flops_per_row == pytest.approx(m1.fwd_flops_per_row * 1.1)
        for f in ("dispatch_bytes_per_row", "combine_bytes_per_row", "combine_grad_bytes_per_row",
                  "dispatch_grad_bytes_per_row"):
            assert getattr(m2, f) == pytest.approx(getattr(m1, f) * 1.25)
    assert p2.regions == p1.regions
    assert "1.5 rows per token (uniform: 1.2)" in skewed.describe()


def test_the_local_fit_goes_through_the_probes_around_a_micro_batch_count():
    # compute not linear in the action count: 2 ms per action from m=1 to 4, 1 ms from 4 to 16
    w = 0.1
    pts = [(6, w, 0.140, 0.0), (24, w, 0.176, 0.0), (96, w, 0.248, 0.0)]
    fit = fit_side({0: pts}, 0.0)
    ms = (1, 4, 16)
    for m, (a, k) in ((1, (2e-3, 1.28)), (2, (2e-3, 1.28)), (4, (1e-3, 1.52)), (8, (1e-3, 1.52)), (16, (1e-3, 1.52)),
                      (32, (1e-3, 1.52))):
        got = fit.local(ms, m)
        assert got == pytest.approx((a, k), rel=1e-9), m
    for (n, _, y, _), m in zip(pts, ms):  # exact at every probe
        a, k = fit.local(ms, m)
        assert n * a + k * w == pytest.approx(y, rel=1e-9)
    cal = Calibration(fit, fit, ms, "1A+1E", 1.0, seqs_per_rank=16)
    assert cal.microbatches_for(4) == 4 and cal.microbatches_for(1) == 16


def test_a_choice_inside_the_probes_noise_goes_to_the_fewest_microbatches():
    from fxdisag.planner.auto import runnable_plan
    from fxdisag.planner.search import plan

    prof = synthetic_profile(num_layers=2, hidden_size=256, num_experts=8, top_k=2, params_per_expert=3 * 256 * 256,
                             attention_flops_per_token=3e6, head_flops_per_token=1e5, dtype_bytes=4)
    cluster = ClusterSpec.cpu(2, flops=80e9, bandwidth=0.05e9, action_overhead=1e-3)
    ms, w = (1, 4, 16), 0.05

    def side(overheads):  # one rank; each timed step with its own per-action overhead, k = 1.5
        steps = [[n * o + 1.5 * w for o in overheads] for n in (6, 24, 96)]
        return SideFit(0.0, 1.5, {0: [(n, w, sorted(ys)[1], 0.0, tuple(ys)) for n, ys in zip((6, 24, 96), steps)]})

    noisy = Calibration(fit_side(side((0.2e-3, 1.6e-3, 0.6e-3)).points, 0.0),
                        fit_side(side((0.2e-3, 1.2e-3, 0.5e-3)).points, 0.0), ms, "1A+1E", 1.0, seqs_per_rank=16)
    quiet = dataclasses.replace(  # the same median fit, no per-step times: nothing to resample
        noisy, attention=dataclasses.replace(noisy.attention, points={0: [p[:4] for p in noisy.attention.points[0]]}),
        experts=dataclasses.replace(noisy.experts, points={0: [p[:4] for p in noisy.experts.points[0]]}))
    assert len(noisy.resamples()) == 3 and quiet.resamples() == []

    def steps(cal):  # the pinned searches, each candidate with the fit around its m
        return {m: plan(*cal.apply(prof, cluster, cal.microbatches_for(16 // m)), 16, seq_len=128, num_attention=1,
                        num_microbatches=m, microbatch_size=16 // m, pipeline_depth=1,
                        schedule="gpipe", baseline=False).step_time for m in (1, 2, 4, 8, 16)}

    main, per_step = steps(noisy), [steps(c) for c in noisy.resamples()]
    assert steps(quiet) == main
    changed = False
    for tie in (0.0, 0.02, 0.05, 0.1, 0.2):
        near = {m for m, t in main.items() if t <= min(main.values()) * (1 + tie)}
        resolved = min(near)
        for s in per_step:
            near |= {m for m, t in s.items() if t <= min(s.values()) * (1 + tie)}
        chosen, notes = runnable_plan(prof, cluster, 16, 128, tie=tie, calibration=noisy)
        assert chosen.num_microbatches == min(near), tie
        assert runnable_plan(prof, cluster, 16, 128, tie=tie, calibration=quiet)[0].num_microbatches == resolved
        assert any("does not resolve" in n for n in notes) == (min(near) != resolved)
        changed |= min(near) != resolved
    assert changed  # the per-step fits decided at least one of these choices


def test_auto_solves_the_chosen_plans_chunks():
    """plan='auto' (a priori here: a given cluster, no profiling step) solves the chosen
    plan's chunks as plan(chunks=True) does for its split and micro-batches."""
    import fxdisag
    from fxdisag.planner.auto import auto_plan
    from fxdisag.planner.search import plan
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model("qwen3_moe")
    batch = example_batch(model, 4, 64)
    captured = fxdisag.capture(model, batch)
    slow = ClusterSpec.cpu(2, flops=80e9, bandwidth=0.02e9, latency=1e-5)  # the transfers dominate: chunks pay
    chosen = auto_plan(captured, batch, cluster=slow, num_microbatches=1)
    prof = fxdisag.profile(captured, 1, 64, torch.float32)
    pinned = plan(prof, slow, 4, seq_len=64, num_attention=len(chosen.attention_ranks), num_microbatches=1,
                  microbatch_size=chosen.microbatch_size, pipeline_depth=1, schedule="gpipe", chunks=True)
    assert chosen.chunks and chosen.chunks == pinned.chunks and chosen.step_time == pinned.step_time
    assert any(n.startswith("dispatch -> experts -> combine in") for n in chosen.notes)
    fast = ClusterSpec.cpu(2, flops=80e9, bandwidth=1e12, action_overhead=1e-2)  # each chunk's overhead is dear
    assert auto_plan(captured, batch, cluster=fast, num_microbatches=1).chunks == []
