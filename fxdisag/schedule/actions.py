"""Schedules as data: action kinds (one table), actions, per-rank action lists.

Contract
--------
:data:`KINDS` is the only place that says what an action kind is: the role that runs
it (``"A"`` attention, ``"E"`` experts, ``"*"`` any), its direction (compute, send,
recv, collective), the message channel of a comm kind (a ``SEND_x`` matches a
``RECV_x``) and whether it belongs to the backward pass. Everything else -- the
validator, the grid, the simulator, the runtime's handler tables, the timeline --
reads these properties instead of listing kinds.

A :class:`Schedule` maps every rank to the ordered list of :class:`Action` s it runs in
one training step, and says where each rank's *forward phase* ends: the actions the
``forward`` call runs; the rest run in ``loss.backward()`` (:meth:`Schedule.phase`).

Model cut
---------
With J MoE layers there are J+1 attention stages (stage s runs everything between the
experts call of MoE layer s-1 and that of layer s; stage 0 starts at the inputs, stage
J ends with the loss) and J expert stages (layer j = the routed experts of MoE layer
j). A micro-batch i goes F(0,i) -> EF(0,i) -> F(1,i) -> ... -> F(J,i), then B(J,i) ->
EB(J-1,i) -> B(J-1,i) -> ... -> B(0,i).

Actions and notation (``str(action)``; this is what the grid shows)
-----------------------------------------------------------------
=============  ======================  ==========================================
kind           str                     meaning (``stage`` = s for F/B, j otherwise)
=============  ======================  ==========================================
F / B          ``F1.0`` / ``B1.0``     attention forward / backward of stage 1, mb 0
EF / EB        ``EF0.1`` / ``EB0.1``   expert forward / backward of MoE layer 0, mb 1
SEND_D/RECV_D  ``>D0.1`` / ``<D0.1``   dispatch (attention -> experts) of layer 0
SEND_C/RECV_C  ``>C0.1`` / ``<C0.1``   combine (experts -> attention) of layer 0
SEND_GC/RECV_GC ``>GC0.1``/``<GC0.1``  grad of the combine output (attention -> experts)
SEND_GD/RECV_GD ``>GD0.1``/``<GD0.1``  grad of dispatched rows + routing weights
                                       (experts -> attention)
REDUCE         ``R``                   end-of-step gradient all-reduce
=============  ======================  ==========================================

``peers`` holds the ranks on the other side of a comm action (a SEND's destinations, a
RECV's sources), in rank order, and is empty for compute. A comm kind of role A talks
to expert ranks, one of role E to attention ranks; a rank that has both roles (expert
parallelism) may be its own peer. For REDUCE, ``stage = microbatch = -1`` and ``peers``
is every rank of the groups the rank belongs to, itself included.

Runtime semantics (the runtime follows these; the grid and the simulator model them)
-------------------------------------------------------------------------------------
* A RECV *posts* a non-blocking receive (one per peer) and returns at once.
* A compute action waits for the data it consumes (:func:`consumes`), then runs.
* A SEND posts a non-blocking send (one per peer) of what a compute produced
  (:func:`produced_by`). Every peer gets a message, possibly with zero rows, so that
  matching is static.
* With NCCL, messages between an ordered pair (src, dst) match in FIFO order, so the
  sender's sends to dst and dst's receives from src come in the same order.
* REDUCE is a collective over ``peers``; every member reaches it once, last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "Action",
    "ActionKind",
    "KINDS",
    "Key",
    "KindInfo",
    "Schedule",
    "Stages",
    "CHUNKED_BACKWARD",
    "CHUNKED_FORWARD",
    "MAX_CHUNKS",
    "chunk_key",
    "consumes",
    "even_blocks",
    "num_chunks",
    "produced_by",
    "required_before",
]


@dataclass(frozen=True)
class KindInfo:
    role: str  # "A" (attention ranks), "E" (expert ranks) or "*" (every rank)
    direction: str  # "compute" | "send" | "recv" | "collective"
    channel: str | None  # "D" | "C" | "GC" | "GD" | "H" | "GH" for comm kinds
    backward: bool  # part of the backward pass
    peer_role: str | None = None  # the role of a comm kind's peers


class ActionKind(str, Enum):
    F = "F"
    B = "B"
    EF = "EF"
    EB = "EB"
    SEND_D = "SEND_D"
    RECV_D = "RECV_D"
    SEND_C = "SEND_C"
    RECV_C = "RECV_C"
    SEND_GC = "SEND_GC"
    RECV_GC = "RECV_GC"
    SEND_GD = "SEND_GD"
    RECV_GD = "RECV_GD"
    SEND_H = "SEND_H"
    RECV_H = "RECV_H"
    SEND_GH = "SEND_GH"
    RECV_GH = "RECV_GH"
    REDUCE = "REDUCE"

    @property
    def info(self) -> KindInfo:
        return KINDS[self]

    @property
    def role(self) -> str:
        return KINDS[self].role

    @property
    def is_compute(self) -> bool:
        return KINDS[self].direction == "compute"

    @property
    def is_send(self) -> bool:
        return KINDS[self].direction == "send"

    @property
    def is_recv(self) -> bool:
        return KINDS[self].direction == "recv"

    @property
    def is_comm(self) -> bool:
        return self.is_send or self.is_recv

    @property
    def is_backward(self) -> bool:
        return KINDS[self].backward

    @property
    def channel(self) -> str:
        """``"D" | "C" | "GC" | "GD"`` for comm kinds."""
        channel = KINDS[self].channel
        if channel is None:
            raise ValueError(f"{self.name} is not a comm action kind")
        return channel

    @staticmethod
    def comm(direction: str, channel: str) -> "ActionKind":
        """The SEND (``direction="send"``) or RECV kind of ``channel``."""
        return _COMM[(direction, channel)]


_K = ActionKind
KINDS: dict[ActionKind, KindInfo] = {
    _K.F: KindInfo("A", "compute", None, False),
    _K.B: KindInfo("A", "compute", None, True),
    _K.EF: KindInfo("E", "compute", None, False),
    _K.EB: KindInfo("E", "compute", None, True),
    _K.SEND_D: KindInfo("A", "send", "D", False, "E"),
    _K.RECV_D: KindInfo("E", "recv", "D", False, "A"),
    _K.SEND_C: KindInfo("E", "send", "C", False, "A"),
    _K.RECV_C: KindInfo("A", "recv", "C", False, "E"),
    _K.SEND_GC: KindInfo("A", "send", "GC", True, "E"),
    _K.RECV_GC: KindInfo("E", "recv", "GC", True, "A"),
    _K.SEND_GD: KindInfo("E", "send", "GD", True, "A"),
    _K.RECV_GD: KindInfo("A", "recv", "GD", True, "E"),
    # The hop of the attention side's live values between pipeline stages (p > 1).
    _K.SEND_H: KindInfo("A", "send", "H", False, "A"),
    _K.RECV_H: KindInfo("A", "recv", "H", False, "A"),
    _K.SEND_GH: KindInfo("A", "send", "GH", True, "A"),
    _K.RECV_GH: KindInfo("A", "recv", "GH", True, "A"),
    _K.REDUCE: KindInfo("*", "collective", None, True),
}
_COMM = {(i.direction, i.channel): k for k, i in KINDS.items() if i.channel is not None}
CHANNELS: tuple[str, ...] = ("D", "C", "GC", "GD", "H", "GH")
MAX_CHUNKS = 16  # chunks per layer and direction (message tags encode the chunk)

# (kind, stage, microbatch) or, for chunk c >= 1 of a chunked layer, (kind, stage,
# microbatch, c): identifies an action on one rank. Chunk 0 is the unchunked action, so a
# schedule without chunks has exactly the keys it always had.
Key = tuple

# The kinds a layer's chunks split (``Schedule.chunks``): dispatch -> expert compute ->
# combine in the forward pass, and their gradients' way back in the backward pass.
CHUNKED_FORWARD = frozenset({ActionKind.SEND_D, ActionKind.RECV_D, ActionKind.EF, ActionKind.SEND_C,
                             ActionKind.RECV_C})
CHUNKED_BACKWARD = frozenset({ActionKind.SEND_GC, ActionKind.RECV_GC, ActionKind.EB, ActionKind.SEND_GD,
                              ActionKind.RECV_GD})


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    stage: int
    microbatch: int
    peers: tuple[int, ...] = ()
    chunk: int = 0  # which of its layer's chunks (``Schedule.chunks``); 0 when unchunked

    @property
    def key(self) -> Key:
        if self.chunk:
            return (self.kind, self.stage, self.microbatch, self.chunk)
        return (self.kind, self.stage, self.microbatch)

    def __str__(self) -> str:
        k = self.kind
        if k is ActionKind.REDUCE:
            return "R"
        c = f"c{self.chunk}" if self.chunk else ""
        if k.is_compute:
            return f"{k.value}{self.stage}.{self.microbatch}{c}"
        return f"{'>' if k.is_send else '<'}{k.channel}{self.stage}.{self.microbatch}{c}"


def key_str(key: Key) -> str:
    return str(Action(key[0], key[1], key[2], chunk=key[3] if len(key) > 3 else 0))


def chunk_key(kind: ActionKind, stage: int, microbatch: int, chunk: int = 0) -> Key:
    """The key of chunk ``chunk`` of (kind, stage, microbatch) (:attr:`Action.key`)."""
    return (kind, stage, microbatch, chunk) if chunk else (kind, stage, microbatch)


def num_chunks(chunks, kind: ActionKind, layer: int) -> int:
    """How many chunks ``kind`` has at MoE layer ``layer`` under ``chunks`` (``Schedule.chunks``:
    layer -> (forward chunks, backward chunks); None or a missing layer: 1)."""
    if not chunks or layer not in chunks:
        return 1
    if kind in CHUNKED_FORWARD:
        return chunks[layer][0]
    if kind in CHUNKED_BACKWARD:
        return chunks[layer][1]
    return 1


def even_blocks(total: int, parts: int) -> list[range]:
    """``total`` items in ``parts`` consecutive blocks whose sizes differ by at most one (larger first)."""
    base, extra = divmod(total, parts)
    blocks, start = [], 0
    for k in range(parts):
        size = base + (1 if k < extra else 0)
        blocks.append(range(start, start + size))
        start += size
    return blocks


@dataclass(frozen=True)
class Stages:
    """Which group runs which stage: p attention groups, p expert groups, and the maps.

    ``stage_group[s]`` (s = 0..J) is the attention group of attention stage s (stage s <
    J holds MoE layer s's attention; stage J the final norm, head and loss);
    ``layer_group[j]`` (j = 0..J-1) the expert group of MoE layer j. Ranks inside a group
    are interchangeable: attention ranks are data-parallel replicas (slot t of every
    attention group handles the same share of the batch), expert ranks shard the experts.
    A cut ``s`` with ``stage_group[s] != stage_group[s+1]`` is a *hop*: the attention
    side's live values travel from group to group (channels H forward, GH backward).
    """

    attention_groups: tuple[tuple[int, ...], ...]
    expert_groups: tuple[tuple[int, ...], ...]
    stage_group: tuple[int, ...]
    layer_group: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "attention_groups", tuple(tuple(sorted(g)) for g in self.attention_groups))
        object.__setattr__(self, "expert_groups", tuple(tuple(sorted(g)) for g in self.expert_groups))
        object.__setattr__(self, "stage_group", tuple(self.stage_group))
        object.__setattr__(self, "layer_group", tuple(self.layer_group))
        sizes = {len(g) for g in self.attention_groups}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"attention groups {self.attention_groups} must be non-empty and of one size "
                             "(slot t of every group handles the same share of the batch)")
        if len(self.stage_group) != len(self.layer_group) + 1:
            raise ValueError(f"stage_group has {len(self.stage_group)} entries, layer_group "
                             f"{len(self.layer_group)}: need J+1 and J")
        if any(not 0 <= g < len(self.attention_groups) for g in self.stage_group):
            raise ValueError(f"stage_group {self.stage_group} names a group outside 0..{len(self.attention_groups) - 1}")
        if any(not 0 <= g < len(self.expert_groups) for g in self.layer_group):
            raise ValueError(f"layer_group {self.layer_group} names a group outside 0..{len(self.expert_groups) - 1}")

    @classmethod
    def single(cls, attention_ranks, expert_ranks, num_moe_layers: int) -> "Stages":
        """p = 1: one attention group holding every stage, one expert group every layer."""
        return cls((tuple(attention_ranks),), (tuple(expert_ranks),), (0,) * (num_moe_layers + 1),
                   (0,) * num_moe_layers)

    @classmethod
    def dealt(cls, attention_groups, expert_groups, num_moe_layers: int, assignment: str = "round_robin",
              loss_group: int | None = None) -> "Stages":
        """Layers dealt over p groups: ``"round_robin"`` (layer l -> group l mod p) or
        ``"contiguous"`` (blocks of consecutive layers). Attention stage s < J goes with MoE
        layer s; stage J (head and loss) to ``loss_group`` (default: where the next layer would go)."""
        p, J = len(attention_groups), num_moe_layers
        if len(expert_groups) != p:
            raise ValueError(f"{len(attention_groups)} attention groups but {len(expert_groups)} expert groups: "
                             "the pipeline depth is one value for both kinds")
        if assignment == "round_robin":
            layer = [j % p for j in range(J)]
            last = J % p
        elif assignment == "contiguous":
            if J < p:
                raise ValueError(f"contiguous assignment of {J} MoE layers over {p} groups leaves a group empty")
            layer = [g for g, block in enumerate(even_blocks(J, p)) for _ in block]
            last = p - 1
        else:
            raise ValueError(f"layer assignment {assignment!r}: use 'round_robin' or 'contiguous'")
        if loss_group is not None:
            last = loss_group
        return cls(tuple(attention_groups), tuple(expert_groups), tuple(layer) + (last,), tuple(layer))

    @property
    def depth(self) -> int:
        return len(self.attention_groups)

    @property
    def hops(self) -> frozenset[int]:
        """Cuts s where stages s and s+1 run on different attention groups."""
        sg = self.stage_group
        return frozenset(s for s in range(len(sg) - 1) if sg[s] != sg[s + 1])

    def attention_slot(self, rank: int) -> tuple[int, int]:
        """(group, slot) of an attention rank."""
        for g, ranks in enumerate(self.attention_groups):
            if rank in ranks:
                return g, ranks.index(rank)
        raise KeyError(f"rank {rank} is in no attention group")

    def expert_group_of(self, rank: int) -> int:
        for g, ranks in enumerate(self.expert_groups):
            if rank in ranks:
                return g
        raise KeyError(f"rank {rank} is in no expert group")

    def stages_of(self, group: int) -> list[int]:
        return [s for s, g in enumerate(self.stage_group) if g == group]

    def layers_of(self, group: int) -> list[int]:
        return [j for j, g in enumerate(self.layer_group) if g == group]


@dataclass
class Schedule:
    """Every rank's action list for one step, and where its forward phase ends.

    ``forward_len[rank]`` is the number of leading actions of ``actions[rank]`` that the
    forward call runs; by default (None) the actions before the rank's first
    backward-kind action (GPipe). A schedule whose forward phase holds backward actions
    (1F1B-like) runs them with the loss gradient taken as 1 and rescales the step's
    gradients once the real one is known; its backward phase may then hold no other
    backward computation than REDUCE (:func:`fxdisag.schedule.validate.validate`).

    ``stages`` says which group runs which stage (None: p = 1, :meth:`Stages.single`).

    ``chunks`` (layer j -> (forward r, backward r); None: every layer unchunked): MoE layer
    j's dispatch -> expert compute -> combine runs as r chunks in the forward pass (each a
    block of every dispatch message's rows: ``<D``, ``EF``, ``>C``, ... per chunk), and its
    gradients' way back as r' chunks in the backward pass (:func:`chunk_schedule`).
    """

    attention_ranks: tuple[int, ...]
    expert_ranks: tuple[int, ...]
    num_moe_layers: int
    num_microbatches: int
    actions: dict[int, list[Action]] = field(default_factory=dict)
    forward_len: dict[int, int] | None = None
    name: str = "gpipe"
    stages: Stages | None = None
    chunks: dict[int, tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        self.attention_ranks = tuple(self.attention_ranks)
        self.expert_ranks = tuple(self.expert_ranks)
        if self.stages is None:
            self.stages = Stages.single(self.attention_ranks, self.expert_ranks, self.num_moe_layers)
        if self.chunks is not None:
            self.chunks = {int(j): (int(f), int(b)) for j, (f, b) in self.chunks.items()}
            bad = {j: c for j, c in self.chunks.items()
                   if not 0 <= j < self.num_moe_layers or min(c) < 1 or max(c) > MAX_CHUNKS}
            if bad:
                raise ValueError(f"chunks {bad}: need a MoE layer 0..{self.num_moe_layers - 1} -> "
                                 f"(forward, backward) chunk counts in 1..{MAX_CHUNKS}")
            if self.chunks and any(max(c) > 1 for c in self.chunks.values()) and self.hops:
                raise ValueError("chunked layers with pipeline depth > 1 are not supported yet: the combine "
                                 "that crosses a hop carries its row count, which chunks would split")

    @property
    def hops(self) -> frozenset[int]:
        return self.stages.hops  # type: ignore[union-attr]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.attention_ranks) | set(self.expert_ranks)))

    def roles(self, rank: int) -> frozenset[str]:
        """``{"A"}``, ``{"E"}`` or both (expert parallelism) for a rank of the schedule."""
        roles = frozenset(
            r for r, group in (("A", self.attention_ranks), ("E", self.expert_ranks)) if rank in group
        )
        if not roles:
            raise KeyError(f"rank {rank} is in neither attention_ranks nor expert_ranks")
        return roles

    def role(self, rank: int) -> str:
        """``"A"``, ``"E"``, or ``"AE"`` for a rank with both roles."""
        return "".join(sorted(self.roles(rank)))

    def required_keys(self, rank: int) -> set[Key]:
        """Every key ``rank`` must run exactly once (its stages' computes and messages)."""
        st, K, m = self.stages, ActionKind, self.num_microbatches
        J, hops = self.num_moe_layers, self.hops
        keys: set[Key] = {(K.REDUCE, -1, -1)}
        kinds: list[tuple[ActionKind, int]] = []
        roles = self.roles(rank)
        if "A" in roles:
            g, _ = st.attention_slot(rank)  # type: ignore[union-attr]
            for s in st.stages_of(g):  # type: ignore[union-attr]
                kinds += [(K.F, s), (K.B, s)]
                if s < J:
                    kinds += [(K.SEND_D, s), (K.RECV_GD, s)]
                if s > 0:
                    kinds += [(K.RECV_C, s - 1), (K.SEND_GC, s - 1)]
                if s in hops:
                    kinds += [(K.SEND_H, s), (K.RECV_GH, s)]
                if s - 1 in hops:
                    kinds += [(K.RECV_H, s - 1), (K.SEND_GH, s - 1)]
        if "E" in roles:
            g = st.expert_group_of(rank)  # type: ignore[union-attr]
            for j in st.layers_of(g):  # type: ignore[union-attr]
                kinds += [(k, j) for k in (K.RECV_D, K.EF, K.SEND_C, K.RECV_GC, K.EB, K.SEND_GD)]
        keys |= {chunk_key(k, s, i, c) for k, s in kinds for i in range(m)
                 for c in range(num_chunks(self.chunks, k, s))}
        return keys

    def peers(self, rank: int, kind: ActionKind, stage: int) -> tuple[int, ...]:
        """The ranks on the other side of comm ``kind`` at ``stage`` for ``rank`` (sorted)."""
        st, K = self.stages, ActionKind
        assert st is not None
        info = KINDS[kind]
        if info.channel in ("H", "GH"):
            _, slot = st.attention_slot(rank)
            toward_next = (kind is K.SEND_H) or (kind is K.RECV_GH)  # stage s's rank talks to stage s+1's
            group = st.stage_group[stage + 1] if toward_next else st.stage_group[stage]
            return (st.attention_groups[group][slot],)
        if info.role == "A":
            return st.expert_groups[st.layer_group[stage]]
        # expert side: dispatch and its gradient with stage j's group, combine with stage j+1's
        group = st.stage_group[stage] if info.channel in ("D", "GD") else st.stage_group[stage + 1]
        return st.attention_groups[group]

    def reduce_peers(self, rank: int) -> tuple[int, ...]:
        """The ranks ``rank``'s REDUCE syncs gradients with: the replicas of its own parameters,
        i.e. its attention group and/or its expert group (p = 1: every rank of its roles)."""
        st = self.stages
        assert st is not None
        own: set[int] = set()
        if rank in self.attention_ranks:
            own |= set(st.attention_groups[st.attention_slot(rank)[0]])
        if rank in self.expert_ranks:
            own |= set(st.expert_groups[st.expert_group_of(rank)])
        return tuple(sorted(own))

    def phase(self, rank: int, phase: str) -> list[Action]:
        """The actions ``rank`` runs in ``phase`` (``"forward"`` or ``"backward"``)."""
        acts = self.actions[rank]
        n = self.forward_length(rank)
        if phase == "forward":
            return acts[:n]
        if phase == "backward":
            return acts[n:]
        raise ValueError(f"phase must be 'forward' or 'backward', got {phase!r}")

    def forward_length(self, rank: int) -> int:
        acts = self.actions[rank]
        if self.forward_len is not None and rank in self.forward_len:
            return self.forward_len[rank]
        return next((k for k, a in enumerate(acts) if a.kind.is_backward), len(acts))

    def defers_loss_grad(self, rank: int) -> bool:
        """Whether ``rank`` runs backward computation before the loss gradient is known."""
        return any(a.kind.is_backward and a.kind.is_compute for a in self.phase(rank, "forward"))

    def __str__(self) -> str:
        from fxdisag.schedule.grid import format_grid

        return format_grid(self)


# ---------------------------------------------------------------- dependencies


def consumes(action: Action, num_moe_layers: int, hops: frozenset[int] = frozenset(),
             chunks=None) -> tuple[Key, ...]:
    """The keys of the RECVs whose data the compute ``action`` waits for (maybe none).

    F(s,i) <- RECV_C(s-1,i) for s > 0, and RECV_H(s-1,i) when s-1 is a hop;
    B(s,i) <- RECV_GD(s,i) for s < J, and RECV_GH(s,i) when s is a hop;
    EF(j,i) <- RECV_D(j,i); EB(j,i) <- RECV_GC(j,i). ``hops``: :attr:`Stages.hops`.
    With ``chunks`` (:attr:`Schedule.chunks`) an attention compute waits for every chunk
    of the message, an expert chunk for its own chunk.
    """
    K = ActionKind
    k, s, i = action.kind, action.stage, action.microbatch

    def every(kind: ActionKind, j: int) -> tuple[Key, ...]:
        return tuple(chunk_key(kind, j, i, c) for c in range(num_chunks(chunks, kind, j)))

    if k is K.F:
        if s == 0:
            return ()
        return every(K.RECV_C, s - 1) + (((K.RECV_H, s - 1, i),) if s - 1 in hops else ())
    if k is K.B:
        keys = every(K.RECV_GD, s) if s < num_moe_layers else ()
        return keys + (((K.RECV_GH, s, i),) if s in hops else ())
    if k is K.EF:
        return (chunk_key(K.RECV_D, s, i, action.chunk),)
    if k is K.EB:
        return (chunk_key(K.RECV_GC, s, i, action.chunk),)
    return ()


def produced_by(action: Action) -> Key | None:
    """The key of the compute whose output the SEND ``action`` carries, or None (a chunk's
    send carries its own chunk's compute, or the attention compute every chunk comes from)."""
    K = ActionKind
    k, j, i, c = action.kind, action.stage, action.microbatch, action.chunk
    return {
        K.SEND_D: (K.F, j, i),
        K.SEND_C: chunk_key(K.EF, j, i, c),
        K.SEND_GC: (K.B, j + 1, i),
        K.SEND_GD: chunk_key(K.EB, j, i, c),
        K.SEND_H: (K.F, j, i),
        K.SEND_GH: (K.B, j + 1, i),
    }.get(k)


def required_before(action: Action, num_moe_layers: int, hops: frozenset[int] = frozenset(),
                    local: set[Key] | None = None, chunks=None) -> list[Key]:
    """Keys of the actions that must come earlier on the same rank than ``action``.

    Data: a compute after the receives it consumes and after the compute on this rank
    whose activations or gradients it needs; a send after the compute it carries. Sizes:
    a receive whose row counts are known only from routing after the compute that routed
    them (``<C``, ``<GD`` after ``F``; ``<GC`` after ``EF``; ``<GH`` after ``>H``) when that runs on this
    rank (``local``, the rank's keys; None: every key is local). Across a hop the combine
    carries its row count instead (``<C`` then has no size dependency).

    (REDUCE has none here: the validator requires it to be the rank's last action.)
    """
    K = ActionKind
    J = num_moe_layers
    k, s, i = action.kind, action.stage, action.microbatch
    before: list[Key] = list(consumes(action, J, hops, chunks))

    def every_forward_chunk() -> list[Key]:  # an expert backward chunk's rows may span them all
        return [chunk_key(K.EF, s, i, c) for c in range(num_chunks(chunks, K.EF, s))]

    if k is K.F and s > 0 and s - 1 not in hops:
        before.append((K.F, s - 1, i))
    elif k is K.B:
        before.append((K.F, s, i))  # saved activations
        if s < J and s not in hops:
            before.append((K.B, s + 1, i))  # residual-stream gradient
    elif k is K.EB:
        before += every_forward_chunk()
    elif k.is_send:
        before.append(produced_by(action))  # type: ignore[arg-type]
    elif k in (K.RECV_C, K.RECV_GD):
        sizer = (K.F, s, i)  # sizes its buffers from the rows F(s, i) dispatched
        if local is None or sizer in local:
            before.append(sizer)
    elif k is K.RECV_GC:
        before += every_forward_chunk()  # sizes its buffers from the rows EF(s, i) received
    elif k is K.RECV_GH:
        before.append((K.SEND_H, s, i))  # sizes its buffers from the values >H(s, i) carried
    return before
