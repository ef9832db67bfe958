"""Message rows: a token crosses the attention/experts boundary once per expert rank holding
>= 1 of its top_k experts (ROWS_PER_RANK), checked against Monte Carlo routing, hand cases,
the routing tables, and the predicted bytes, times and memory of small layouts."""

import math

import pytest
import torch

from fxdisag.planner import ClusterSpec, plan
from fxdisag.planner.cost_ep import ep_times
from fxdisag.planner.formulas import FORMULAS, ROWS_PER_RANK, Recorder
from fxdisag.planner.memory import afpipe_memory
from fxdisag.planner.placement import STRATEGIES, GroupLayout, domain_owners, expected_rows_per_token, rows_per_rank
from fxdisag.planner.profile import synthetic_profile
from fxdisag.planner.workload import Workload

H, D = 64, 4  # hidden size, fp32


def sampled_rows(owner: list[int], top_k: int, tokens: int = 200_000, seed: int = 0):
    """Monte Carlo: tokens pick top_k of E experts uniformly without replacement (argsort of
    iid uniforms is a uniform permutation); per token, the distinct ranks its experts map to.
    Returns (per-rank fraction of tokens reaching it, mean rows per token, its standard error)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.rand(tokens, len(owner), generator=gen).argsort(dim=1)[:, :top_k]
    ranks = torch.tensor(owner)[chosen]  # [tokens, top_k]
    reached = torch.zeros(tokens, max(owner) + 1, dtype=torch.bool).scatter_(1, ranks, True)
    rows = reached.sum(dim=1).double()
    return reached.double().mean(dim=0), rows.mean().item(), rows.std().item() / math.sqrt(tokens)


def sizes(owner: list[int]) -> list[int]:
    return [owner.count(r) for r in range(max(owner) + 1)]


@pytest.mark.parametrize("owner, top_k", [
    ([0, 0, 1, 1, 2, 2, 3, 3], 2),  # equal groups: 8 experts over 4 ranks
    ([0, 0, 0, 0, 1, 1, 1, 2, 2, 2], 3),  # unequal: 10 experts over 3 ranks (4, 3, 3)
    ([2, 0, 1, 0, 2, 1, 0, 1, 2, 0], 4),  # unequal and interleaved (4, 3, 3)
    ([0] * 6 + [1] * 2, 2),  # very unequal (6, 2)
])
def test_formula_matches_monte_carlo_routing(owner, top_k):
    E = len(owner)
    per_rank, mean, se = sampled_rows(owner, top_k)
    want = expected_rows_per_token(E, top_k, sizes(owner))
    assert abs(mean - want) < 4 * se and abs(mean - want) < 0.01 * want, (mean, want, se)
    for r, g in enumerate(sizes(owner)):
        p = rows_per_rank(E, top_k, g)
        assert abs(per_rank[r].item() - p) < 4 * math.sqrt(p * (1 - p) / 200_000) + 1e-12, (r, per_rank[r], p)


def test_hand_cases():
    assert expected_rows_per_token(8, 1, [2, 2, 2, 2]) == pytest.approx(1.0)  # top_k 1: one row
    assert expected_rows_per_token(10, 1, [4, 3, 3]) == pytest.approx(1.0)
    assert expected_rows_per_token(8, 4, [8]) == 1.0  # one expert rank: exactly one row
    assert expected_rows_per_token(8, 8, [2, 2, 2, 2]) == 4.0  # top_k = E: every rank
    assert expected_rows_per_token(10, 10, [4, 3, 3]) == 3.0
    # 4 experts on 2 ranks, top_k 2: a token misses a rank only if both experts are the other
    # rank's (1 of the C(4, 2) = 6 pairs): 5/6 per rank, 5/3 per token
    assert rows_per_rank(4, 2, 2) == pytest.approx(5 / 6)
    assert expected_rows_per_token(4, 2, [2, 2]) == pytest.approx(5 / 3)
    # one expert per rank: no two of a token's experts share a rank, top_k rows
    assert expected_rows_per_token(6, 3, [1] * 6) == pytest.approx(3.0)
    assert rows_per_rank(256, 8, 0) == 0.0 and rows_per_rank(256, 8, 256) == 1.0  # exact binomials at E = 256


def test_invalid_tables_are_refused():
    with pytest.raises(ValueError, match="sum to 7"):
        expected_rows_per_token(8, 2, [4, 3])
    with pytest.raises(ValueError, match="top_k=9"):
        rows_per_rank(8, 9, 2)
    with pytest.raises(ValueError, match="needs non-negative integers"):
        ROWS_PER_RANK(E=8, K=2, g=1.5)
    assert FORMULAS["ROWS_PER_RANK"] is ROWS_PER_RANK


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("A,F,E", [(1, 3, 4), (2, 6, 8), (3, 5, 8), (5, 3, 16), (4, 12, 8), (7, 9, 64), (3, 4, 10)])
def test_layout_rows_match_the_routing_table(strategy, A, F, E):
    """The layout's fast path against the owner table itself: per expert rank, how many
    attention ranks send it how many experts' rows, and the rows that gives (math.comb here)."""
    cluster = ClusterSpec.cpu(A + F, flops=1.0, bandwidth=1.0)
    attention, experts = list(range(A)), list(range(A, A + F))
    layout = GroupLayout.build(cluster, attention, experts, E, strategy=strategy, nic_split=[1.0] * (A + F))
    owners = domain_owners(strategy, E, attention, experts)
    for r in experts:
        counts: dict[int, int] = {}
        for own in owners.values():
            g = own.count(r)
            if g:
                counts[g] = counts.get(g, 0) + 1
        assert layout.routing[r] == tuple(sorted(counts.items())), r
    for K in sorted({1, 2, min(3, E), E}):
        hand = {r: sum(1 - math.comb(E - own.count(r), K) / math.comb(E, K) for own in owners.values())
                for r in experts}
        assert layout.received_rows(K) == pytest.approx(hand)
        assert layout.rows_per_token(K) == pytest.approx(sum(hand.values()) / A)
        assert layout.max_received_rows(K) == pytest.approx(max(hand.values()))


