"""The multi-stage ring schedule: Stages, the hop kinds, ring_schedule's validity and shape."""

import math

import expecttest
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxdisag.schedule import ActionKind, ScheduleError, Stages, af_pipe_schedule, ring_schedule, validate
from fxdisag.schedule.actions import Action
from fxdisag.schedule.simulate import UniformLink, simulate

K = ActionKind
IDEAL = UniformLink(math.inf, 0.0)


def groups(p, a, e):
    ranks = iter(range(p * (a + e)))
    attention = [tuple(next(ranks) for _ in range(a)) for _ in range(p)]
    experts = [tuple(next(ranks) for _ in range(e)) for _ in range(p)]
    return attention, experts


def unit_costs(rank, action):
    return {K.F: 1.0, K.EF: 1.0, K.B: 2.0, K.EB: 2.0}.get(action.kind, 0.0)


def live_peak(schedule, rank):
    """Most micro-batches between their first forward and their last backward on ``rank``."""
    g, _ = schedule.stages.attention_slot(rank)
    first = min(schedule.stages.stages_of(g))
    live, peak = set(), 0
    for a in schedule.actions[rank]:
        if a.kind is K.F:
            live.add(a.microbatch)
        elif a.kind is K.B and a.stage == first:
            live.discard(a.microbatch)
        peak = max(peak, len(live))
    return peak


def test_dealt_round_robin_and_contiguous():
    att, exp = groups(2, 1, 1)
    rr = Stages.dealt(att, exp, 5)
    assert rr.layer_group == (0, 1, 0, 1, 0) and rr.stage_group == (0, 1, 0, 1, 0, 1)
    assert rr.hops == frozenset(range(5)) and rr.layers_of(1) == [1, 3]
    blocks = Stages.dealt(att, exp, 5, "contiguous")
    assert blocks.layer_group == (0, 0, 0, 1, 1) and blocks.stage_group == (0, 0, 0, 1, 1, 1)
    assert blocks.hops == frozenset({2})
    assert Stages.dealt(att, exp, 5, loss_group=0).stage_group[-1] == 0
    single = Stages.single((0, 1), (2,), 3)
    assert single.depth == 1 and single.hops == frozenset()


def test_dealt_errors_name_the_argument():
    att, exp = groups(2, 1, 1)
    with pytest.raises(ValueError, match="2 attention groups but 1 expert groups"):
        Stages.dealt(att, exp[:1], 4)
    with pytest.raises(ValueError, match="'zigzag'"):
        Stages.dealt(att, exp, 4, "zigzag")
    with pytest.raises(ValueError, match="leaves a group empty"):
        Stages.dealt(att, exp, 1, "contiguous")
    with pytest.raises(ValueError, match="of one size"):
        Stages(((0,), (1, 2)), ((3,), (4,)), (0, 1), (0,))


def test_peers_across_a_hop():
    att, exp = groups(2, 2, 1)  # attention (0,1) (2,3); experts (4,) (5,)
    s = ring_schedule(Stages.dealt(att, exp, 2), 1)
    assert s.peers(1, K.SEND_H, 0) == (3,)       # slot 1 of group 0 -> slot 1 of group 1
    assert s.peers(3, K.RECV_H, 0) == (1,)
    assert s.peers(3, K.SEND_GH, 0) == (1,)
    assert s.peers(4, K.RECV_D, 0) == (0, 1)     # layer 0's dispatch comes from stage 0's group
    assert s.peers(4, K.SEND_C, 0) == (2, 3)     # and its combine goes to stage 1's group
    assert s.peers(5, K.SEND_C, 1) == (0, 1)
    assert s.reduce_peers(2) == (2, 3) and s.reduce_peers(5) == (5,)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(1, 5), st.integers(1, 6),
       st.sampled_from(["gpipe", "1f1b"]), st.sampled_from(["round_robin", "contiguous"]), st.data())
def test_ring_schedule_is_valid(p, a, e, J, m, kind, assignment, data):
    if assignment == "contiguous" and J < p:
        assignment = "round_robin"
    att, exp = groups(p, a, e)
    loss_group = data.draw(st.one_of(st.none(), st.integers(0, p - 1)))
    stages = Stages.dealt(att, exp, J, assignment, loss_group)
    s = ring_schedule(stages, m, kind, in_flight=data.draw(st.one_of(st.none(), st.integers(1, 4))))
    validate(s)
    for r in s.ranks:  # every rank computes only its own group's stages
        for act in s.actions[r]:
            if act.kind in (K.F, K.B):
                assert stages.stage_group[act.stage] == stages.attention_slot(r)[0]
            elif act.kind in (K.EF, K.EB):
                assert stages.layer_group[act.stage] == stages.expert_group_of(r)
    # The runner executes phase("forward") then phase("backward"), each in list order; the
    # simulator must run the computes and REDUCEs in that same order on every rank.
    timed = simulate(s, lambda r, a: unit_costs(r, a) or (0.5 if a.kind is K.REDUCE else 0.0), lambda *_: 1,
                     UniformLink(1e3, 1e-3))
    for r in s.ranks:
        runner_order = [a for ph in ("forward", "backward") for a in s.phase(r, ph)]
        assert runner_order == list(s.actions[r])
        sim_order = [sp.action for sp in sorted((sp for sp in timed.spans if sp.rank == r
                                                 and sp.kind in ("compute", "reduce")), key=lambda sp: sp.start)]
        assert sim_order == [a for a in runner_order if a.kind in (K.F, K.B, K.EF, K.EB, K.REDUCE)]


