"""Every registry model planned at paper scale (#9): 16x8xh800, global batch 256, 4K and 16K
tokens. AF-pipe and the Megatron-LM baseline both get a plan, or the error names the
smallest cluster that fits (deepseek-v3 with fp32 Adam states: 671B x 16 bytes does not fit
128 x 80 GB)."""

import pytest

from fxdisag.cli_plan import model_profile
from fxdisag.planner import ClusterSpec, PlanError, plan
from fxdisag.testing.models import REGISTRY

CLUSTER = ClusterSpec.parse("16x8xh800")
TOO_BIG = {"deepseek-v3"}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_model_gets_a_plan_at_4k_and_16k(name):
    prof = model_profile(name, 4096)  # costs are exact polynomials in S: one profile serves both lengths
    for seq_len in (4096, 16384):
        if name in TOO_BIG:
            with pytest.raises(PlanError, match=r"smallest cluster of this device that fits: (\d+)x8xh800"):
                plan(prof, CLUSTER, 256, seq_len=seq_len)
            continue
        result = plan(prof, CLUSTER, 256, seq_len=seq_len)
        cap = result.memory_per_device["capacity"]
        assert result.step_time > 0 and result.baseline_step_time > 0 and result.baseline_step_time_overlap > 0
        assert all(v <= cap * (1 + 1e-12) for v in result.memory_per_device.values())
        assert set(result.baseline) == {"no_overlap", "overlap"}
        assert len(result.attention_ranks) + len(result.expert_ranks) == 128


def test_the_named_cluster_fits_deepseek_v3():
    prof = model_profile("deepseek-v3", 4096)
    with pytest.raises(PlanError) as info:
        plan(prof, CLUSTER, 256)
    nodes = int(str(info.value).split("fits: ")[1].split("x")[0])
    result = plan(prof, CLUSTER.replace(num_nodes=nodes), 256, baseline=False)
    assert result.step_time > 0