def test_layout_rows_match_monte_carlo_through_its_owners():
    # 2 attention ranks, 3 expert ranks, 10 experts, top_k 3: unequal groups per attention rank
    cluster = ClusterSpec.cpu(5, flops=1.0, bandwidth=1.0)
    layout = GroupLayout.build(cluster, [0, 1], [2, 3, 4], 10, strategy="pairs", nic_split=[1.0] * 5)
    sampled = [sampled_rows([r - 2 for r in own], 3, seed=a) for a, own in layout.owners().items()]
    mean = sum(s[1] for s in sampled) / 2
    se = math.sqrt(sum(s[2] ** 2 for s in sampled)) / 2
    assert abs(mean - layout.rows_per_token(3)) < 4 * se


def toy(top_k=2, experts=4, saved=0.0):
    return synthetic_profile(num_layers=2, hidden_size=H, num_experts=experts, top_k=top_k, params_per_expert=1000,
                             attention_flops_per_token=4000.0, expert_saved_per_row=saved, seq_len=128,
                             dtype_bytes=D)


def test_one_expert_rank_gets_one_row_per_token():
    # 1 attention + 1 expert device on two single-device nodes, 1 GB/s, no latency: every token
    # sends one row (its top_k = 2 experts all sit on the one expert rank), top_k times fewer
    # rows than one per (token, expert)
    K, tokens = 2, 4 * 128
    cluster = ClusterSpec.cpu(2, flops=1e12, bandwidth=1e9, latency=0.0)
    result = plan(toy(K), cluster, 4, num_attention=1, num_microbatches=1, microbatch_size=4, baseline=False)
    t = result.breakdown
    row = {"dispatch": H * D + K * (D + 4), "combine": H * D, "combine_grad": H * D, "dispatch_grad": H * D + K * D}
    for key, per_row in row.items():
        assert t[f"{key}_bytes"] == tokens * per_row, key
        assert t[key] == pytest.approx(tokens * per_row / 1e9), key  # all of it over the one NIC
    assert t["combine_bytes"] == tokens * K * H * D / K  # the old count was K rows per token
    assert t["rows_per_token"] == 1.0
    assert "ROWS_PER_RANK = 1 - binomial(E - g, K)/binomial(E, K)" in result.explain()
    assert "ROWS_PER_RANK(E=4, K=2, g=4) = 1" in result.explain()


