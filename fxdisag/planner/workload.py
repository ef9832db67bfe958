"""The cost model's inputs: a ModelProfile evaluated at one sequence length, cut the way
AF-pipe cuts it.

Contract
--------
``Workload.from_profile(profile, seq_len)`` gives the attention-side regions before,
inside and after the MoE layers (:class:`RegionCost`: forward / backward FLOPs and
activation bytes per sequence, weight bytes), the attention-side parameters and saved
activations, and one homogeneous MoE layer (expert FLOPs, bytes and saved activations
per routed row; dispatch / combine bytes and their gradients per token).
:func:`optimizer_bytes_per_param` gives the optimizer-state bytes per parameter.

Units: FLOPs, bytes, parameters (counts); per sequence at ``seq_len``, per routed row
(one token x one of its top_k experts) or per token as each field says; ``hop_per_seq``: the bytes a pipeline hop carries
between attention groups at p > 1 (hop design: docs/CONTRACTS.md). No formula is
evaluated here (``formulas.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RegionCost", "Workload", "optimizer_bytes_per_param"]


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
    expert_input_per_row: float  # H x dtype: what a recomputing expert device keeps per row
    dispatch_per_token: float
    combine_per_token: float
    combine_grad_per_token: float
    dispatch_grad_per_token: float
    model_flops_per_seq: float  # forward + backward, the whole model
    # per sequence, mean over MoE layers: what a pipeline hop (p > 1) sends from attention
    # group g to g+1 besides the experts' combine (residual stream, rotary tables, masks);
    # 0 when the profile did not measure it. Its gradient is the residual's: about H x dtype
    # per token.
    hop_per_seq: float = 0.0

    @property
    def num_moe_layers(self) -> int:
        return len(self.layers)

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
                (pre if r.kind == "embed" else post).append(cost)
            elif r.layer < first:
                pre.append(cost)
            elif r.layer > last:
                post.append(cost)
            else:
                # a dense layer between MoE layers belongs to the next MoE layer's stage
                j = next(i for i, layer in enumerate(moe_layers) if layer >= r.layer)
                layers[j].append(cost)
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
            dispatch_per_token=mean("dispatch_bytes_per_token"),
            combine_per_token=mean("combine_bytes_per_token"),
            combine_grad_per_token=mean("combine_grad_bytes_per_token"),
            dispatch_grad_per_token=mean("dispatch_grad_bytes_per_token"),
            model_flops_per_seq=total_flops,
            hop_per_seq=sum(c.at(seq_len) for c in profile.hop_bytes) / len(profile.hop_bytes)
            if profile.hop_bytes else 0.0,
        )

