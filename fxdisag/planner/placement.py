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
between the groups: TRANSFER_TIME (``formulas.py``) on the slowest node::

    TRANSFER_TIME   t = max(nic_out / (n_out bw_nic), nic_in / (n_in bw_nic),
                            link_out / bw_link, link_in / bw_link) + latency
                    (one node; the slowest node sets the time; NVLink and NIC run in parallel)

:func:`group_span` gives (most devices of a group on one node, nodes it spans), the
g and k of ALLREDUCE_TIME.

Assumptions: uniform routing (every expert gets the same share of a token's top_k
rows); an attention rank sends all rows of one expert to one expert rank (the routing
table ``Plan.expert_owner``, which is what the runtime's dispatch supports), so
replicas balance load only across attention ranks; NIC sharing between devices of a
node (PXN-style) is free; a NIC shared by both groups of a node counts half for each.
Bytes are bytes, bandwidths bytes/s, latencies seconds (``ClusterSpec``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

from fxdisag.planner.formulas import TRANSFER_TIME

__all__ = [
    "STRATEGIES",
    "GroupLayout",
    "NodeShare",
    "afpipe_transfer",
    "domain_owners",
    "ring_transfer",
    "expert_owners",
    "group_span",
]


@dataclass(frozen=True)
class NodeShare:
    """What one node holds of an AF-pipe layout (identical nodes are folded into one).

    Shares are of the rows produced by the node's *routing domain* (the nodes whose
    attention ranks route to the same set of expert replicas)."""

    attention: int  # attention devices on the node
    domain_attention: int  # attention devices in the node's routing domain
    experts: int  # expert devices on the node
    row_share: float  # fraction of the domain's routed rows processed on this node
    max_device_share: float  # largest fraction of the domain's rows on one expert device of the node
    nics_attention: float  # NICs the attention devices use (a shared single NIC counts 1/2)
    nics_experts: float


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
    device_load: dict[int, float]  # expert rank -> rows per micro-batch, in attention devices' worth of tokens
    experts_held: dict[int, int]  # expert rank -> experts it holds
    min_replicas: int  # fewest replicas of any expert (all domains)

    @cached_property
    def max_load(self) -> float:
        """Routed rows on the busiest expert device per micro-batch, per (token x top_k) of one
        attention device: rows = tokens_per_attention_device x top_k x max_load."""
        return max(self.device_load.values())

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
        sync_bytes: tuple[float, float] | None = None,
        hop_bytes: tuple[float, float] | None = None,
    ) -> "GroupLayout":
        """``nic_split[n]``: NICs of node n given to its attention devices (the rest go to
        its experts). None chooses, per node, the split that minimises the node's slowest
        transfer of ``transfer_bytes`` = per-token (dispatch, combine, combine-grad,
        dispatch-grad) bytes (evaluated with TRANSFER_TIME); ties (no cross-node traffic)
        go to the split closest to the node's share of gradient all-reduce bytes,
        ``sync_bytes`` = (per attention device, per expert of all layers), or to the
        device ratio without it. ``hop_bytes`` = per-token (hop, hop gradient) bytes: the
        layout is one group pair of a pipeline of depth p > 1, whose combine and combine
        gradient cross to the next pair's nodes beside the hop (:func:`ring_transfer`), and
        the split is chosen for those transfers."""
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
        min_replicas = math.inf
        for D, attention in attn_by_domain.items():
            experts = exp_by_domain.get(D)
            if not experts:
                raise ValueError(f"routing domain {D} (nodes {D * d}..{D * d + d - 1}) has attention ranks but no "
                                 "expert ranks")
            loads, counts, replicas = _domain_loads(strategy, E, len(attention), len(experts))
            for r, x, c in zip(experts, loads, counts):
                load[r], held[r] = x, c
            min_replicas = min(min_replicas, replicas)
        min_replicas = int(min_replicas) * len(attn_by_domain)  # every domain holds each expert
        domain_attention = {D: len(v) for D, v in attn_by_domain.items()}
        share = {r: load[r] / max(domain_attention.get(r // per_domain, 0), 1) for r in expert_ranks}
        attn_set = set(attention_ranks)
        nodes: list[NodeShare] = []
        chosen: dict[tuple, float] = {}
        NIC = cluster.nics_per_node
        for n in range(N):
            ranks = range(n * dpn, (n + 1) * dpn)
            a = sum(1 for r in ranks if r in attn_set)
            a_dom = domain_attention.get(n // d, 0)
            exp = [r for r in ranks if r in share]
            rows = sum(share[r] for r in exp) if a_dom else 0.0
            top = max((share[r] for r in exp), default=0.0) if a_dom else 0.0
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
                    key = (a, a_dom, len(exp), rows, top, weight)
                    if key not in chosen:
                        chosen[key] = _best_nic_split(cluster, a, len(exp), a_dom, rows, top, transfer_bytes, weight,
                                                       hop_bytes)
                    na = chosen[key]
                ne = NIC - na if NIC > 1 else 0.5
            else:
                na, ne = (float(NIC), 0.0) if a else (0.0, float(NIC) if exp else 0.0)
            nodes.append(NodeShare(a, a_dom, len(exp), rows, top, na, ne))
        return cls(list(attention_ranks), list(expert_ranks), E, strategy, d, dpn, nodes, load, held, min_replicas)

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


def _best_nic_split(cluster, a: int, f: int, a_dom: int, rows: float, top: float, transfer_bytes,
                    weight: float, hop_bytes: tuple[float, float] | None = None) -> float:
    """NICs for the attention devices of a node: the split with the fastest slowest transfer;
    ties (e.g. no cross-node traffic) go to the split closest to ``weight`` x NICs."""
    if transfer_bytes is None:
        raise ValueError("GroupLayout.build needs nic_split or transfer_bytes to choose the NIC split")
    N = cluster.nics_per_node
    best, best_key = 1.0, (math.inf, math.inf)
    for na in range(1, N):
        node = NodeShare(a, a_dom, f, rows, top, float(na), float(N - na))
        if hop_bytes is None:
            t = max(
                _node_transfer(cluster, node, b, toward_experts=(i % 2 == 0), latency=0.0)
                for i, b in enumerate(transfer_bytes)
            )
        else:  # p > 1: dispatch inside the pair, combine across to the next (with the hop)
            d, c, gc, gd = transfer_bytes
            hf, hb = hop_bytes
            t = max(_node_transfer(cluster, node, d, toward_experts=True, latency=0.0, hop=hf),
                    _node_ring_transfer(cluster, node, c, hf, toward_experts=False),
                    _node_ring_transfer(cluster, node, gc, hb, toward_experts=True),
                    _node_transfer(cluster, node, gd, toward_experts=False, latency=0.0, hop=hb))
        key = (round(t, 15), abs(na - N * weight))
        if key < best_key:
            best, best_key = float(na), key
    return best


def _node_transfer(cluster, node: NodeShare, per_device: float, *, toward_experts: bool,
                   latency: float | None = None, recorder=None, label=None, hop: float = 0.0) -> float:
    """One node's time for a transfer where every attention device exchanges ``per_device``
    bytes with the expert replicas of its routing domain (spread by row share), while
    ``hop`` bytes per attention device leave (toward the experts) or enter the node over
    the same attention NICs, from or to another group pair (p > 1)."""
    a, rows, top = node.attention, node.row_share, node.max_device_share
    attn_nic = a * per_device * (1.0 - rows) + a * hop  # leaves/enters the node at its attention devices
    exp_nic = (node.domain_attention - a) * per_device * rows  # enters/leaves at its expert devices
    attn_link = per_device * rows if a else 0.0  # one attention device <-> local experts
    exp_link = a * per_device * top  # local attention devices <-> the busiest local expert
    cross = attn_nic > 1e-9 * per_device or exp_nic > 1e-9 * per_device or (a and hop > 0)
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


def afpipe_transfer(cluster, layout: GroupLayout, per_device: float, *, toward_experts: bool,
                    recorder=None, label: str = "transfer", hop: float = 0.0) -> float:
    """Time of one micro-batch's transfer between the groups of one group pair: the slowest
    node. ``hop``: bytes per attention device that cross to another group pair at the same
    time over the attention NICs (p > 1; :func:`_node_transfer`)."""
    worst, worst_node = -1.0, None
    for node in layout.distinct_nodes:
        t = _node_transfer(cluster, node, per_device, toward_experts=toward_experts, hop=hop)
        if t > worst:
            worst, worst_node = t, node
    if recorder is not None:  # record the formula on the node that sets the time
        _node_transfer(cluster, worst_node, per_device, toward_experts=toward_experts, recorder=recorder, label=label,
                       hop=hop)
    return worst


def _node_ring_transfer(cluster, node: NodeShare, per_device: float, hop: float, *, toward_experts: bool,
                        recorder=None, label=None) -> float:
    """One node's time for a transfer between expert group g and attention group g + 1 (the
    next group pair's nodes, laid out alike): every attention device of the pair exchanges
    ``per_device`` bytes with the experts (all of it crosses nodes), and ``hop`` bytes with
    the same slot of the other attention group over the same NICs."""
    a = node.attention
    attn_nic = a * (per_device + hop)
    exp_nic = node.domain_attention * per_device * node.row_share
    n_a = node.nics_attention or 1.0
    n_e = node.nics_experts or 1.0
    if toward_experts:  # combine gradient: attention g+1 -> experts g
        values = dict(nic_out=attn_nic, n_out=n_a, nic_in=exp_nic, n_in=n_e)
    else:  # combine: experts g -> attention g+1
        values = dict(nic_out=exp_nic, n_out=n_e, nic_in=attn_nic, n_in=n_a)
    return TRANSFER_TIME(recorder, label, **values, link_out=0.0, link_in=0.0, bw_nic=cluster.nic_bandwidth,
                         bw_link=cluster.intra_node_bandwidth, latency=cluster.inter_node_latency)


def ring_transfer(cluster, layout: GroupLayout, per_device: float, hop: float, *, toward_experts: bool,
                  recorder=None, label: str = "transfer") -> float:
    """Time of one micro-batch's transfer between expert group g and attention group g + 1
    at p > 1 (combine forward, its gradient backward), with the attention hop beside it on
    the same NICs: the slowest node (:func:`_node_ring_transfer`). Group pairs sit on
    disjoint nodes laid out alike, so every byte crosses nodes."""
    worst, worst_node = -1.0, None
    for node in layout.distinct_nodes:
        t = _node_ring_transfer(cluster, node, per_device, hop, toward_experts=toward_experts)
        if t > worst:
            worst, worst_node = t, node
    if recorder is not None:
        _node_ring_transfer(cluster, worst_node, per_device, hop, toward_experts=toward_experts, recorder=recorder,
                            label=label)
    return worst


def group_span(ranks: list[int], devices_per_node: int) -> tuple[int, int]:
    """(most devices of the group on one node, nodes the group spans)."""
    per_node: dict[int, int] = {}
    for r in ranks:
        per_node[r // devices_per_node] = per_node.get(r // devices_per_node, 0) + 1
    return max(per_node.values()), len(per_node)