def test_ep_sends_rows_to_the_other_ranks_only():
    # EP 2 on two single-device nodes, 4 experts (2 per rank), top_k 2: a token reaches the
    # other rank unless both its experts are local (1 of 6 pairs): 5/6 rows per token cross
    K, tokens = 2, 128
    work = Workload.from_profile(toy(K), 128)
    cluster = ClusterSpec.cpu(2, flops=1e12, bandwidth=1e9, latency=0.0)
    rec = Recorder()
    ep_times(work, cluster, 2, 1, 1, rec)
    sent = {e.label: e.inputs["nic_out"] for e in rec.evaluations if e.formula == "TRANSFER_TIME"}
    assert sent["EP no overlap: dispatch all-to-all"] == pytest.approx(tokens * 5 / 6 * (H * D + K * (D + 4)))
    assert sent["EP no overlap: combine all-to-all"] == pytest.approx(tokens * 5 / 6 * H * D)
    assert sent["EP overlap: dispatch all-to-all"] == pytest.approx(tokens / 2 * 5 / 6 * (H * D + K * (D + 4)))


def test_expert_memory_keeps_received_rows_or_pair_activations():
    # one expert rank: each token is one received row, K routed pairs. A micro-batch more in
    # flight adds, per layer, the received rows (recomputing) or the pairs' activations (not).
    K, saved, L, tokens = 2, 1000.0, 2, 128
    work = Workload.from_profile(toy(K, saved=saved), 128)
    cluster = ClusterSpec.cpu(2, flops=1e12, bandwidth=1e9)
    layout = GroupLayout.build(cluster, [0], [1], 4, nic_split=[1.0, 1.0])

    def experts(m, recompute):
        return afpipe_memory(work, layout, 1, m, "adam", True, recompute=(False, recompute))["experts"]

    assert experts(2, True) - experts(1, True) == pytest.approx(L * tokens * (H * D + K * (D + 4)))
    assert experts(2, False) - experts(1, False) == pytest.approx(L * tokens * K * saved)


def test_two_node_transfer_by_hand():
    # 2 nodes of 2 devices, one routing domain: attention ranks 0 and 2, expert ranks 1 (experts
    # 0, 1) and 3 (experts 2, 3), top_k 2. Every attention rank sends each expert rank 2 of the 4
    # experts' rows: 5/6 rows per token each, one of them over the NIC, one over NVLink.
    from fxdisag.planner.placement import afpipe_transfer

    cluster = ClusterSpec.parse("2x2xh800")
    layout = GroupLayout.build(cluster, [0, 2], [1, 3], 4, strategy="replicas", nic_split=[4.0, 4.0])
    assert layout.routing == {1: ((2, 2),), 3: ((2, 2),)}
    X = 6e9  # one row per token of an attention device
    t = afpipe_transfer(cluster, layout, X, top_k=2, toward_experts=True)
    nic = X * 5 / 6 / (4 * 50e9)  # the row to the other node, over the 4 attention NICs
    link = X * 5 / 6 / 200e9  # the row to the local expert rank, over NVLink
    assert t == pytest.approx(max(nic, link) + cluster.inter_node_latency)
    assert layout.rows_per_token(2) == pytest.approx(5 / 3)  # the old model: 2, one per (token, expert)
