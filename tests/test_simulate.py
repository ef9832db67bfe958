"""Tests of fxdisag.schedule.simulate and fxdisag.runtime.timeline against hand timings."""

import json
import math
import sys

import pytest

from fxdisag.schedule import ActionKind, ScheduleError, af_pipe_schedule, format_grid, validate
from fxdisag.schedule.simulate import LinkModel, UniformLink, simulate
from fxdisag.runtime.timeline import Span, chrome_trace, gantt_png

K = ActionKind
IDEAL = UniformLink(math.inf, 0.0)


def costs(F, EF, B, EB, R=0.0):
    """compute_time from per-kind costs (seconds per micro-batch)."""
    table = {K.F: F, K.EF: EF, K.B: B, K.EB: EB, K.REDUCE: R}
    return lambda rank, action: table[action.kind]


def spans_of(res, rank, kind):
    return [(str(s.action), s.start, s.end) for s in res.spans if s.rank == rank and s.kind == kind]


def test_one_attention_one_expert_by_hand():
    """F=1 EF=2 B=3 EB=4 s; 100 B per message (GD 200 B) at 100 B/s, 0.5 s latency.

    A: F0.0 [0,1]; >D0.0 on the wire [1,2], arrives 2.5   E: EF0.0 [2.5,4.5]
       >C0.0 [4.5,5.5] arrives 6; F1.0 [6,7]; B1.0 [7,10]
       >GC0.0 [10,11] arrives 11.5                        E: EB0.0 [11.5,15.5]
       >GD0.0 [15.5,17.5] arrives 18; B0.0 [18,21]; R [21,23]   E: R [15.5,16.5]
    """
    s = af_pipe_schedule([0], [1], 1, 1)
    ct = costs(1, 2, 3, 4)
    res = simulate(s, lambda r, a: (2.0 if r == 0 else 1.0) if a.kind is K.REDUCE else ct(r, a),
                   lambda src, a, dst: 200 if a.kind is K.SEND_GD else 100, UniformLink(100, 0.5))
    assert res.step_time == 23
    assert spans_of(res, 0, "compute") == [("F0.0", 0, 1), ("F1.0", 6, 7), ("B1.0", 7, 10),
                                           ("B0.0", 18, 21)]
    assert spans_of(res, 1, "compute") == [("EF0.0", 2.5, 4.5), ("EB0.0", 11.5, 15.5)]
    assert spans_of(res, 0, "send") == [(">D0.0", 1, 2), (">GC0.0", 10, 11)]
    assert spans_of(res, 1, "send") == [(">C0.0", 4.5, 5.5), (">GD0.0", 15.5, 17.5)]
    assert spans_of(res, 0, "reduce") == [("R", 21, 23)]
    assert spans_of(res, 1, "reduce") == [("R", 15.5, 16.5)]
    assert res.exposed_comm == {0: (6 - 1) + (18 - 10), 1: 2.5 + (11.5 - 4.5)}
    assert res.busy_fraction == {0: 8 / 23, 1: 6 / 23}
    assert res.bubble_fraction == {"attention": 15 / 23, "expert": 17 / 23, "all": 16 / 23}


@pytest.mark.parametrize("groups", [([0], [1]), ([0, 1], [2, 3])])
@pytest.mark.parametrize("J", [1, 2, 3])
@pytest.mark.parametrize("m", [1, 2, 4])
def test_ideal_network_compute_bound_formula(groups, J, m):
    """Fixed work per step, split into m micro-batches: f = 1/m for F and EF, 2f for B, EB.

    m = 1 runs the whole chain serially: (2J+1) forward pieces + (2J+1) backward pieces
    = 3(2J+1). For m >= 2, each micro-batch's round trip through the experts (2f)
    fits in the m*f the attention rank spends on the other micro-batches of the same
    stage, so attention never idles: step = its work = 3(J+1), the compute bound.
    """
    f = 1.0 / m
    res = simulate(af_pipe_schedule(*groups, J, m), costs(f, f, 2 * f, 2 * f),
                   lambda *_: 1e6, IDEAL)
    expected = 3 * (2 * J + 1) if m == 1 else 3 * (J + 1)
    assert res.step_time == pytest.approx(expected)
    assert res.bubble_fraction["attention"] == pytest.approx(0.0 if m > 1 else J / (2 * J + 1))
    assert res.bubble_fraction["expert"] == pytest.approx(1 - 3 * J / expected)
    assert all(v == 0 for r, v in res.exposed_comm.items() if r in groups[0]) == (m > 1)


