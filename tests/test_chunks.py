"""Chunked dispatch -> experts -> combine: the schedule pass, its validation, the row
geometry both sides agree on, the cost formula against the simulator, and the solver.
(Parity with eager for chunked layers: tests/test_runtime.py, test_chunked_dispatch_matches_eager.)"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random

import expecttest
import pytest

from fxdisag.planner import ClusterSpec
from fxdisag.planner.formulas import CHUNKED_SEGMENT
from fxdisag.planner.plan import Plan
from fxdisag.planner.profile import synthetic_profile
from fxdisag.runtime.chunking import RowChunks
from fxdisag.schedule import (
    ActionKind,
    ScheduleError,
    af_pipe_schedule,
    chunk_schedule,
    ep_schedule,
    one_f_one_b_schedule,
    validate,
)
from fxdisag.schedule.simulate import UniformLink, simulate

K = ActionKind
BUILDERS = {
    "gpipe": lambda: af_pipe_schedule([0, 1], [2, 3], 2, 3),
    "1f1b": lambda: one_f_one_b_schedule([0], [1, 2], 2, 4),
    "ep": lambda: ep_schedule([0, 1], 2, 2),
    "ep-overlap": lambda: ep_schedule([0, 1, 2], 2, 3, overlap=True),
}


class TestChunkSchedule(expecttest.TestCase):
    def test_grid_of_a_chunked_gpipe_schedule(self):
        s = chunk_schedule(af_pipe_schedule([0], [1], 1, 2), {0: (2, 3)})
        self.assertExpectedInline(str(s), """\
