"""Tests of fxdisag.schedule: the AF-Pipe builder, the grid and the validator."""

import dataclasses
import re

import expecttest
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fxdisag.schedule import (
    Action,
    ActionKind,
    Schedule,
    ScheduleError,
    af_pipe_schedule,
    consumes,
    format_grid,
    validate,
)

K = ActionKind


def _copy(s: Schedule) -> Schedule:
    return dataclasses.replace(s, actions={r: list(a) for r, a in s.actions.items()})


def _find(s: Schedule, rank: int, text: str) -> int:
    return [str(a) for a in s.actions[rank]].index(text)


def _marked_cell(message: str) -> str:
    """The text of the cell flagged `!!` in an error's grid."""
    (cell,) = re.findall(r"!!([^|\n]*)", message)
    return cell.strip()


class TestGrid(expecttest.TestCase):
    def test_one_attention_one_expert_two_layers(self):
        s = af_pipe_schedule([0], [1], num_moe_layers=2, num_microbatches=2)
        self.assertExpectedInline(str(s), """\
step | 0:A                | 1:E
   0 | F0.0 <C0.0 >D0.0   | <D0.0 <D0.1
   1 | F0.1 <C0.1 >D0.1   | EF0.0 >C0.0 <D1.0
   2 | F1.0 <C1.0 >D1.0   | EF0.1 >C0.1 <D1.1
   3 | F1.1 <C1.1 >D1.1   | EF1.0 >C1.0
   4 | F2.0               | EF1.1 >C1.1 <GC1.0 <GC1.1
   5 | F2.1               |
   6 | B2.0 <GD1.0 >GC1.0 |
   7 | B2.1 <GD1.1 >GC1.1 | EB1.0 >GD1.0 <GC0.0
   8 | B1.0 <GD0.0 >GC0.0 | EB1.1 >GD1.1 <GC0.1
   9 | B1.1 <GD0.1 >GC0.1 | EB0.0 >GD0.0
  10 | B0.0               | EB0.1 >GD0.1 R
  11 | B0.1 R             |""")

    def test_two_attention_two_expert_one_layer(self):
        s = af_pipe_schedule([0, 1], [2, 3], num_moe_layers=1, num_microbatches=2)
        self.assertExpectedInline(str(s), """\
step | 0:A                | 1:A                | 2:E                       | 3:E
   0 | F0.0 <C0.0 >D0.0   | F0.0 <C0.0 >D0.0   | <D0.0 <D0.1               | <D0.0 <D0.1
   1 | F0.1 <C0.1 >D0.1   | F0.1 <C0.1 >D0.1   | EF0.0 >C0.0               | EF0.0 >C0.0
   2 | F1.0               | F1.0               | EF0.1 >C0.1 <GC0.0 <GC0.1 | EF0.1 >C0.1 <GC0.0 <GC0.1
   3 | F1.1               | F1.1               |                           |
   4 | B1.0 <GD0.0 >GC0.0 | B1.0 <GD0.0 >GC0.0 |                           |
   5 | B1.1 <GD0.1 >GC0.1 | B1.1 <GD0.1 >GC0.1 | EB0.0 >GD0.0              | EB0.0 >GD0.0
   6 | B0.0               | B0.0               | EB0.1 >GD0.1 R            | EB0.1 >GD0.1 R
   7 | B0.1 R             | B0.1 R             |                           |""")

    def test_mark_flags_one_cell(self):
        s = af_pipe_schedule([0], [1], 1, 1)
        self.assertExpectedInline(format_grid(s, mark=(1, 1)), """\
step | 0:A                | 1:E
   0 | F0.0 <C0.0 >D0.0   | <D0.0
   1 |                    | !!EF0.0 >C0.0 <GC0.0
   2 | F1.0               |
   3 | B1.0 <GD0.0 >GC0.0 |
   4 |                    | EB0.0 >GD0.0 R
   5 | B0.0 R             |""")


