"""Where AF-pipe's two groups sit, how rows are routed, and what a transfer between the
groups costs.

Contract
--------
:class:`GroupLayout` (``GroupLayout.build``): attention and expert ranks, routing
domains of consecutive nodes, the expert placement and routing inside each domain
(:func:`domain_owners`, strategy ``"pairs"`` or ``"replicas"``, :data:`STRATEGIES`),
per-node shares (:class:`NodeShare`) and the NIC split of every node holding both
groups. :func:`expert_owners` gives the routing table from a placement alone (manual
plans). :func:`afpipe_transfer` is the time (seconds) of one micro-batch's transfer
between the groups: TRANSFER_TIME (``formulas.py``) on the slowest node, of
message rows x bytes per row, where a token sends one row to every expert rank holding
>= 1 of its top_k experts: :func:`expected_rows_per_token` (ROWS_PER_RANK summed over
the ranks) and, per layout, :meth:`GroupLayout.received_rows` /
:meth:`GroupLayout.rows_per_token` from the routing table's group sizes (how many
experts' rows each attention rank sends each expert rank, :attr:`GroupLayout.routing`)::

    TRANSFER_TIME   t = max(nic_out / (n_out bw_nic), nic_in / (n_in bw_nic),
                            link_out / bw_link, link_in / bw_link) + latency
                    (one node; the slowest node sets the time; NVLink and NIC run in parallel)

:func:`group_span` gives (most devices of a group on one node, nodes it spans), the
g and k of ALLREDUCE_TIME.

Assumptions: uniform routing (a token's top_k experts are a uniform choice without
replacement, so every expert gets the same share of the top_k (token, expert) pairs); an
attention rank sends all rows of one expert to one expert rank (the routing table
``Plan.expert_owner``, which is what the runtime's dispatch supports), so replicas
balance load only across attention ranks; transfers count distinct destination ranks
(ROWS_PER_RANK), expert compute counts pairs (:attr:`GroupLayout.max_load`); a node's
transfer spreads the mean attention rank's rows (over its domain) as the routing table
does; NIC sharing between devices of a node (PXN-style) is free; a NIC shared by both
groups of a node counts half for each.
Bytes are bytes, bandwidths bytes/s, latencies seconds (``ClusterSpec``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property

from fxdisag.planner.formulas import ROWS_PER_RANK, TRANSFER_TIME

__all__ = [
    "STRATEGIES",
    "GroupLayout",
    "NodeShare",
    "afpipe_transfer",
    "domain_owners",
    "ring_transfer",
    "expert_owners",
    "expected_rows_per_token",
    "group_span",
    "rows_per_rank",
]

# How one expert rank is routed to: ((g, n), ...), g ascending, g >= 1, n >= 1: n of its
# domain's attention ranks send it the rows of g experts each.
Groups = tuple[tuple[int, int], ...]


@functools.lru_cache(maxsize=None)
def rows_per_rank(num_experts: int, top_k: int, group: int) -> float:
    """ROWS_PER_RANK: expected rows per token an attention rank sends to an expert rank that
    receives the rows of ``group`` of the ``num_experts`` experts from it (the formula,
    evaluated once per arguments)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"rows_per_rank: top_k={top_k} must be in 1..{num_experts} (the experts)")
    if not 0 <= group <= num_experts:
        raise ValueError(f"rows_per_rank: group={group} must be in 0..{num_experts} (the experts)")
    return ROWS_PER_RANK(E=num_experts, K=top_k, g=group)


def expected_rows_per_token(num_experts: int, top_k: int, group_sizes: Iterable[int]) -> float:
    """Expected rows one token sends (its distinct destination expert ranks) when its
    attention rank sends the rows of ``group_sizes[r]`` of the E experts to expert rank r:
    the sum of ROWS_PER_RANK over the ranks. ``group_sizes`` partitions the experts (sums
    to E): 1 rank gives exactly 1 row, top_k = 1 gives 1, top_k = E gives the rank count."""
    sizes = list(group_sizes)
    if sum(sizes) != num_experts:
        raise ValueError(f"expected_rows_per_token: group sizes {sizes} sum to {sum(sizes)}, not the "
                         f"{num_experts} experts (every expert's rows go to exactly one rank)")
    return sum(rows_per_rank(num_experts, top_k, g) for g in sizes)


