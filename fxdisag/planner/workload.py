"""The cost model's inputs: a ModelProfile evaluated at one sequence length, cut the way
AF-pipe cuts it.

Contract
--------
``Workload.from_profile(profile, seq_len)`` gives the attention-side regions before,
inside and after the MoE layers (:class:`RegionCost`: forward / backward FLOPs and
activation bytes per sequence, weight bytes), the attention-side parameters and saved
activations, and one homogeneous MoE layer (expert FLOPs, bytes and saved activations
per routed row; dispatch / combine bytes and their gradients per message row).
:func:`optimizer_bytes_per_param` gives the optimizer-state bytes per parameter.

Units: FLOPs, bytes, parameters (counts); per sequence at ``seq_len``, per routed row
(one token x one of its top_k experts), per message row (one token to one expert rank:
the ``*_per_row`` transfer fields; how many rows a token sends is the layout's,
``placement.expected_rows_per_token``) or per token as each field says;
``hop_per_seq``: the bytes a pipeline hop carries
between attention groups at p > 1 (hop design: docs/CONTRACTS.md), and
``hop_index_per_row``: what it carries besides, per message row (the combine's row ->
token index; the cost model's HOP_BYTES adds the two). No formula is evaluated here
(``formulas.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GroupShare", "RegionCost", "Workload", "optimizer_bytes_per_param"]


def optimizer_bytes_per_param(optimizer: str, dtype_bytes: int) -> float:
    """Optimizer-state bytes per parameter: Adam keeps fp32 m and v, plus an fp32 master copy
    when training in a 16-bit dtype (mixed precision); SGD keeps only the master copy."""
    master = 4.0 if dtype_bytes < 4 else 0.0
    if optimizer in ("adam", "adamw"):
        return 8.0 + master
    if optimizer == "sgd":
        return master
    raise ValueError(f"optimizer={optimizer!r}: choose 'adam', 'adamw' or 'sgd'")


@dataclass(frozen=True)
class RegionCost:
    """One attention-side region, per sequence at the planned length."""

    fwd_flops: float
    bwd_flops: float
    io_bytes: float
    weight_bytes: float
    layered: bool = True  # inside a decoder layer (recomputed under activation checkpointing)


@dataclass(frozen=True)
class GroupShare:
    """What each group holds at pipeline depth ``depth`` (index g: attention group g and
    expert group g, or pipeline stage g of the Megatron baseline): attention-side
    parameters, activations kept per sequence (all; and with recomputation: its decoder
    layers' inputs plus what lies outside decoder layers), and MoE layers."""

    depth: int
    attention_params: tuple[float, ...]
    saved_per_seq: tuple[float, ...]
    recompute_keep_per_seq: tuple[float, ...]
    moe_layers: tuple[int, ...]
    # of saved_per_seq and recompute_keep_per_seq: the part of the last stage (final norm,
    # head, loss: the logits), on the group holding it. Its backward follows its forward at
    # once under 1F1B, so it is kept for fewer micro-batches than the rest.
    tail_saved_per_seq: tuple[float, ...] = ()
    tail_keep_per_seq: tuple[float, ...] = ()

    @property
    def laps(self) -> int:
        """The ring's passes: MoE layers of the group holding the most."""
        return max(self.moe_layers)


@dataclass
class Workload:
    """A ModelProfile evaluated at one sequence length, cut the way AF-pipe cuts it.

    ``pre``: regions before the first MoE layer's attention (embedding, dense layers);
    ``layers[j]``: attention-side regions of MoE layer j (and of dense layers between MoE
    layers); ``post``: final norm, head, loss. Experts: one homogeneous MoE layer
    description (all registry models have identical MoE layers; mean values otherwise).
    """

    seq_len: int
    dtype: str
    dtype_bytes: int
    pre: list[RegionCost]
    layers: list[list[RegionCost]]
    post: list[RegionCost]
    attention_params: int  # everything but the routed experts (lives on attention devices)
    attention_saved_bytes: float  # per sequence, all attention-side regions
    attention_saved_unlayered: float  # per sequence, regions outside decoder layers (embed, head, loss)
    attention_saved_layer_max: float  # per sequence, the largest decoder layer's attention-side activations
    num_decoder_layers: int
    layer_input_bytes: float  # per sequence: one decoder layer's input (S x H x dtype)
    num_experts: int
    top_k: int
    params_per_expert: float
    expert_weight_bytes: float
    expert_flops_per_row: float
    expert_io_per_row: float
    expert_saved_per_row: float
    expert_input_per_row: float  # H x dtype: one token's hidden row (a routed pair's expert input)
    # bytes per message row (one token to one expert rank), not per routed row
    dispatch_per_row: float
    combine_per_row: float
    combine_grad_per_row: float
    dispatch_grad_per_row: float
    model_flops_per_seq: float  # forward + backward, the whole model
    # per sequence, mean over MoE layers: what a pipeline hop (p > 1) sends from attention
    # group g to g+1 besides the experts' combine (residual stream, rotary tables, masks);
    # 0 when the profile did not measure it. Its gradient is the residual's: about H x dtype
    # per token.
    hop_per_seq: float = 0.0
    # per message row: the combine's row -> token index (``token`` of runtime/dispatch.py
    # ``pack``, int64), made on group g and read by the combine on group g+1, so it crosses
    # the hop beside hop_per_seq (which the profile measures on the captured graph, where
    # there is no dispatch). Rows per token are the layout's (HOP_BYTES).
    hop_index_per_row: float = 8.0
    # Per attention stage s = 0..J (stage 0 holds pre and MoE layer 0's attention side,
    # stage j MoE layer j's, stage J the post regions): parameters, and activations kept
    # per sequence. What a device of an attention group holds at p > 1 is the sum over its
    # own stages. Empty: a hand-made workload (every stage alike).
    stage_params: list[float] = field(default_factory=list)
    stage_saved: list[float] = field(default_factory=list)
    stage_unlayered: list[float] = field(default_factory=list)  # of stage_saved: outside decoder layers
    stage_layers: list[int] = field(default_factory=list)  # decoder layers whose attention side is in stage s
    # The shared experts an expert rank can run (MoELayerProfile.shared_params, mean over the
    # MoE layers; 0: none): per sequence, as a region on whichever group runs them.
    shared_params: float = 0.0
    shared_k: tuple[float, float] = (1.0, 1.0)  # (attention side, expert side) FLOP scales (a calibration's)
    shared_fraction: tuple[float, float] = (0.0, 0.0)  # (fwd, bwd) their share of a MoE layer's attention-side FLOPs
    _shares: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def group_share(self, p: int, assignment: str = "round_robin", loss_group: int | None = None) -> "GroupShare":
        """What each group holds at pipeline depth ``p``, layers dealt as
        :meth:`fxdisag.schedule.Stages.dealt` deals them (cached per arguments)."""
        key = (p, assignment, loss_group)
        if key not in self._shares:
            self._shares[key] = self._group_share(p, assignment, loss_group)
        return self._shares[key]

    def _group_share(self, p: int, assignment: str, loss_group: int | None) -> "GroupShare":
        from fxdisag.schedule import Stages

        J = self.num_moe_layers
        if p == 1:
            groups = [list(range(J + 1))]
            layers = [list(range(J))]
        else:
            stages = Stages.dealt([(g,) for g in range(p)], [(p + g,) for g in range(p)], J, assignment, loss_group)
            groups = [stages.stages_of(g) for g in range(p)]
            layers = [stages.layers_of(g) for g in range(p)]
        params = self.stage_params or [self.attention_params / (J + 1)] * (J + 1)
        saved = self.stage_saved or [self.attention_saved_bytes / (J + 1)] * (J + 1)
        unlayered = self.stage_unlayered or [self.attention_saved_unlayered / (J + 1)] * (J + 1)
        counts = self.stage_layers or [self.num_decoder_layers / (J + 1)] * (J + 1)
        return GroupShare(
            depth=p,
            attention_params=tuple(sum(params[s] for s in g) for g in groups),
            saved_per_seq=tuple(sum(saved[s] for s in g) for g in groups),
            recompute_keep_per_seq=tuple(sum(counts[s] for s in g) * self.layer_input_bytes
                                         + sum(unlayered[s] for s in g) for g in groups),
            moe_layers=tuple(len(x) for x in layers),
            tail_saved_per_seq=tuple(saved[J] if J in g else 0.0 for g in groups),
            tail_keep_per_seq=tuple(counts[J] * self.layer_input_bytes + unlayered[J] if J in g else 0.0
                                    for g in groups),
        )

    @property
    def num_moe_layers(self) -> int:
        return len(self.layers)

    @property
    def shared_region(self) -> RegionCost | None:
        """The movable shared experts of one MoE layer as a region, per sequence (None:
        none): 2 FLOPs per parameter and token forward (an MLP of linear layers), 2x
        backward, a hidden row in and out per token, and the weights."""
        if not self.shared_params:
            return None
        return RegionCost(fwd_flops=2.0 * self.shared_params * self.seq_len,
                          bwd_flops=4.0 * self.shared_params * self.seq_len,
                          io_bytes=2.0 * self.seq_len * self.expert_input_per_row,
                          weight_bytes=self.shared_params * self.dtype_bytes)

    @classmethod
    def from_profile(cls, profile, seq_len: int) -> "Workload":
        if not profile.moe:
            raise ValueError(f"profile of {profile.model} has no MoE layers: nothing to disaggregate")
        moe_layers = [m.layer for m in profile.moe]
        first, last = moe_layers[0], moe_layers[-1]
        pre: list[RegionCost] = []
        post: list[RegionCost] = []
        layers: list[list[RegionCost]] = [[] for _ in moe_layers]
        params = 0
        saved = 0.0
        unlayered = 0.0
        per_layer: dict[int, float] = {}
        stage_params = [0.0] * (len(moe_layers) + 1)
        stage_saved = [0.0] * (len(moe_layers) + 1)
        stage_unlayered = [0.0] * (len(moe_layers) + 1)
        stage_decoder: list[set] = [set() for _ in range(len(moe_layers) + 1)]
        total_flops = 0.0
        for r in profile.regions:
            f, b = r.fwd_flops.at(seq_len), r.bwd_flops.at(seq_len)
            total_flops += f + b
            if r.kind == "experts":
                continue
            cost = RegionCost(f, b, r.io_bytes.at(seq_len), float(r.weight_bytes), r.layer is not None)
            params += r.params
            kept = r.saved_bytes.at(seq_len)
            saved += kept
            if r.layer is None:
                unlayered += kept
            else:
                per_layer[r.layer] = per_layer.get(r.layer, 0.0) + kept
            if r.layer is None:
                stage = 0 if r.kind == "embed" else len(moe_layers)
                (pre if r.kind == "embed" else post).append(cost)
            elif r.layer < first:
                stage = 0
                pre.append(cost)
            elif r.layer > last:
                stage = len(moe_layers)
                post.append(cost)
            else:
                # a dense layer between MoE layers belongs to the next MoE layer's stage
                stage = next(i for i, layer in enumerate(moe_layers) if layer >= r.layer)
                layers[stage].append(cost)
            stage_params[stage] += r.params
            stage_saved[stage] += kept
            if r.layer is None:
                stage_unlayered[stage] += kept
            else:
                stage_decoder[stage].add(r.layer)
        n = len(profile.moe)

        def mean(attr: str) -> float:
            return sum(getattr(m, attr) for m in profile.moe) / n

        return cls(
            seq_len=seq_len,
            dtype=profile.dtype,
            dtype_bytes=profile.dtype_bytes,
            pre=pre,
            layers=layers,
            post=post,
            attention_params=params,
            attention_saved_bytes=saved,
            attention_saved_unlayered=unlayered,
            attention_saved_layer_max=max(per_layer.values(), default=0.0),
            num_decoder_layers=profile.num_layers,
            layer_input_bytes=seq_len * profile.hidden_size * profile.dtype_bytes,
            num_experts=profile.moe[0].num_experts,
            top_k=profile.moe[0].top_k,
            params_per_expert=mean("params_per_expert"),
            expert_weight_bytes=mean("expert_weight_bytes"),
            expert_flops_per_row=mean("fwd_flops_per_row"),
            expert_io_per_row=mean("io_bytes_per_row"),
            expert_saved_per_row=mean("saved_bytes_per_row"),
            expert_input_per_row=float(profile.hidden_size * profile.dtype_bytes),
            dispatch_per_row=mean("dispatch_bytes_per_row"),
            combine_per_row=mean("combine_bytes_per_row"),
            combine_grad_per_row=mean("combine_grad_bytes_per_row"),
            dispatch_grad_per_row=mean("dispatch_grad_bytes_per_row"),
            model_flops_per_seq=total_flops,
            hop_per_seq=sum(c.at(seq_len) for c in profile.hop_bytes) / len(profile.hop_bytes)
            if profile.hop_bytes else 0.0,
            stage_params=stage_params,
            stage_saved=stage_saved,
            stage_unlayered=stage_unlayered,
            stage_layers=[len(x) for x in stage_decoder],
            shared_params=mean("shared_params"),
            shared_k=(mean("shared_k_attention"), mean("shared_k_experts")),
            shared_fraction=_shared_fraction(profile, seq_len),
        )



def _shared_fraction(profile, seq_len: int) -> tuple[float, float]:
    """(forward, backward) FLOPs of the movable shared experts' regions over those of their
    MoE layers' attention side, summed over the layers (a calibration scales both alike)."""
    moved = {m.layer for m in profile.moe if m.shared_params}
    out = []
    for attr in ("fwd_flops", "bwd_flops"):
        total = sum(getattr(r, attr).at(seq_len) for r in profile.regions
                    if r.layer in moved and r.kind != "experts")
        shared = sum(getattr(r, attr).at(seq_len) for r in profile.regions
                     if r.layer in moved and r.kind == "shared_experts")
        out.append(shared / total if total else 0.0)
    return out[0], out[1]