class TestActions:
    def test_str_notation(self):
        assert str(Action(K.F, 1, 0)) == "F1.0"
        assert str(Action(K.EB, 0, 3)) == "EB0.3"
        assert str(Action(K.SEND_D, 0, 1, (2, 3))) == ">D0.1"
        assert str(Action(K.RECV_D, 0, 1, (0,))) == "<D0.1"
        assert str(Action(K.SEND_GD, 2, 1, (0,))) == ">GD2.1"
        assert str(Action(K.REDUCE, -1, -1, (0, 1))) == "R"

    def test_consumes(self):
        J = 3
        assert consumes(Action(K.F, 0, 1), J) == ()
        assert consumes(Action(K.F, 2, 1), J) == ((K.RECV_C, 1, 1),)
        assert consumes(Action(K.B, 3, 0), J) == ()
        assert consumes(Action(K.B, 1, 0), J) == ((K.RECV_GD, 1, 0),)
        assert consumes(Action(K.EF, 2, 4), J) == ((K.RECV_D, 2, 4),)
        assert consumes(Action(K.EB, 0, 4), J) == ((K.RECV_GC, 0, 4),)
        assert consumes(Action(K.SEND_D, 0, 0, (1,)), J) == ()

    def test_consumes_across_a_hop(self):
        J, hops = 3, frozenset({1, 2})
        assert consumes(Action(K.F, 2, 1), J, hops) == ((K.RECV_C, 1, 1), (K.RECV_H, 1, 1))
        assert consumes(Action(K.F, 1, 1), J, hops) == ((K.RECV_C, 0, 1),)
        assert consumes(Action(K.B, 2, 0), J, hops) == ((K.RECV_GD, 2, 0), (K.RECV_GH, 2, 0))
        assert consumes(Action(K.B, 3, 0), J, hops) == ()

    def test_peers_are_the_other_group(self):
        s = af_pipe_schedule([5, 1], [0, 7, 3], 2, 2)
        for r in (1, 5):
            for a in s.actions[r]:
                if a.kind.is_comm:
                    assert a.peers == (0, 3, 7)
                elif a.kind is K.REDUCE:
                    assert a.peers == (1, 5)
        for r in (0, 3, 7):
            for a in s.actions[r]:
                if a.kind.is_comm:
                    assert a.peers == (1, 5)


class TestBuilderErrors:
    def test_no_moe_layer(self):
        with pytest.raises(ValueError, match="num_moe_layers=0"):
            af_pipe_schedule([0], [1], 0, 2)

    def test_no_microbatch(self):
        with pytest.raises(ValueError, match="num_microbatches=0"):
            af_pipe_schedule([0], [1], 1, 0)

    def test_empty_groups(self):
        with pytest.raises(ValueError, match="attention_ranks is empty"):
            af_pipe_schedule([], [1], 1, 1)
        with pytest.raises(ValueError, match="expert_ranks is empty"):
            af_pipe_schedule([0], [], 1, 1)

    def test_overlapping_groups(self):
        with pytest.raises(ValueError, match=r"overlap on ranks \[1\]"):
            af_pipe_schedule([0, 1], [1, 2], 1, 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 8),
       st.randoms(use_true_random=False))
def test_generated_schedules_validate(n_attn, n_exp, J, m, rnd):
    ranks = list(range(n_attn + n_exp))
    rnd.shuffle(ranks)  # rank ids need not be contiguous per group
    s = af_pipe_schedule(ranks[:n_attn], ranks[n_attn:], J, m)
    validate(s)
    # Independent count: attention does 2(J+1)m computes, experts 2Jm; in the unit
    # model the attention rank is never idle once m >= 2 after its first step.
    for r in ranks[:n_attn]:
        assert sum(a.kind.is_compute for a in s.actions[r]) == 2 * (J + 1) * m
    for r in ranks[n_attn:]:
        assert sum(a.kind.is_compute for a in s.actions[r]) == 2 * J * m


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 8), st.integers(1, 4),
       st.randoms(use_true_random=False))