step | 0:A                                                    | 1:E
   0 | F0.0 <C0.0 <C0.0c1 >D0.0 >D0.0c1                       | <D0.0 <D0.0c1 <D0.1 <D0.1c1
   1 | F0.1 <C0.1 <C0.1c1 >D0.1 >D0.1c1                       | EF0.0 >C0.0
   2 |                                                        | EF0.0c1 >C0.0c1
   3 | F1.0                                                   | EF0.1 >C0.1
   4 |                                                        | EF0.1c1 >C0.1c1 <GC0.0 <GC0.0c1 <GC0.0c2 <GC0.1 <GC0.1c1 <GC0.1c2
   5 | F1.1                                                   |
   6 | B1.0 <GD0.0 <GD0.0c1 <GD0.0c2 >GC0.0 >GC0.0c1 >GC0.0c2 |
   7 | B1.1 <GD0.1 <GD0.1c1 <GD0.1c2 >GC0.1 >GC0.1c1 >GC0.1c2 | EB0.0 >GD0.0
   8 |                                                        | EB0.0c1 >GD0.0c1
   9 |                                                        | EB0.0c2 >GD0.0c2
  10 | B0.0                                                   | EB0.1 >GD0.1
  11 |                                                        | EB0.1c1 >GD0.1c1
  12 |                                                        | EB0.1c2 >GD0.1c2 R
  13 | B0.1 R                                                 |""")


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_every_builder_chunks_into_a_valid_schedule(builder):
    base = BUILDERS[builder]()
    for chunks in ({0: (2, 2)}, {0: (4, 1), 1: (1, 3)}, {0: (16, 16), 1: (3, 2)}):
        s = chunk_schedule(base, chunks)
        validate(s)
        for rank, acts in s.actions.items():
            # every chunk of every chunked action, once; the rest as before
            assert {a.key for a in acts} == s.required_keys(rank)
            expected = sum(chunks.get(a.stage, (1, 1))[0 if a.kind in _FWD else 1] if a.kind in _FWD | _BWD else 1
                           for a in base.actions[rank])
            assert len(acts) == expected
        if base.forward_len is not None:  # 1F1B: the same actions, chunked, in the forward phase
            for rank in s.actions:
                assert {(a.kind, a.stage, a.microbatch) for a in s.phase(rank, "forward")} == \
                    {(a.kind, a.stage, a.microbatch) for a in base.phase(rank, "forward")}


_FWD = {K.SEND_D, K.RECV_D, K.EF, K.SEND_C, K.RECV_C}
_BWD = {K.SEND_GC, K.RECV_GC, K.EB, K.SEND_GD, K.RECV_GD}


def test_the_validator_names_a_chunk_out_of_range_a_missing_chunk_and_a_fifo_break():
    s = chunk_schedule(af_pipe_schedule([0], [1], 1, 1), {0: (2, 2)})
    acts = s.actions[1]
    bad = dataclasses.replace(s, actions={**s.actions, 1: [dataclasses.replace(a, chunk=2) if str(a) == "EF0.0c1" else a
                                                           for a in acts]})
    with pytest.raises(ScheduleError, match="chunk 2 out of range: EF of layer 0 has 2 chunk"):
        validate(bad)
    missing = dataclasses.replace(s, actions={**s.actions, 1: [a for a in acts if str(a) != "<D0.0c1"]})
    with pytest.raises(ScheduleError, match="missing actions <D0.0c1"):
        validate(missing)
    # both combine chunks after both computes, chunk 1 first: the attention rank receives chunk 0 first
    sends = [a for a in acts if a.kind is K.SEND_C]
    rest = [a for a in acts if a.kind is not K.SEND_C]
    at = next(n for n, a in enumerate(rest) if str(a) == "EF0.0c1") + 1
    reordered = dataclasses.replace(s, actions={**s.actions, 1: rest[:at] + sends[::-1] + rest[at:]})
    with pytest.raises(ScheduleError, match=r"FIFO order broken on 1 -> 0: message #0 is `>C0.0c1`"):
        validate(reordered)


def test_a_chunked_schedule_refuses_bad_counts_and_pipeline_hops():
    base = af_pipe_schedule([0], [1], 2, 1)
    with pytest.raises(ValueError, match="chunk counts in 1..16"):
        chunk_schedule(base, {0: (17, 1)})
    with pytest.raises(ValueError, match="MoE layer 0..1"):
        chunk_schedule(base, {2: (2, 2)})
    with pytest.raises(ValueError, match="chunked already"):
        chunk_schedule(chunk_schedule(base, {0: (2, 2)}), {1: (2, 2)})
    with pytest.raises(ValueError, match="chunks with pipeline_depth=2"):
        dataclasses.replace(Plan.manual(1, 1, 8, 2, num_moe_layers=2, pipeline_depth=2), chunks=[[2, 2], [1, 1]])


# ---------------------------------------------------------------- row geometry


@pytest.mark.parametrize("forward, backward", list(itertools.product((1, 2, 3, 4), repeat=2)))
def test_chunks_pieces_and_backward_chunks_tile_the_message(forward, backward):
    for n in range(0, 23):
        g = RowChunks.of(n, forward, backward)
        per_f, per_b = RowChunks.pieces_per(forward, backward)
        for blocks in (g.forward, g.pieces, g.backward):  # consecutive, covering 0..n
            assert [r.start for r in blocks[1:]] == [r.stop for r in blocks[:-1]]
            assert blocks[0].start == 0 and blocks[-1].stop == n
        assert len(g.forward) == forward and len(g.backward) == backward and len(g.pieces) == forward * per_f
        for c, blk in enumerate(g.forward):  # the pieces nest in the forward chunks, from the chunk's size alone
            inside = g.pieces[c * per_f:(c + 1) * per_f]
            assert [len(p) for p in inside] == [len(r) for r in RowChunks.of(len(blk), 1, per_f).backward]
        for b, blk in enumerate(g.backward):
            inside = g.pieces[b * per_b:(b + 1) * per_b]
            assert blk == range(inside[0].start, inside[-1].stop)
        sizes = [len(r) for r in g.forward]
        assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------- the formula


def _chunked_forward_gap(r: int, t_a: float, t_d: float, t_e: float, t_c: float, lat: float, a_e: float) -> float:
    """The simulator's time from the end of F0.0 to the start of F1.0 (one micro-batch, one
    MoE layer, 1A+1E) with the layer in r forward chunks: each transfer chunk (t - lat) / r
    on the wire plus the latency, each expert chunk a_e + (t_e - a_e) / r."""
    s = chunk_schedule(af_pipe_schedule([0], [1], 1, 1), {0: (r, 1)}) if r > 1 else af_pipe_schedule([0], [1], 1, 1)
    bw = 1e6  # bytes per second

    def compute(rank, a):
        if a.kind is K.EF:
            return a_e + (t_e - a_e) / r
        return 0.0 if a.kind is K.REDUCE else (t_a if a.kind in (K.F, K.B) else 0.5)

    def nbytes(src, a, dst):
        t = {K.SEND_D: t_d, K.SEND_C: t_c}.get(a.kind)
        return bw * (t - lat) / r if t is not None else 1.0

    res = simulate(s, compute, nbytes, UniformLink(bw, lat))
    spans = {str(sp.action): sp for sp in res.spans if sp.kind == "compute"}
    return spans["F1.0"].start - spans["F0.0"].end


def test_the_chunked_segment_formula_is_the_simulated_flow_shop():
    rng = random.Random(0)
    for _ in range(40):
        t_d, t_e, t_c = (rng.uniform(0.2, 3.0) for _ in range(3))
        lat, a_e = rng.uniform(0.0, 0.15), rng.uniform(0.0, 0.15)
        for r in range(1, 7):
            predicted = CHUNKED_SEGMENT(None, r=r, t_d=t_d, t_e=t_e, t_c=t_c, a_d=lat, a_e=a_e, a_c=lat)
            assert _chunked_forward_gap(r, 1.0, t_d, t_e, t_c, lat, a_e) == pytest.approx(predicted, rel=1e-9)


# ---------------------------------------------------------------- the solver


def _plan_inputs(overhead: float):
    prof = synthetic_profile(num_layers=2, hidden_size=256, num_experts=8, top_k=2, params_per_expert=3 * 256 * 256,
                             attention_flops_per_token=3e6, head_flops_per_token=1e5, dtype_bytes=4)
    cluster = ClusterSpec.cpu(2, flops=80e9, bandwidth=0.05e9, action_overhead=overhead)
    return prof, cluster


PINS = dict(seq_len=128, num_attention=1, microbatch_size=16, pipeline_depth=1, schedule="gpipe", baseline=False)


@pytest.mark.parametrize("overhead", [1e-5, 1e-3, 0.5])
def test_the_solver_is_brute_force_over_pinned_plans(overhead):
    from fxdisag.planner.chunking import CHUNK_GRID, CHUNK_TIE, solve_chunks
    from fxdisag.planner.search import plan

    prof, cluster = _plan_inputs(overhead)
    solved = plan(prof, cluster, 16, num_microbatches=1, chunks=True, **PINS)
    # every pair of the grid, each its own pinned search
    steps = {c: plan(prof, cluster, 16, num_microbatches=1, chunks=c, **PINS).step_time
             for c in itertools.product(CHUNK_GRID, repeat=2)}
    # the fastest, or within CHUNK_TIE of it the fewest chunks (then the fastest)
    fastest = min(steps.values())
    want = min((c for c, t in steps.items() if t <= fastest * (1 + CHUNK_TIE)), key=lambda c: (sum(c), steps[c]))
    pair = tuple(solved.chunks[0]) if solved.chunks else (1, 1)
    assert pair == want and solved.step_time == pytest.approx(steps[want], rel=1e-12)
    assert solved.chunks in ([], [list(pair)] * 2)
    exact = solve_chunks(lambda c: steps[c], tie=0.0)  # without the tie: the model's own argmin
    assert exact.step == fastest and steps[exact.chunks] == fastest
    # one micro-batch: the round trip is the step, so chunks pay unless each costs too much
    if overhead <= 1e-3:
        assert pair[0] > 1 and pair[1] > 1 and solved.step_time < steps[(1, 1)]
        assert "CHUNKED_SEGMENT" in solved.explain() and any("chunk" in n for n in solved.notes)
    else:
        assert pair == (1, 1) and solved.chunks == []
    assert Plan.from_json(solved.to_json()) == solved  # the chunks survive the JSON round trip


def test_a_chunked_plan_builds_its_chunked_schedule():
    p = dataclasses.replace(Plan.manual(1, 2, 8, 2, num_moe_layers=2), chunks=[[2, 4], [1, 1]])
    s = p.schedule()
    assert s.chunks == {0: (2, 4)} and sum(a.kind is K.EB for a in s.actions[1]) == 2 * (4 + 1)
    assert json.loads(p.to_json())["binding"]["chunks"] == [[2, 4], [1, 1]]
    with pytest.raises(ValueError, match="give one \\[forward, backward\\] pair per MoE layer"):
        dataclasses.replace(p, chunks=[[2, 2]]).schedule()
    with pytest.raises(ValueError, match="ints in 1..16"):
        dataclasses.replace(p, chunks=[[0, 1], [1, 1]])