def _groups(counts: dict[int, int]) -> Groups:
    return tuple(sorted((g, n) for g, n in counts.items() if g > 0 and n > 0))


def _merge(groups: Iterable[Groups]) -> Groups:
    total: Counter = Counter()
    for gs in groups:
        for g, n in gs:
            total[g] += n
    return _groups(total)


def _rows(groups: Groups, E: int, K: int) -> float:
    """Rows per token the attention ranks of ``groups`` send together (in attention ranks' worth)."""
    return sum(n * rows_per_rank(E, K, g) for g, n in groups)


@dataclass(frozen=True)
class NodeShare:
    """What one node holds of an AF-pipe layout (identical nodes are folded into one).

    The routing is that of the node's *routing domain* (the nodes whose attention ranks
    route to the same set of expert replicas); :meth:`rows` turns it into message rows."""

    attention: int  # attention devices on the node
    domain_attention: int  # attention devices in the node's routing domain
    experts: int  # expert devices on the node
    groups: tuple[Groups, ...]  # per expert device of the node: how the domain routes to it (() if nobody does)
    domain_groups: Groups  # merged over every expert device of the domain
    nics_attention: float  # NICs the attention devices use (a shared single NIC counts 1/2)
    nics_experts: float

    def rows(self, num_experts: int, top_k: int) -> tuple[float, float, float]:
        """Message rows per token of one attention device of the domain (mean over them):
        (to expert devices on other nodes, to this node's, to this node's busiest)."""
        return _node_rows(self.groups, self.domain_groups, self.domain_attention, num_experts, top_k)


@functools.lru_cache(maxsize=65536)
def _node_rows(groups: tuple[Groups, ...], domain_groups: Groups, domain_attention: int, E: int,
               K: int) -> tuple[float, float, float]:
    if domain_attention == 0:
        return 0.0, 0.0, 0.0
    per_device = [_rows(gs, E, K) for gs in groups]
    a = domain_attention
    # a domain of this node alone sends nothing away: exactly 0, not a rounding residue
    away = 0.0 if _merge(groups) == domain_groups else _rows(domain_groups, E, K) - sum(per_device)
    return away / a, sum(per_device) / a, max(per_device, default=0.0) / a


STRATEGIES = ("pairs", "replicas")


