"""The plan's binding part: what the runtime honours, and the clear errors when it cannot."""

from __future__ import annotations

import json

import pytest

from distributed import DistributedTestError, run_distributed
from fxdisag.planner.plan import BINDING_FIELDS, Plan


def test_json_separates_binding_from_advisory_fields():
    p = Plan.manual(1, 2, 4, 2)
    p.recompute = {"attention": True}
    p.step_time = 1.5
    data = json.loads(p.to_json())
    assert set(data) == {"binding", "advisory"}
    assert set(data["binding"]) == set(BINDING_FIELDS)
    assert data["binding"]["recompute"] == {"attention": True} and data["advisory"]["step_time"] == 1.5
    assert Plan.from_json(p.to_json()) == p


def test_expert_parallel_is_a_kind_of_plan():
    p = Plan.expert_parallel(2, 8, 4)
    assert p.kind == "ep" and p.attention_ranks == p.expert_ranks == [0, 1]
    assert p.expert_owner(1) == (0, 0, 0, 0, 1, 1, 1, 1)
    s = p.schedule(num_moe_layers=2)
    assert s.name == "ep" and s.role(0) == "AE"
    assert Plan.from_json(p.to_json()) == p
    assert str(p).startswith("Expert-parallel Plan")
    with pytest.raises(ValueError, match="every rank needs at least one expert"):
        Plan.expert_parallel(4, 2, 1)
    with pytest.raises(ValueError, match="disjoint"):
        Plan([0, 1], [1], [[1]], 1)
    with pytest.raises(ValueError, match="kind='ep'"):
        Plan([0, 1], [1], [[1]], 1, kind="ep")


def test_unsupported_binding_fields_are_refused_by_name():
    p = Plan.manual(1, 1, 4, 2, num_moe_layers=2)
    p.schedule_kind = "zb-v"
    with pytest.raises(ValueError, match=r"schedule_kind='zb-v': the runtime builds \('gpipe', '1f1b'\)"):
        p.schedule()
    p.schedule_kind = "1f1b"
    assert p.schedule().name == "1f1b"
    ep = Plan.expert_parallel(2, 4, 2)
    ep.schedule_kind = "1f1b"
    with pytest.raises(ValueError, match=r"runs \('gpipe', 'overlap'\) schedules only"):
        ep.schedule(2)
    p.schedule_kind = "gpipe"
    with pytest.raises(ValueError, match="num_moe_layers=2 but the model has 3 MoE layers"):
        p.schedule(3)
    with pytest.raises(ValueError, match=r"recompute names groups \['router'\]"):
        Plan.manual(1, 1, 4, 2).__class__([0], [1], [[1]], 1, recompute={"router": True})


def _wrong_batch(rank: int, world: int) -> None:
    import fxdisag
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model("mixtral")
    plan = Plan.manual(1, 1, 4, 2, microbatch_size=2)  # binds 1 x 2 x 2 = 4 sequences per call
    dmodel = fxdisag.disaggregate(model, example_batch(model, 4, 8), plan)
    dmodel(**example_batch(model, 8, 8))


@pytest.mark.dist
def test_a_batch_other_than_the_plan_binds_is_refused():
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_wrong_batch, 2, timeout=60)
    assert ("input_ids has batch size 8, but the plan binds micro-batches of 2 sequence(s): 1 attention rank(s) x 2 "
            "micro-batches x 2 = 4 sequences per call") in str(info.value)