def test_more_microbatches_never_increase_the_bubble():
    for attention, experts in (([0], [1]), ([0, 1], [2, 3]), ([0, 1, 2, 3], [4, 5])):
        for J in (1, 2):
            for link in (UniformLink(math.inf, 0.02), UniformLink(20.0, 0.0),
                         UniformLink(50.0, 0.02)):
                bubbles = []
                for m in range(1, 9):
                    f = 1.0 / m  # the same work per step, balanced attention/experts
                    res = simulate(af_pipe_schedule(attention, experts, J, m),
                                   costs(f, f, 2 * f, 2 * f),
                                   lambda *_: 1.0 / (m * len(attention)), link)
                    bubbles.append(res.bubble_fraction["all"])
                assert all(b <= a + 1e-12 for a, b in zip(bubbles, bubbles[1:])), \
                    (attention, experts, J, link, bubbles)
                assert bubbles[-1] < bubbles[0]


@pytest.mark.parametrize("m", [1, 2, 4])
def test_network_bound_step_is_bytes_over_bandwidth(m):
    """Zero compute and latency, every message nbytes at bw: tau = nbytes/bw.

    The m dispatches leave back to back ([i*tau, (i+1)*tau]), each combine follows its
    dispatch by one tau; the m combine-grads are posted at (m+1)*tau and the last
    dispatch-grad arrives at (2m+2)*tau: step = (2m + 2) * tau.
    """
    nbytes, bw = 4e6, 1e9
    tau = nbytes / bw
    res = simulate(af_pipe_schedule([0], [1], 1, m), costs(0, 0, 0, 0),
                   lambda *_: nbytes, UniformLink(bw, 0.0))
    assert res.step_time == pytest.approx((2 * m + 2) * tau)
    assert res.busy_fraction == {0: 0.0, 1: 0.0}
    # and the attention rank's NIC is busy sending for 2m of those 2m+2 tau.
    sent = sum(s.duration for s in res.spans if s.kind == "send" and s.rank == 0)
    assert sent == pytest.approx(2 * m * tau)


@pytest.mark.parametrize("egress, ingress, expected", [(True, True, 7), (True, False, 6),
                                                       (False, False, 4)])
def test_incast_at_expert_rank(egress, ingress, expected):
    """2 attention ranks, 1 expert, no compute, one tau per message.

    Both serialised: the two dispatches queue at the expert's ingress [0,1], [1,2];
    the combines at its egress [2,3], [3,4]; the combine-grads arrive [3,4], [4,5];
    the dispatch-grads leave [5,6], [6,7] -> 7. Without ingress serialisation the
    dispatches arrive together at 1 -> 6. With neither, 4 (one tau per hop).
    """
    link = UniformLink(1.0, 0.0, serialize_egress=egress, serialize_ingress=ingress)
    res = simulate(af_pipe_schedule([0, 1], [2], 1, 1), costs(0, 0, 0, 0),
                   lambda *_: 1.0, link)
    assert res.step_time == expected


def test_send_to_busy_receiver_does_not_block_other_receivers():
    """2x2: both attention ranks send D to expert 2 first. Rank 1's message to expert 3
    goes at once while expert 2's ingress is busy, so both experts have all data at 2."""
    res = simulate(af_pipe_schedule([0, 1], [2, 3], 1, 1), costs(0, 0, 0, 0),
                   lambda *_: 1.0, UniformLink(1.0, 0.0))
    d = sorted((s.rank, s.peer, s.start) for s in res.spans if str(s.action) == ">D0.0")
    assert d == [(0, 2, 0), (0, 3, 1), (1, 2, 1), (1, 3, 0)]
    assert spans_of(res, 2, "compute")[0] == ("EF0.0", 2, 2)
    assert spans_of(res, 3, "compute")[0] == ("EF0.0", 2, 2)


@pytest.mark.parametrize("groups, J, m", [(([0], [1]), 2, 2), (([0, 1], [2, 3]), 1, 3),
                                          (([3, 0], [1]), 3, 2)])
def test_unit_costs_reproduce_the_grid(groups, J, m):
    """With unit compute and free communication the simulator and format_grid agree."""
    s = af_pipe_schedule(*groups, J, m)
    res = simulate(s, lambda r, a: 0.0 if a.kind is K.REDUCE else 1.0, lambda *_: 0, IDEAL)
    rows = format_grid(s).splitlines()[1:]
    ranks = list(s.actions)
    from_grid = set()
    for row in rows:
        step, *cells = [c.strip() for c in row.split("|")]
        for r, cell in zip(ranks, cells):
            from_grid |= {(r, a, float(step)) for a in cell.split() if a[0] in "FBE"}
    from_sim = {(s.rank, str(s.action), s.start) for s in res.spans if s.kind == "compute"}
    assert from_sim == from_grid
    assert res.step_time == len(rows)