def test_generated_1f1b_schedules_validate_and_bound_the_micro_batches_in_flight(n_attn, n_exp, J, m, w, rnd):
    from fxdisag.schedule import one_f_one_b_schedule

    ranks = list(range(n_attn + n_exp))
    rnd.shuffle(ranks)
    s = one_f_one_b_schedule(ranks[:n_attn], ranks[n_attn:], J, m, in_flight=w)
    validate(s)
    assert all(s.defers_loss_grad(r) for r in ranks)
    live, peak = set(), 0
    for a in s.actions[ranks[0]]:  # an attention rank
        if a.kind is K.F and a.stage == 0:
            live.add(a.microbatch)
        elif a.kind is K.B and a.stage == 0:
            live.remove(a.microbatch)
        peak = max(peak, len(live))
    assert 1 <= peak <= min(w, m)


class TestValidateRejects:
    def test_missing_recv(self):
        s = _copy(af_pipe_schedule([0], [1], 1, 2))
        del s.actions[1][_find(s, 1, "<D0.1")]
        with pytest.raises(ScheduleError, match=r"rank 1: missing actions <D0.1") as e:
            validate(s)
        assert "!!" in str(e.value)

    def test_recv_missing_one_peer(self):
        s = _copy(af_pipe_schedule([0, 1], [2], 1, 2))
        n = _find(s, 2, "<D0.1")
        s.actions[2][n] = dataclasses.replace(s.actions[2][n], peers=(1,))
        # Every comm action's peers are the whole group its stage puts on the other side.
        with pytest.raises(ScheduleError, match=r"peers \(1,\) must be \(0, 1\)"):
            validate(s)

    def test_hop_kind_on_expert_rank(self):
        s = _copy(af_pipe_schedule([0, 1], [2], 1, 2))
        s.actions[2].remove(s.actions[2][_find(s, 2, "<D0.1")])
        s.actions[2].insert(0, Action(K.RECV_H, 0, 1, (0,)))  # keep the count; a kind not its own
        with pytest.raises(ScheduleError, match="RECV_H does not belong on an expert rank"):
            validate(s)

    def test_swapped_fifo_order(self):
        s = _copy(af_pipe_schedule([0], [1], 1, 2))
        a, b = _find(s, 1, "<D0.0"), _find(s, 1, "<D0.1")
        s.actions[1][a], s.actions[1][b] = s.actions[1][b], s.actions[1][a]
        with pytest.raises(ScheduleError, match=r"FIFO order broken on 0 -> 1: message #0 is "
                           r"`>D0.0` on rank 0 \(action #2\) but `<D0.1` on rank 1") as e:
            validate(s)
        assert _marked_cell(str(e.value)) == "<D0.1 <D0.0"

    def test_consumer_before_its_recv(self):
        s = _copy(af_pipe_schedule([0], [1], 2, 2))
        recv = s.actions[0].pop(_find(s, 0, "<C0.1"))
        s.actions[0].insert(_find(s, 0, "F1.1") + 1, recv)
        with pytest.raises(ScheduleError, match=r"rank 0 action #\d+ `F1.1`: `F1.1` comes "
                           r"before `<C0.1` \(action #\d+\), which consumes its data") as e:
            validate(s)
        # F1.1 can never run (its recv is posted after it): the mark is on the stuck row.
        assert re.search(r"stuck \|.*!!wait F1.1", str(e.value))

    def test_send_before_its_producer(self):
        s = _copy(af_pipe_schedule([0], [1], 1, 1))
        send = s.actions[1].pop(_find(s, 1, ">C0.0"))
        s.actions[1].insert(_find(s, 1, "EF0.0"), send)
        with pytest.raises(ScheduleError, match=r"`>C0.0` comes before `EF0.0` "
                           r"\(action #\d+\), which produces its data"):
            validate(s)

    def test_deadlock_by_reordering(self):
        s = _copy(af_pipe_schedule([0], [1], 1, 1))
        send = s.actions[0].pop(_find(s, 0, ">D0.0"))
        s.actions[0].insert(_find(s, 0, "F1.0") + 1, send)
        with pytest.raises(ScheduleError) as e:
            validate(s)
        msg = str(e.value)
        assert ("deadlock: no rank can progress; rank 0 waits at `F1.0` for C0.0 from "
                "rank(s) [1]; rank 1 waits at `EF0.0` for D0.0 from rank(s) [0]") in msg
        assert re.search(r"stuck \| !!wait F1.0 +\| wait EF0.0", msg)

    def test_compute_on_wrong_group(self):
        s = _copy(af_pipe_schedule([0], [1], 1, 1))
        s.actions[1].insert(0, Action(K.F, 0, 0))
        with pytest.raises(ScheduleError, match="rank 1 action #0 `F0.0`: F does not "
                           "belong on an expert rank"):
            validate(s)

    def test_duplicate_compute(self):
        s = _copy(af_pipe_schedule([0], [1], 1, 2))
        s.actions[0].insert(_find(s, 0, "F0.1") + 1, Action(K.F, 0, 1))
        with pytest.raises(ScheduleError, match=r"`F0.1` appears twice \(first as action #3\)"):
            validate(s)

    def test_reduce_not_last(self):
        s = _copy(af_pipe_schedule([0], [1], 1, 1))
        s.actions[1].insert(0, s.actions[1].pop())
        with pytest.raises(ScheduleError, match="REDUCE must be the rank's last action"):
            validate(s)

    def test_peer_in_own_group(self):
        s = _copy(af_pipe_schedule([0, 1], [2], 1, 1))
        n = _find(s, 0, ">D0.0")
        s.actions[0][n] = dataclasses.replace(s.actions[0][n], peers=(1, 2))
        with pytest.raises(ScheduleError, match=r"peers \(1, 2\) must be \(2,\)"):
            validate(s)

    def test_missing_rank_list(self):
        s = _copy(af_pipe_schedule([0], [1, 2], 1, 1))
        del s.actions[2]
        with pytest.raises(ScheduleError, match=r"no list for ranks \[2\]"):
            validate(s)

    def test_receive_posted_before_the_rows_are_routed(self):
        # <C0.0 sizes its buffers from the rows F0.0 routed: it cannot come first
        s = _copy(af_pipe_schedule([0], [1], 1, 1))
        recv = s.actions[0].pop(_find(s, 0, "<C0.0"))
        s.actions[0].insert(0, recv)
        with pytest.raises(ScheduleError, match=r"`<C0.0` comes before `F0.0` \(action #1\), which must run first"):
            validate(s)