@pytest.mark.parametrize("p,J", [(2, 4), (3, 6)])
def test_1f1b_bounds_what_is_in_flight(p, J):
    att, exp = groups(p, 1, 1)
    stages = Stages.dealt(att, exp, J)
    for w in (1, 2, 4):
        s = ring_schedule(stages, 12, "1f1b", in_flight=w)
        assert all(live_peak(s, r) <= w for g in att for r in g)
    assert live_peak(ring_schedule(stages, 12, "gpipe"), 0) == 12


def test_more_groups_shorten_the_step():
    """Unit costs, ideal network: p groups of each kind share the work, so the step falls
    with p (gpipe), and 1f1b with its default in_flight stays within 15% of gpipe."""
    J, m = 6, 16
    times = {}
    for p in (1, 2, 3):
        att, exp = groups(p, 1, 1)
        for kind in ("gpipe", "1f1b"):
            s = ring_schedule(Stages.dealt(att, exp, J), m, kind)
            times[p, kind] = simulate(s, unit_costs, lambda *_: 0, IDEAL).step_time
    assert times[2, "gpipe"] < 0.7 * times[1, "gpipe"]
    assert times[3, "gpipe"] < 0.9 * times[2, "gpipe"]
    for p in (1, 2, 3):
        assert times[p, "1f1b"] <= 1.15 * times[p, "gpipe"], times


def test_p1_gpipe_times_as_the_single_group_builder():
    for J, m in ((1, 1), (3, 4), (4, 8)):
        ring = ring_schedule(Stages.single((0,), (1,), J), m)
        built = af_pipe_schedule([0], [1], J, m)
        t = [simulate(x, unit_costs, lambda *_: 0, IDEAL).step_time for x in (ring, built)]
        assert t[0] == t[1]


def test_ring_schedule_rejects_bad_arguments():
    att, exp = groups(2, 1, 1)
    stages = Stages.dealt(att, exp, 2)
    with pytest.raises(ValueError, match="kind='zb'"):
        ring_schedule(stages, 2, "zb")
    with pytest.raises(ValueError, match="num_microbatches=0"):
        ring_schedule(stages, 0)
    with pytest.raises(ValueError, match="in_flight=0"):
        ring_schedule(stages, 2, "1f1b", in_flight=0)


def test_missing_hop_is_reported():
    att, exp = groups(2, 1, 1)
    s = ring_schedule(Stages.dealt(att, exp, 1), 1)
    s.actions[0] = [a for a in s.actions[0] if a.kind is not K.SEND_H]
    with pytest.raises(ScheduleError, match="missing actions >H0.0"):
        validate(s)


def test_hop_to_the_wrong_slot_is_reported():
    att, exp = groups(2, 2, 1)
    s = ring_schedule(Stages.dealt(att, exp, 1), 1)
    s.actions[0] = [Action(K.SEND_H, 0, 0, (3,)) if a.kind is K.SEND_H else a for a in s.actions[0]]
    with pytest.raises(ScheduleError, match=r"peers \(3,\) must be \(2,\)"):
        validate(s)


class TestRingGrid(expecttest.TestCase):
    def test_two_groups_two_layers(self):
        att, exp = groups(2, 1, 1)
        self.assertExpectedInline(str(ring_schedule(Stages.dealt(att, exp, 2), 2, "1f1b")), """\
step | 0:A                            | 1:A                            | 2:E                | 3:E
   0 | <C1.0 <H1.0 <C1.1 <H1.1        | <C0.0 <H0.0 <C0.1 <H0.1        | <D0.0 <D0.1        | <D1.0 <D1.1
   1 | F0.0 <GD0.0 >D0.0 >H0.0 <GH0.0 |                                |                    |
   2 | F0.1 <GD0.1 >D0.1 >H0.1 <GH0.1 |                                | EF0.0 <GC0.0 >C0.0 |
   3 |                                | F1.0 <GD1.0 >D1.0 >H1.0 <GH1.0 | EF0.1 <GC0.1 >C0.1 |
   4 |                                | F1.1 <GD1.1 >D1.1 >H1.1 <GH1.1 |                    | EF1.0 <GC1.0 >C1.0
   5 | F2.0                           |                                |                    | EF1.1 <GC1.1 >C1.1
   6 | B2.0 >GC1.0 >GH1.0             |                                |                    |
   7 | F2.1                           |                                |                    | EB1.0 >GD1.0
   8 | B2.1 >GC1.1 >GH1.1             | B1.0 >GC0.0 >GH0.0             |                    |
   9 |                                |                                | EB0.0 >GD0.0       | EB1.1 >GD1.1 R
  10 | B0.0                           | B1.1 >GC0.1 >GH0.1 R           |                    |
  11 |                                |                                | EB0.1 >GD0.1 R     |
  12 | B0.1 R                         |                                |                    |""")
