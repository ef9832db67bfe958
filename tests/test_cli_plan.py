"""`python -m fxdisag plan|simulate`, and the simulator against the roofline formula."""

import json
import math

import pytest

from fxdisag.cli import main
from fxdisag.cli_plan import simulate_plan
from fxdisag.planner import ClusterSpec, Plan, plan
from fxdisag.planner.profile import synthetic_profile

TINY = ["--model", "mixtral", "--cluster", "1x4xa100", "--seq-len", "64", "--global-batch", "8"]


def test_plan_prints_plan_baseline_speedup_utilisation_memory(capsys):
    assert main(["plan", *TINY, "--explain"]) == 0
    out = capsys.readouterr().out
    for text in ("Plan for mixtral on 1x4xa100", "attention ranks", "AF-pipe (this plan)",
                 "Megatron PPxEPxDP, a2a overlapped", "Megatron PPxEPxDP, a2a exposed", "utilisation: attention",
                 "memory per device", "PIPELINE_TIME =", "INTERLEAVED_1F1B ="):
        assert text in out


def test_plan_json_is_a_plan(capsys):
    assert main(["plan", *TINY, "--json"]) == 0
    result = Plan.from_json(capsys.readouterr().out)
    assert len(result.attention_ranks) + len(result.expert_ranks) == 4
    assert result.seq_len == 64 and result.global_batch == 8 and result.step_time > 0


def test_full_size_registry_model(capsys):
    args = ["plan", "--model", "mixtral-8x7b", "--layers", "2", "--cluster", "16x8xh800", "--seq-len", "4096",
            "--global-batch", "256", "--json"]
    assert main(args) == 0
    result = Plan.from_json(capsys.readouterr().out)
    assert len(result.attention_ranks) + len(result.expert_ranks) == 128
    assert result.num_moe_layers == 2 and result.baseline_step_time is not None


def test_user_errors_are_one_line(capsys):
    assert main(["plan", *TINY[:-1], "0"]) == 2
    assert "global_batch" in capsys.readouterr().err


def test_simulate_writes_trace(tmp_path, capsys):
    trace = tmp_path / "t.json"
    assert main(["simulate", *TINY, "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "simulated" in out and "bubble" in out and "exposed communication" in out
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("ph") == "X" for e in events)


def test_simulate_accepts_a_cluster_json(tmp_path, capsys):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(ClusterSpec.cpu(4, flops=1e12, bandwidth=1e9, latency=1e-5).to_dict()))
    assert main(["simulate", "--model", "mixtral", "--cluster", str(path), "--seq-len", "32", "--global-batch",
                 "4", "--dtype", "float32"]) == 0
    assert "simulated" in capsys.readouterr().out


@pytest.mark.parametrize("m", [2, 4])
def test_simulator_agrees_with_the_pipeline_formula_without_communication(m):
    # Two independent implementations (formulas.PIPELINE_TIME and runtime.simulate's event
    # loop) must agree when only compute remains: (L m + 1) t per phase, m >= 2.
    profile = synthetic_profile(num_layers=3, hidden_size=64, num_experts=4, top_k=2, params_per_expert=1000,
                                attention_flops_per_token=4000.0, seq_len=128, dtype_bytes=4)
    cluster = ClusterSpec.cpu(4, flops=1e12, bandwidth=math.inf, latency=0.0)
    result = plan(profile, cluster, 8, num_attention=2, num_microbatches=m, microbatch_size=1, pipeline_depth=1,
                  schedule="gpipe")
    sim, round_only, step, (a, f) = simulate_plan(result)
    assert (a, f) == (1, 1)
    assert step == pytest.approx(result.step_time, rel=1e-9)
    assert round_only.step_time == pytest.approx(result.breakdown["T_fwd"] + result.breakdown["T_bwd"], rel=1e-9)


@pytest.mark.parametrize("bandwidth,latency", [(1e9, 0.0), (3e7, 5e-6)])
def test_simulator_agrees_with_the_pipeline_formula_with_communication(bandwidth, latency):
    profile = synthetic_profile(num_layers=3, hidden_size=64, num_experts=4, top_k=2, params_per_expert=1000,
                                attention_flops_per_token=4000.0, seq_len=128, dtype_bytes=4)
    cluster = ClusterSpec.cpu(4, flops=1e12, bandwidth=bandwidth, latency=latency)
    for m in (1, 2, 4):
        result = plan(profile, cluster, 8, num_attention=2, num_microbatches=m, microbatch_size=1,
                      pipeline_depth=1, schedule="gpipe")
        _, _, step, _ = simulate_plan(result)
        assert step == pytest.approx(result.step_time, rel=0.01)


def test_plan_places_shared_experts_as_asked(capsys):
    qwen2 = ["--model", "qwen2_moe", "--cluster", "1x4xa100", "--seq-len", "64", "--global-batch", "8",
             "--pipeline-depth", "1"]
    assert main(["plan", *qwen2, "--shared-experts", "expert", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "shared experts: on expert rank 3, as an always-selected expert" in out
    assert "decision: shared experts: on expert rank 3 (pinned; attention: step " in out
    assert main(["plan", *qwen2, "--shared-experts", "replicated"]) == 0
    assert "shared experts: on every expert rank (2-3), each token's with its first routed expert" in \
        capsys.readouterr().out
    assert main(["plan", *qwen2, "--shared-experts", "attention", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["binding"]["shared_expert_ranks"] == []
