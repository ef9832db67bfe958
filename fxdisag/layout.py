"""Find the parts of an MoE model by structure, not by class name.

Contract: ``find_layout(model)`` returns a :class:`ModelLayout` naming, by FQN, every
decoder layer's attention module, every MoE block with its router, routed experts and
shared experts, and every dense MLP -- for any ``transformers`` model built the way the
5.x MoE families are, with no per-family table. It raises :class:`LayoutError` naming the
model class and what was looked for when the model has no routed experts.

The rules (each one structural)::

    experts module  = a module that owns >= 1 three-dimensional parameter, and whose
                      direct parameters all share the leading dimension E >= 2
                      (fused expert weights: gate_up_proj [E, 2I, H], down_proj [E, H, I],
                      GPT-OSS biases [E, 2I])
    MoE block       = the parent of an experts module
    router          = the MoE block's child owning a 2-D parameter of shape [E, H]
    shared experts  = the MoE block's other children with parameters
    decoder layers  = the ModuleList holding the MoE blocks
    attention       = a decoder-layer child whose forward takes an attention mask or
                      position embeddings
    dense MLP       = a decoder-layer child, with parameters, that is neither attention,
                      a MoE block nor a norm (a module owning only 1-D parameters)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from torch import nn

__all__ = ["LayoutError", "MoELayer", "ModelLayout", "find_layout", "is_experts_module"]

_ATTENTION_ARGS = ("attention_mask", "position_embeddings", "position_ids", "past_key_values", "past_key_value")


class LayoutError(ValueError):
    """The model does not have the structure fxdisag needs."""


@dataclass
class MoELayer:
    layer: int
    block: str
    experts: str
    router: str | None
    shared: list[str]
    num_experts: int
    top_k: int
    expert_params: dict[str, tuple[int, ...]]

    @property
    def params_per_expert(self) -> int:
        total = 0
        for shape in self.expert_params.values():
            n = 1
            for d in shape[1:]:
                n *= d
            total += n
        return total


@dataclass
class ModelLayout:
    model_class: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    layers: str  # FQN of the decoder-layer ModuleList
    attention: dict[int, str]
    moe: list[MoELayer]
    dense_mlp: dict[int, str] = field(default_factory=dict)


def is_experts_module(module: nn.Module) -> bool:
    params = list(module.parameters(recurse=False))
    if not any(p.dim() == 3 for p in params):
        return False
    leading = {p.shape[0] for p in params}
    return len(leading) == 1 and next(iter(leading)) >= 2


def _forward_params(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(inspect.unwrap(type(module).forward)).parameters)
    except (TypeError, ValueError):
        return set()


def _is_norm(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.dim() == 1 for p in params)


def _config_value(model: nn.Module, *names: str) -> int | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = getattr(config, "get_text_config", None)
    if callable(text):
        config = text()
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_layout(model: nn.Module) -> ModelLayout:
    experts = [(n, m) for n, m in model.named_modules() if is_experts_module(m)]
    if not experts:
        raise LayoutError(
            f"{type(model).__name__} has no routed experts: fxdisag looks for a module owning "
            "3-D expert weights sharing a leading dimension E (e.g. `experts.gate_up_proj` of shape "
            "[E, 2*I, H]), as every transformers 5.x MoE block has. Dense models have nothing to "
            "disaggregate; for an MoE model stored with per-expert nn.Linear lists, fuse its experts first."
        )

    parent_of: dict[str, str] = {}
    for name, _ in experts:
        if "." not in name:
            raise LayoutError(f"experts module {name!r} of {type(model).__name__} has no parent MoE block")
        parent_of[name] = name.rsplit(".", 1)[0]

    blocks = {parent_of[n] for n, _ in experts}
    layer_lists = {b.rsplit(".", 2)[0] for b in blocks if b.count(".") >= 2}
    # A MoE block lives at <layers>.<i>.<attr>; all blocks must share one ModuleList.
    if len(layer_lists) != 1:
        raise LayoutError(
            f"{type(model).__name__}: MoE blocks {sorted(blocks)} are not children of the layers of a "
            "single nn.ModuleList (expected <layers>.<i>.<moe block>.experts)"
        )
    layers_fqn = layer_lists.pop()
    layer_list = model.get_submodule(layers_fqn)
    if not isinstance(layer_list, nn.ModuleList):
        raise LayoutError(f"{type(model).__name__}.{layers_fqn} holds the MoE blocks but is not an nn.ModuleList")

    hidden = _config_value(model, "hidden_size", "d_model", "n_embd")
    vocab = _config_value(model, "vocab_size")
    top_k_default = _config_value(model, "num_experts_per_tok", "moe_topk", "top_k", "num_experts_per_token")

    attention: dict[int, str] = {}
    dense: dict[int, str] = {}
    moe: list[MoELayer] = []
    experts_by_block = {parent_of[n]: (n, m) for n, m in experts}
    for i, layer in enumerate(layer_list):
        prefix = f"{layers_fqn}.{i}"
        for child_name, child in layer.named_children():
            fqn = f"{prefix}.{child_name}"
            if fqn in experts_by_block:
                continue
            if _forward_params(child) & set(_ATTENTION_ARGS):
                attention[i] = fqn
        for child_name, child in layer.named_children():
            fqn = f"{prefix}.{child_name}"
            if fqn in experts_by_block or attention.get(i) == fqn or _is_norm(child):
                continue
            if any(True for _ in child.parameters()):
                dense[i] = fqn
        block_fqn = next((b for b in experts_by_block if b.startswith(prefix + ".")), None)
        if block_fqn is None:
            continue
        exp_name, exp_mod = experts_by_block[block_fqn]
        block = model.get_submodule(block_fqn)
        num_experts = next(iter(exp_mod.parameters(recurse=False))).shape[0]
        router = None
        shared = []
        for child_name, child in block.named_children():
            fqn = f"{block_fqn}.{child_name}"
            if fqn == exp_name:
                continue
            own = list(child.parameters(recurse=False))
            if router is None and any(p.dim() == 2 and p.shape[0] == num_experts for p in own) and not list(
                child.children()
            ):
                router = fqn
            elif any(True for _ in child.parameters()):
                shared.append(fqn)
        top_k = getattr(model.get_submodule(router), "top_k", None) if router else None
        top_k = top_k or getattr(block, "top_k", None) or top_k_default
        if not isinstance(top_k, int):
            raise LayoutError(f"cannot tell the top-k of MoE block {block_fqn}: set config.num_experts_per_tok")
        moe.append(
            MoELayer(
                layer=i,
                block=block_fqn,
                experts=exp_name,
                router=router,
                shared=shared,
                num_experts=num_experts,
                top_k=top_k,
                expert_params={n: tuple(p.shape) for n, p in exp_mod.named_parameters(recurse=False)},
            )
        )
    missing = [i for i in range(len(layer_list)) if i not in attention]
    if missing:
        raise LayoutError(
            f"{type(model).__name__}: decoder layers {missing} of {layers_fqn} have no attention child "
            f"(a child whose forward takes one of {_ATTENTION_ARGS})"
        )
    if hidden is None:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        hidden = emb.weight.shape[1] if emb is not None else 0
    return ModelLayout(
        model_class=type(model).__name__,
        num_layers=len(layer_list),
        hidden_size=hidden,
        vocab_size=vocab or 0,
        layers=layers_fqn,
        attention=attention,
        moe=moe,
        dense_mlp=dense,
    )