def test_simulate_rejects_invalid_schedule():
    s = af_pipe_schedule([0], [1], 1, 2)
    s.actions[1] = s.actions[1][1:]  # drop <D0.0
    with pytest.raises(ScheduleError, match="missing actions <D0.0"):
        simulate(s, costs(1, 1, 1, 1), lambda *_: 0, IDEAL)


def test_bad_costs_and_links_are_named():
    s = af_pipe_schedule([0], [1], 1, 1)
    with pytest.raises(ValueError, match=r"compute_time\(0, F0.0\) returned -1"):
        simulate(s, lambda r, a: -1, lambda *_: 0, IDEAL)
    with pytest.raises(ValueError, match=r"message_bytes\(0, >D0.0, 1\) returned nan"):
        simulate(s, costs(1, 1, 1, 1), lambda *_: math.nan, IDEAL)
    with pytest.raises(ValueError, match="UniformLink bandwidth=0"):
        UniformLink(0, 0)
    with pytest.raises(NotImplementedError, match="must define bandwidth"):
        simulate(s, costs(1, 1, 1, 1), lambda *_: 1, LinkModel())


def test_per_pair_link_model():
    """A slow link from the expert back to attention only slows the return hops."""
    class Asymmetric(LinkModel):
        def bandwidth(self, src, dst):
            return 1.0 if src == 1 else 4.0

        def latency(self, src, dst):
            return 0.0

    res = simulate(af_pipe_schedule([0], [1], 1, 1), costs(0, 0, 0, 0), lambda *_: 4.0,
                   Asymmetric())
    assert res.step_time == 1 + 4 + 1 + 4


# ---------------------------------------------------------------- timeline


def _small_result():
    return simulate(af_pipe_schedule([0], [1], 1, 1), costs(1, 2, 3, 4),
                    lambda *_: 100, UniformLink(100, 0.5))


def test_chrome_trace(tmp_path):
    res = _small_result()
    path = tmp_path / "trace.json"
    chrome_trace(res.spans, path)
    trace = json.loads(path.read_text())
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == len(res.spans)
    by_name = {(e["pid"], e["name"], e["cat"]): e for e in complete}
    ef = by_name[(1, "EF0.0", "compute")]  # EF0.0 runs [2.5, 4.5] s
    assert (ef["ts"], ef["dur"], ef["tid"]) == (2.5e6, 2e6, 0)
    d = by_name[(0, ">D0.0", "send")]      # on the wire [1, 2] s, NIC thread
    assert (d["ts"], d["dur"], d["tid"], d["args"]["peer"]) == (1e6, 1e6, 1, 1)
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {"rank 0", "rank 1"}


def test_span_checks_its_fields():
    a = af_pipe_schedule([0], [1], 1, 1).actions[0][0]
    with pytest.raises(ValueError, match="Span.kind='idle'"):
        Span(0, a, 0.0, 1.0, "idle")
    with pytest.raises(ValueError, match="ends"):
        Span(0, a, 2.0, 1.0, "compute")


def test_gantt_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "gantt.png"
    gantt_png(_small_result().spans, path, title="1A+1E")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_gantt_png_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.raises(ImportError, match=r"pip install fxdisag\[plot\]"):
        gantt_png(_small_result().spans, tmp_path / "g.png")


def test_transfer_waits_for_the_receive_to_be_posted():
    """1A+1E, J=1, m=2, F=EF=EB=1, B=5, 2 s per message, with rank 0's <GD receives moved
    (by hand) after B1.1. The expert sends >GD0.0 at 17 (after EB0.0 [16,17]) but rank 0
    posts <GD0.0 only after B1.1 [14,19]: the transfer runs [19,21] (rendezvous), then
    B0.0 [21,26], B0.1 [26,31]."""
    sched = af_pipe_schedule([0], [1], 1, 2)
    late = [a for a in sched.actions[0] if a.kind is ActionKind.RECV_GD]
    rest = [a for a in sched.actions[0] if a.kind is not ActionKind.RECV_GD]
    cut = next(k for k, a in enumerate(rest) if str(a) == "B1.1") + 1
    sched.actions[0] = rest[:cut] + late + rest[cut:]
    validate(sched)
    res = simulate(sched, costs(1, 1, 5, 1), lambda *_: 2.0, UniformLink(1.0, 0.0))
    assert [x for x in spans_of(res, 1, "send") if x[0].startswith(">GD")] == [
        (">GD0.0", 19, 21), (">GD0.1", 22, 24)]
    assert spans_of(res, 0, "compute")[-2:] == [("B0.0", 21, 26), ("B0.1", 26, 31)]
    assert res.step_time == 31