def domain_owners(strategy: str, num_experts: int, attention: list[int], experts: list[int]) -> dict[int, tuple[int, ...]]:
    """Routing inside one domain: attention rank -> the expert rank it sends each expert's rows to.

    ``"pairs"``: the (t, e) pairs (t-th attention rank, expert e) go round-robin over the
    expert ranks: owner = experts[(t * E + e) mod F]. Every expert rank gets the rows of
    floor or ceil(A * E / F) pairs (balanced load), and holds the experts of its pairs.
    ``"replicas"``: expert rank j holds experts (j * c + s) mod E for s < c = ceil(E / F)
    (fewest experts per rank); the t-th attention rank uses replica t mod q of an expert's
    q replicas.
    """
    E, F = num_experts, len(experts)
    if strategy == "pairs":
        return {a: tuple(experts[(t * E + e) % F] for e in range(E)) for t, a in enumerate(attention)}
    if strategy == "replicas":
        c = -(-E // F)
        replicas: list[list[int]] = [[] for _ in range(E)]
        for j, r in enumerate(experts):
            for s_ in range(c):
                replicas[(j * c + s_) % E].append(r)
        return {a: tuple(rs[t % len(rs)] for rs in replicas) for t, a in enumerate(attention)}
    raise ValueError(f"unknown placement strategy {strategy!r}; choose from {STRATEGIES}")


@functools.lru_cache(maxsize=4096)
def _domain_groups(strategy: str, E: int, a: int, F: int) -> tuple[Groups, ...]:
    """Fast path of :func:`domain_owners` for the transfers: per expert rank (index j), how
    many of the domain's ``a`` attention ranks send it the rows of how many experts."""
    if strategy == "pairs":
        # attention rank t sends expert rank j the experts e = j - t E (mod F): q or q + 1 of
        # them, so the rank's pair count (as _domain_loads counts it) gives how many send q + 1
        q, pairs = E // F, a * E
        out = []
        for j in range(F):
            count = pairs // F + (1 if j < pairs % F else 0)
            high = count - a * q
            out.append(_groups({q + 1: high, q: a - high}))
        return tuple(out)
    c = -(-E // F)
    holders: list[list[int]] = [[] for _ in range(E)]
    for j in range(F):
        for s_ in range(c):
            holders[(j * c + s_) % E].append(j)
    # attention rank t uses replica t mod q_e of expert e: ranks t = t' mod lcm(q_e) route alike
    period = math.lcm(*{len(hs) for hs in holders})
    counts: list[Counter] = [Counter() for _ in range(F)]
    for t in range(min(a, period)):
        alike = a // period + (1 if t < a % period else 0)
        for j, g in Counter(hs[t % len(hs)] for hs in holders).items():
            counts[j][g] += alike
    return tuple(_groups(cnt) for cnt in counts)


@functools.lru_cache(maxsize=4096)
def _domain_loads(strategy: str, E: int, a: int, F: int) -> tuple[tuple[float, ...], tuple[int, ...], int]:
    """Fast path of :func:`domain_owners`: per expert rank (index j) its rows in attention
    devices' worth and its expert count, and the fewest replicas of an expert in the domain."""
    g = math.gcd(E, F)
    if strategy == "pairs":
        pairs = a * E
        count = [pairs // F + (1 if j < pairs % F else 0) for j in range(F)]
        return tuple(c / E for c in count), tuple(min(c, E // g) for c in count), min(a, F // g)
    c = -(-E // F)
    holders: list[list[int]] = [[] for _ in range(E)]  # expert -> indices j of its holders, in rank order
    for j in range(F):
        for s_ in range(c):
            holders[(j * c + s_) % E].append(j)
    load = [0.0] * F
    held = [0] * F
    for hs in holders:
        q = len(hs)
        for index, j in enumerate(hs):
            load[j] += (a // q + (1 if index < a % q else 0)) / E
            # Only replicas that some attention rank routes to exist (placement() lists
            # exactly those): with a < q attention ranks, replicas a..q-1 are never made.
            held[j] += 1 if index < a else 0
    return tuple(load), tuple(held), min(min(len(hs), a) for hs in holders)


@dataclass
class GroupLayout:
    """Where the two groups sit: ranks, routing domains, expert placement, per-node shares
    and NIC split.

    Routing domains: the nodes are cut into domains of ``domain_nodes`` consecutive
    nodes; every domain holding attention ranks holds a replica of every expert, and its
    attention ranks send rows only to expert ranks of the domain, as
    :func:`domain_owners` (``strategy``) says."""

    attention_ranks: list[int]
    expert_ranks: list[int]
    num_experts: int
    strategy: str
    domain_nodes: int
    devices_per_node: int
    nodes: list[NodeShare]  # one per node of the cluster, in node order
    device_load: dict[int, float]  # expert rank -> routed pairs per micro-batch, in attention devices' worth of tokens
    experts_held: dict[int, int]  # expert rank -> experts it holds
    min_replicas: int  # fewest replicas of any expert (all domains)
    routing: dict[int, Groups]  # expert rank -> how its domain's attention ranks route to it (() if none do)
    _rows: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @cached_property
    def max_load(self) -> float:
        """Routed (token, expert) pairs on the busiest expert device per micro-batch, per (token x
        top_k) of one attention device: pairs = tokens_per_attention_device x top_k x max_load
        (what expert compute and activations count)."""
        return max(self.device_load.values())

    def received_rows(self, top_k: int) -> dict[int, float]:
        """expert rank -> message rows it receives per micro-batch, per token of one attention
        device (ROWS_PER_RANK summed over the attention ranks routing to it): rows =
        tokens_per_attention_device x received_rows[r]."""
        if top_k not in self._rows:
            self._rows[top_k] = {r: _rows(gs, self.num_experts, top_k) for r, gs in self.routing.items()}
        return self._rows[top_k]

    def max_received_rows(self, top_k: int) -> float:
        """:meth:`received_rows` of the expert device receiving the most."""
        return max(self.received_rows(top_k).values())

    def rows_per_token(self, top_k: int) -> float:
        """Message rows one token sends (its distinct destination expert ranks), mean over the
        attention ranks: between 1 and top_k."""
        return sum(self.received_rows(top_k).values()) / len(self.attention_ranks)

    def record_rows(self, recorder, top_k: int) -> None:
        """Record ROWS_PER_RANK for every group size of the routing (``plan.explain()``)."""
        for g in sorted({g for gs in self.routing.values() for g, _ in gs}):
            ROWS_PER_RANK(recorder, f"rows per token to an expert rank receiving {g} expert(s)' rows from an "
                          "attention rank", E=self.num_experts, K=top_k, g=g)

    @cached_property
    def experts_per_device(self) -> int:
        return max(self.experts_held.values())

    @cached_property
    def distinct_nodes(self) -> list["NodeShare"]:
        return list(dict.fromkeys(self.nodes))

    def domains(self) -> list[list[int]]:
        """Ranks (attention and expert) of each routing domain."""
        per = self.domain_nodes * self.devices_per_node
        out: dict[int, list[int]] = {}
        for r in sorted(self.attention_ranks + self.expert_ranks):
            out.setdefault(r // per, []).append(r)
        return list(out.values())

    def owners(self) -> dict[int, tuple[int, ...]]:
        """attention rank -> expert rank per expert (the routing table, all domains)."""
        out: dict[int, tuple[int, ...]] = {}
        for domain in self.domains():
            members = set(domain)
            attention = [r for r in self.attention_ranks if r in members]
            experts = [r for r in self.expert_ranks if r in members]
            if attention:
                out.update(domain_owners(self.strategy, self.num_experts, attention, experts))
        return out

    def placement(self) -> list[list[int]]:
        """expert id -> the expert ranks that receive its rows (sorted)."""
        holders: list[set[int]] = [set() for _ in range(self.num_experts)]
        for own in self.owners().values():
            for e, r in enumerate(own):
                holders[e].add(r)
        return [sorted(h) for h in holders]

    def replica_group(self, expert: int = 0) -> list[int]:
        """Ranks that receive ``expert``'s rows, all domains (cheap: one expert only)."""
        E = self.num_experts
        ranks: set[int] = set()
        for domain in self.domains():
            members = set(domain)
            a = sum(1 for r in self.attention_ranks if r in members)
            experts = [r for r in self.expert_ranks if r in members]
            F = len(experts)
            if not a:
                continue
            if self.strategy == "pairs":
                ranks |= {experts[(t * E + expert) % F] for t in range(a)}
            else:
                c = -(-E // F)
                holders = [r for j, r in enumerate(experts) if any((j * c + s_) % E == expert for s_ in range(c))]
                ranks |= set(holders[:a])
        return sorted(ranks)

    @classmethod
    def build(
        cls,
        cluster,
        attention_ranks: list[int],
        expert_ranks: list[int],
        num_experts: int,
        *,
        strategy: str = "pairs",
        domain_nodes: int | None = None,
        nic_split: list[float] | None = None,
        transfer_bytes: tuple[float, float, float, float] | None = None,
        top_k: int | None = None,
        sync_bytes: tuple[float, float] | None = None,
        hop_bytes: tuple[float, float] | Callable[[float], tuple[float, float]] | None = None,
    ) -> "GroupLayout":
        """``nic_split[n]``: NICs of node n given to its attention devices (the rest go to
        its experts). None chooses, per node, the split that minimises the node's slowest
        transfer of ``transfer_bytes`` = per message row (dispatch, combine, combine-grad,
        dispatch-grad) bytes, ``top_k`` experts per token (evaluated with TRANSFER_TIME,
        rows from ROWS_PER_RANK); ties (no cross-node traffic)
        go to the split closest to the node's share of gradient all-reduce bytes,
        ``sync_bytes`` = (per attention device, per expert of all layers), or to the
        device ratio without it. ``hop_bytes`` = per-token (hop, hop gradient) bytes, or a
        function of a token's message rows giving them (``cost_afpipe.hop_bytes_per_token``:
        the hop carries the combine's row -> token index, one per row; evaluated with the
        node's rows per token): the layout is one group pair of a pipeline of depth p > 1,
        whose combine and combine gradient cross to the next pair's nodes beside the hop
        (:func:`ring_transfer`), and the split is chosen for those transfers."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown placement strategy {strategy!r}; choose from {STRATEGIES}")
        dpn, N = cluster.devices_per_node, cluster.num_nodes
        d = domain_nodes or N
        if N % d:
            raise ValueError(f"domain_nodes={d} does not divide the {N} nodes")
        per_domain = d * dpn
        E = num_experts
        attn_by_domain: dict[int, list[int]] = {}
        exp_by_domain: dict[int, list[int]] = {}
        for r in attention_ranks:
            attn_by_domain.setdefault(r // per_domain, []).append(r)
        for r in expert_ranks:
            exp_by_domain.setdefault(r // per_domain, []).append(r)
        load: dict[int, float] = {r: 0.0 for r in expert_ranks}
        held: dict[int, int] = {r: 0 for r in expert_ranks}
        routing: dict[int, Groups] = {r: () for r in expert_ranks}
        domain_groups: dict[int, Groups] = {}
        min_replicas = math.inf
        for D, attention in attn_by_domain.items():
            experts = exp_by_domain.get(D)
            if not experts:
                raise ValueError(f"routing domain {D} (nodes {D * d}..{D * d + d - 1}) has attention ranks but no "
                                 "expert ranks")
            loads, counts, replicas = _domain_loads(strategy, E, len(attention), len(experts))
            groups = _domain_groups(strategy, E, len(attention), len(experts))
            for r, x, c, gs in zip(experts, loads, counts, groups):
                load[r], held[r], routing[r] = x, c, gs
            domain_groups[D] = _merge(groups)
            min_replicas = min(min_replicas, replicas)
        min_replicas = int(min_replicas) * len(attn_by_domain)  # every domain holds each expert
        domain_attention = {D: len(v) for D, v in attn_by_domain.items()}
        attn_set = set(attention_ranks)
        expert_set = set(expert_ranks)
        nodes: list[NodeShare] = []
        chosen: dict[tuple, float] = {}
        NIC = cluster.nics_per_node
        for n in range(N):
            ranks = range(n * dpn, (n + 1) * dpn)
            a = sum(1 for r in ranks if r in attn_set)
            a_dom = domain_attention.get(n // d, 0)
            exp = [r for r in ranks if r in expert_set]
            node = NodeShare(a, a_dom, len(exp), tuple(routing[r] for r in exp) if a_dom else (),
                             domain_groups.get(n // d, ()), 0.0, 0.0)
            if a and exp:
                if NIC == 1:
                    na = 0.5
                elif nic_split is not None:
                    na = float(nic_split[n])
                else:
                    if sync_bytes is None:
                        weight = a / (a + len(exp))
                    else:
                        wa = a * sync_bytes[0]
                        we = sum(held[r] for r in exp) * sync_bytes[1]
                        weight = wa / (wa + we) if wa + we > 0 else a / (a + len(exp))
                    key = (node, weight)
                    if key not in chosen:
                        chosen[key] = _best_nic_split(cluster, node, E, top_k, transfer_bytes, weight, hop_bytes)
                    na = chosen[key]
                ne = NIC - na if NIC > 1 else 0.5
            else:
                na, ne = (float(NIC), 0.0) if a else (0.0, float(NIC) if exp else 0.0)
            nodes.append(dataclasses.replace(node, nics_attention=na, nics_experts=ne))
        return cls(list(attention_ranks), list(expert_ranks), E, strategy, d, dpn, nodes, load, held, min_replicas,
                   routing)

    def nic_split(self) -> list[tuple[float, float]]:
        return [(n.nics_attention, n.nics_experts) for n in self.nodes]


def expert_owners(attention_ranks: list[int], placement: list[list[int]], domains: list[list[int]]) -> dict[int, tuple[int, ...]]:
    """Routing from a placement alone (manual plans): the t-th attention rank of a routing
    domain uses replica t mod q of the domain's q replicas of each expert."""
    out: dict[int, tuple[int, ...]] = {}
    for domain in domains:
        members = set(domain)
        peers = [r for r in attention_ranks if r in members]
        local = [[r for r in ranks if r in members] for ranks in placement]
        for e, ranks in enumerate(local):
            if peers and not ranks:
                raise ValueError(f"expert {e} has no replica in the routing domain of ranks {sorted(members)}")
        for t, rank in enumerate(peers):
            out[rank] = tuple(ranks[t % len(ranks)] for ranks in local)
    return out


def _best_nic_split(cluster, node: NodeShare, num_experts: int, top_k: int | None, transfer_bytes,
                    weight: float, hop_bytes=None) -> float:
    """NICs for the attention devices of ``node``: the split with the fastest slowest transfer
    (``transfer_bytes`` per message row, times the node's rows per token); ties (e.g. no
    cross-node traffic) go to the split closest to ``weight`` x NICs."""
    if transfer_bytes is None:
        raise ValueError("GroupLayout.build needs nic_split or transfer_bytes to choose the NIC split")
    if top_k is None:
        raise ValueError("GroupLayout.build needs top_k with transfer_bytes: the message rows a token sends "
                         "depend on it (ROWS_PER_RANK)")
    rows = node.rows(num_experts, top_k)
    N = cluster.nics_per_node
    best, best_key = 1.0, (math.inf, math.inf)
    for na in range(1, N):
        split = dataclasses.replace(node, nics_attention=float(na), nics_experts=float(N - na))
        if hop_bytes is None:
            t = max(
                _node_transfer(cluster, split, b, rows, toward_experts=(i % 2 == 0), latency=0.0)
                for i, b in enumerate(transfer_bytes)
            )
        else:  # p > 1: dispatch inside the pair, combine across to the next (with the hop)
            d, c, gc, gd = transfer_bytes
            hf, hb = hop_bytes(rows[0] + rows[1]) if callable(hop_bytes) else hop_bytes  # rows: this node's
            t = max(_node_transfer(cluster, split, d, rows, toward_experts=True, latency=0.0, hop=hf),
                    _node_ring_transfer(cluster, split, c, rows, hf, toward_experts=False),
                    _node_ring_transfer(cluster, split, gc, rows, hb, toward_experts=True),
                    _node_transfer(cluster, split, gd, rows, toward_experts=False, latency=0.0, hop=hb))
        key = (round(t, 15), abs(na - N * weight))
        if key < best_key:
            best, best_key = float(na), key
    return best


def _node_transfer(cluster, node: NodeShare, row_bytes: float, rows: tuple[float, float, float], *,
                   toward_experts: bool, latency: float | None = None, recorder=None, label=None,
                   hop: float = 0.0) -> float:
    """One node's time for a transfer where every attention device exchanges message rows
    with the expert replicas of its routing domain: ``row_bytes`` = bytes of one row for
    each of its tokens, ``rows`` = :meth:`NodeShare.rows` (rows per token to expert devices
    on other nodes, to this node's, to its busiest), while ``hop`` bytes per attention device
    leave (toward the experts) or enter the node over the same attention NICs, from or to
    another group pair (p > 1)."""
    a = node.attention
    away, here, top = rows
    attn_nic = a * row_bytes * away + a * hop  # leaves/enters the node at its attention devices
    exp_nic = (node.domain_attention - a) * row_bytes * here  # enters/leaves at its expert devices
    attn_link = row_bytes * here if a else 0.0  # one attention device <-> local experts
    exp_link = a * row_bytes * top  # local attention devices <-> the busiest local expert
    cross = attn_nic > 0 or exp_nic > 0 or (a and hop > 0)
    if latency is None:
        latency = cluster.inter_node_latency if cross else (cluster.intra_node_latency if attn_link or exp_link else 0.0)
    n_a = node.nics_attention or 1.0
    n_e = node.nics_experts or 1.0
    if toward_experts:
        values = dict(nic_out=attn_nic, n_out=n_a, nic_in=exp_nic, n_in=n_e, link_out=attn_link, link_in=exp_link)
    else:
        values = dict(nic_out=exp_nic, n_out=n_e, nic_in=attn_nic, n_in=n_a, link_out=exp_link, link_in=attn_link)
    return TRANSFER_TIME(
        recorder, label, **values, bw_nic=cluster.nic_bandwidth, bw_link=cluster.intra_node_bandwidth, latency=latency
    )


def afpipe_transfer(cluster, layout: GroupLayout, row_bytes: float, *, top_k: int, toward_experts: bool,
                    recorder=None, label: str = "transfer", hop: float = 0.0) -> float:
    """Time of one micro-batch's transfer between the groups of one group pair: the slowest
    node. ``row_bytes``: bytes of one message row for every token of one attention device
    (tokens x bytes per row); a token sends as many rows as ``layout`` and ``top_k`` give
    (ROWS_PER_RANK). ``hop``: bytes per attention device that cross to another group pair
    at the same time over the attention NICs (p > 1; :func:`_node_transfer`)."""
    worst, worst_node = -1.0, None
    E = layout.num_experts
    for node in layout.distinct_nodes:
        t = _node_transfer(cluster, node, row_bytes, node.rows(E, top_k), toward_experts=toward_experts, hop=hop)
        if t > worst:
            worst, worst_node = t, node
    if recorder is not None:  # record the formula on the node that sets the time
        _node_transfer(cluster, worst_node, row_bytes, worst_node.rows(E, top_k), toward_experts=toward_experts,
                       recorder=recorder, label=label, hop=hop)
    return worst


def _node_ring_transfer(cluster, node: NodeShare, row_bytes: float, rows: tuple[float, float, float], hop: float,
                        *, toward_experts: bool, recorder=None, label=None) -> float:
    """One node's time for a transfer between expert group g and attention group g + 1 (the
    next group pair's nodes, laid out alike): every attention device of the pair exchanges
    its message rows (``row_bytes``, ``rows`` as :func:`_node_transfer`) with the experts
    (all of it crosses nodes), and ``hop`` bytes with the same slot of the other attention
    group over the same NICs."""
    a = node.attention
    away, here, _ = rows
    attn_nic = a * (row_bytes * (away + here) + hop)
    exp_nic = node.domain_attention * row_bytes * here
    n_a = node.nics_attention or 1.0
    n_e = node.nics_experts or 1.0
    if toward_experts:  # combine gradient: attention g+1 -> experts g
        values = dict(nic_out=attn_nic, n_out=n_a, nic_in=exp_nic, n_in=n_e)
    else:  # combine: experts g -> attention g+1
        values = dict(nic_out=exp_nic, n_out=n_e, nic_in=attn_nic, n_in=n_a)
    return TRANSFER_TIME(recorder, label, **values, link_out=0.0, link_in=0.0, bw_nic=cluster.nic_bandwidth,
                         bw_link=cluster.intra_node_bandwidth, latency=cluster.inter_node_latency)


def ring_transfer(cluster, layout: GroupLayout, row_bytes: float, hop: float, *, top_k: int,
                  toward_experts: bool, recorder=None, label: str = "transfer") -> float:
    """Time of one micro-batch's transfer between expert group g and attention group g + 1
    at p > 1 (combine forward, its gradient backward), with the attention hop beside it on
    the same NICs: the slowest node (:func:`_node_ring_transfer`; ``row_bytes`` as
    :func:`afpipe_transfer`). Group pairs sit on disjoint nodes laid out alike, so every
    byte crosses nodes."""
    worst, worst_node = -1.0, None
    E = layout.num_experts
    for node in layout.distinct_nodes:
        t = _node_ring_transfer(cluster, node, row_bytes, node.rows(E, top_k), hop, toward_experts=toward_experts)
        if t > worst:
            worst, worst_node = t, node
    if recorder is not None:
        _node_ring_transfer(cluster, worst_node, row_bytes, worst_node.rows(E, top_k), hop,
                            toward_experts=toward_experts, recorder=recorder, label=label)
    return worst


def group_span(ranks: list[int], devices_per_node: int) -> tuple[int, int]:
    """(most devices of the group on one node, nodes the group spans)."""
    per_node: dict[int, int] = {}
    for r in ranks:
        per_node[r // devices_per_node] = per_node.get(r // devices_per_node, 0) + 1
    return max(per_node.values()), len(per_node)