class TestPhases:
    def test_forward_phase_must_end_before_reduce(self):
        s = af_pipe_schedule([0], [1], 1, 1)
        s.forward_len = {0: len(s.actions[0])}
        with pytest.raises(ScheduleError, match="rank 0: forward phase of 9 actions: must end before REDUCE"):
            validate(s)

    def test_forward_phase_waiting_for_a_backward_phase_message(self):
        # the expert rank's forward phase would wait for <GC sent in the attention rank's backward
        s = af_pipe_schedule([0], [1], 1, 1)
        s.forward_len = {1: len(s.actions[1]) - 1}
        with pytest.raises(ScheduleError) as e:
            validate(s)
        assert "`EB0.0` waits in the forward phase for a message that is sent only in a backward phase" in str(e.value)
        assert _marked_cell(str(e.value)).startswith("EB0.0")

    def test_deferred_loss_grad_leaves_only_reduce_for_the_backward_phase(self):
        s = af_pipe_schedule([0], [1], 1, 1)
        n = _find(s, 0, "B1.0")  # attention forward phase ends after B1.0: B0.0 is left behind
        s.forward_len = {0: n + 1}
        with pytest.raises(ScheduleError, match=r"rank 0 action #5 `<GD0.0`: `<GD0.0` is in the backward phase, but the "
                                                "forward phase already runs backward computation"):
            validate(s)

    def test_phases_of_the_gpipe_schedule(self):
        s = af_pipe_schedule([0], [1], 1, 1)
        assert [str(a) for a in s.phase(0, "forward")] == ["F0.0", "<C0.0", ">D0.0", "F1.0"]
        assert [str(a) for a in s.phase(1, "backward")] == ["<GC0.0", "EB0.0", ">GD0.0", "R"]
        assert not s.defers_loss_grad(0)
        with pytest.raises(ValueError, match="phase must be 'forward' or 'backward'"):
            s.phase(0, "middle")


class TestExpertParallel(expecttest.TestCase):
    def test_ep_schedules_validate_and_draw(self):
        from fxdisag.schedule import ep_schedule

        for world, J, m in ((2, 1, 1), (2, 2, 2), (4, 1, 2), (3, 2, 1)):
            validate(ep_schedule(range(world), J, m))
        s = ep_schedule([0, 1], 1, 1)
        assert s.role(0) == "AE"
        self.assertExpectedInline(str(s), """\
step | 0:AE               | 1:AE
   0 | <D0.0              | <D0.0
   1 | F0.0 >D0.0 <C0.0   | F0.0 >D0.0 <C0.0
   2 | EF0.0 >C0.0        | EF0.0 >C0.0
   3 | F1.0 <GC0.0 <GD0.0 | F1.0 <GC0.0 <GD0.0
   4 | B1.0 >GC0.0        | B1.0 >GC0.0
   5 | EB0.0 >GD0.0       | EB0.0 >GD0.0
   6 | B0.0 R             | B0.0 R""")

    def test_overlapped_ep_pairs_micro_batches(self):
        from fxdisag.schedule import ep_schedule
        from fxdisag.schedule.simulate import UniformLink, simulate

        for world, J, m in ((2, 1, 2), (2, 2, 3), (4, 2, 4), (3, 1, 5)):
            validate(ep_schedule(range(world), J, m, overlap=True))
        s = ep_schedule([0, 1], 1, 3, overlap=True)
        assert s.name == "ep-overlap"
        self.assertExpectedInline(str(s), """\
step | 0:AE                             | 1:AE
   0 | <D0.0 <D0.1                      | <D0.0 <D0.1
   1 | F0.0 >D0.0 <C0.0                 | F0.0 >D0.0 <C0.0
   2 | F0.1 >D0.1 <C0.1                 | F0.1 >D0.1 <C0.1
   3 | EF0.0 >C0.0                      | EF0.0 >C0.0
   4 | EF0.1 >C0.1                      | EF0.1 >C0.1
   5 | F1.0                             | F1.0
   6 | F1.1 <D0.2                       | F1.1 <D0.2
   7 | F0.2 >D0.2 <C0.2                 | F0.2 >D0.2 <C0.2
   8 | EF0.2 >C0.2                      | EF0.2 >C0.2
   9 | F1.2 <GC0.0 <GC0.1 <GD0.0 <GD0.1 | F1.2 <GC0.0 <GC0.1 <GD0.0 <GD0.1
  10 | B1.0 >GC0.0                      | B1.0 >GC0.0
  11 | B1.1 >GC0.1                      | B1.1 >GC0.1
  12 | EB0.0 >GD0.0                     | EB0.0 >GD0.0
  13 | EB0.1 >GD0.1                     | EB0.1 >GD0.1
  14 | B0.0                             | B0.0
  15 | B0.1 <GC0.2 <GD0.2               | B0.1 <GC0.2 <GD0.2
  16 | B1.2 >GC0.2                      | B1.2 >GC0.2
  17 | EB0.2 >GD0.2                     | EB0.2 >GD0.2
  18 | B0.2 R                           | B0.2 R""")
        # Compute 1 (F, EF) and 2 (B, EB) per micro-batch, each message 1: the exchanges of a
        # pair hide behind its partner's compute, so the step is shorter than without overlap.
        table = {K.F: 1.0, K.EF: 1.0, K.B: 2.0, K.EB: 2.0, K.REDUCE: 0.0}
        link = UniformLink(1.0)

        def step(overlap):
            return simulate(ep_schedule([0, 1], 2, 4, overlap), lambda r, a: table[a.kind],
                            lambda *_: 1.0, link).step_time

        assert step(True) < 0.8 * step(False)

    def test_ep_rank_missing_its_expert_half(self):
        from fxdisag.schedule import ep_schedule

        s = _copy(ep_schedule([0, 1], 1, 1))
        s.actions[1] = [a for a in s.actions[1] if a.kind is not K.EB]
        with pytest.raises(ScheduleError, match="rank 1: missing actions EB0.0; every attention\\+expert rank"):
            validate(s)
