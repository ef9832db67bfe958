"""Model registry: tiny random-weight MoE models for tests, full-size configs on meta.

Contract
--------
* ``tiny_model(family, ...)`` returns a small random-weight HF causal-LM of one
  MoE family, in train mode, with eager attention and the requested experts
  implementation. The same (family, num_layers, seed, dtype) always gives the
  same weights. Its MoE blocks are the real transformers classes, so anything
  that works on a tiny model works on the full-size one of the same family.
* ``example_batch(model_or_config, B, T)`` returns ``{"input_ids", "labels"}``
  (``labels`` is a clone of ``input_ids``: HF shifts the labels internally),
  deterministic for a seed.
* ``REGISTRY`` maps a checkpoint name (``"mixtral-8x7b"``, ``"deepseek-v3"``,
  ...) to a ``ModelSpec`` whose config reproduces the shapes of the public
  checkpoint, from the numbers of its ``config.json`` written here (no download).
  ``meta_model(name)`` builds that model on the meta device: no real memory,
  about 0.1 s even for DeepSeek-V3 (671B parameters).
* ``resolve_model(name)`` accepts either kind of name. Unknown names raise
  ``ValueError`` listing the valid ones.

Pseudo-code::

    model = tiny_model("qwen3-moe")                  # 2 layers, 8 experts, top-2
    batch = example_batch(model, batch_size=2, seq_len=16)
    model(**batch).loss.backward()
    big = meta_model("deepseek-v3", num_layers=4)    # layers 0-2 dense, layer 3 MoE

Why eager attention: it is plain matmul + softmax, so it is deterministic on
CPU, identical in every process, and traces into FX/export graphs without the
fused SDPA/flash kernels (whose backward differs per backend).

Layer truncation (``num_layers``) keeps the *first* layers of the real model,
so the dense prefix stays: DeepSeek-V3 needs ``num_layers >= 4`` to contain a
MoE layer, deepseek-moe-16b ``>= 2``; tiny DeepSeek-V3 has layer 0 dense, so
the default ``num_layers=2`` gives one dense and one MoE layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    GptOssConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

__all__ = [
    "TINY_FAMILIES",
    "EXPERTS_IMPLEMENTATIONS",
    "ModelSpec",
    "REGISTRY",
    "tiny_model",
    "tiny_config",
    "example_batch",
    "full_size_config",
    "meta_model",
    "resolve_model",
]

TINY_FAMILIES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss")
EXPERTS_IMPLEMENTATIONS: tuple[str, ...] = ("grouped_mm", "batched_mm", "eager")

# --------------------------------------------------------------------------- tiny models

# Shared by every tiny family. Token ids 0/1/2 are inside the vocabulary so that
# transformers does not warn about special tokens out of range.
_TINY_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_attention_heads=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    output_router_logits=False,  # the aux loss collects router logits via hooks; off for capture
)

# Family-specific sizes. GQA families get 2 KV heads; MLA (DeepSeek-V3) and the
# MHA families (OLMoE) keep one KV head per query head, as the real models do.
_TINY_FAMILY_KWARGS: dict[str, tuple[type[PreTrainedConfig], dict]] = {
    "mixtral": (
        MixtralConfig,
        dict(
            num_key_value_heads=2,
            intermediate_size=32,  # Mixtral's experts use `intermediate_size`
            num_local_experts=4,
            num_experts_per_tok=2,
            router_jitter_noise=0.0,  # multiplicative noise on router inputs in training mode
        ),
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        dict(
            num_key_value_heads=2,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,  # sigmoid-gated shared expert
            num_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        dict(
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,  # as the released Qwen3 MoE checkpoints
        ),
    ),
    "deepseek_v3": (
        DeepseekV3Config,
        dict(
            num_key_value_heads=4,
            intermediate_size=128,  # dense MLP of layer 0
            moe_intermediate_size=32,
            n_routed_experts=8,
            num_experts_per_tok=2,
            # 2 groups of 4 experts, 1 group kept: the group top-k path is exercised
            # (each group needs >= 2 experts: the router sums each group's top-2).
            n_group=2,
            topk_group=1,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=16,
        ),
    ),
    "olmoe": (
        OlmoeConfig,
        dict(
            num_key_value_heads=4,
            intermediate_size=32,  # OLMoE's experts use `intermediate_size`
            num_experts=8,
            num_experts_per_tok=2,
        ),
    ),
    "gpt_oss": (
        GptOssConfig,
        dict(
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,  # shorter than test sequences, so the sliding mask matters
            # YaRN like the real model, with a factor consistent with the context
            # lengths (256 / 64 = 4) so that transformers does not warn.
            rope_parameters=dict(
                rope_type="yarn",
                rope_theta=150000.0,
                factor=4.0,
                original_max_position_embeddings=64,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
            ),
        ),
    ),
}


def _family_key(family: str) -> str:
    key = family.strip().lower().replace("-", "_")
    if key not in TINY_FAMILIES:
        raise ValueError(
            f"tiny_model: unknown family {family!r}; valid families: {', '.join(TINY_FAMILIES)} "
            "(hyphenated forms such as 'qwen3-moe' are accepted too)"
        )
    return key


def _check_experts_implementation(experts_implementation: str) -> None:
    if experts_implementation not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(
            f"experts_implementation={experts_implementation!r} is not one of {EXPERTS_IMPLEMENTATIONS}"
        )


def tiny_config(family: str, *, num_layers: int = 2, experts_implementation: str = "grouped_mm",
                top_k: int | None = None) -> PreTrainedConfig:
    """The config ``tiny_model`` builds from (see the module docstring for the sizes);
    ``top_k`` overrides the family's experts per token."""
    key = _family_key(family)
    _check_experts_implementation(experts_implementation)
    if num_layers < 1:
        raise ValueError(f"tiny_model: num_layers must be >= 1, got {num_layers}")
    config_class, family_kwargs = _TINY_FAMILY_KWARGS[key]
    extra: dict = {}
    if key == "gpt_oss":
        # GPT-OSS alternates sliding-window and full attention, starting with sliding.
        extra["layer_types"] = [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(num_layers)]
    config = config_class(num_hidden_layers=num_layers, **_TINY_COMMON, **family_kwargs, **extra)
    config._attn_implementation = "eager"
    config._experts_implementation = experts_implementation
    if top_k is not None:
        config.num_experts_per_tok = top_k
    return config


def tiny_model(
    family: str,
    *,
    num_layers: int = 2,
    seed: int = 0,
    experts_implementation: str = "grouped_mm",
    dtype: torch.dtype = torch.float32,
    top_k: int | None = None,
) -> PreTrainedModel:
    """A small random-weight causal LM of ``family`` (an HF ``model_type``), in train mode.

    vocab 128, hidden 64, 4 heads, 4-8 experts with top-2, expert width 32,
    256 positions (``top_k``: that many experts per token instead). Weights depend only on
    (family, num_layers, seed, dtype):
    the global RNG is seeded for construction and restored afterwards.
    ``deepseek_v3``: layer 0 is a dense MLP (``first_k_dense_replace=1``).
    """
    config = tiny_config(family, num_layers=num_layers, experts_implementation=experts_implementation, top_k=top_k)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if model.config._experts_implementation != experts_implementation:
        raise RuntimeError(
            f"tiny_model({family!r}): transformers chose experts implementation "
            f"{model.config._experts_implementation!r} instead of {experts_implementation!r}"
        )
    model.train()
    return model


def example_batch(
    model_or_config: PreTrainedModel | PreTrainedConfig,
    batch_size: int,
    seq_len: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Random token ids ``[batch_size, seq_len]`` in the model's vocabulary, and labels.

    Drawn on CPU from a private generator, then moved, so the batch is the same
    for a seed on every device and leaves the global RNG untouched.
    """
    config = model_or_config.config if isinstance(model_or_config, PreTrainedModel) else model_or_config
    if not isinstance(config, PreTrainedConfig):
        raise TypeError(
            f"example_batch: model_or_config must be a transformers PreTrainedModel or PreTrainedConfig, "
            f"got {type(model_or_config).__name__}"
        )
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"example_batch: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise ValueError(f"example_batch: seq_len={seq_len} exceeds max_position_embeddings={max_positions}")
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch_size, seq_len), generator=generator)
    input_ids = input_ids.to(device)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


# --------------------------------------------------------------------------- full-size registry
#
# Each factory writes out the shape-relevant values of the checkpoint's public
# config.json (model id in the comment). Training-only knobs (aux-loss
# coefficients, dropout) are left at the class defaults; output_router_logits
# is off as in tiny models. `num_hidden_layers` truncates to the first layers.


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


def _mixtral_8x7b(num_hidden_layers: int = 32) -> PreTrainedConfig:
    # mistralai/Mixtral-8x7B-v0.1
    return MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rope_parameters=_rope(1e6),
        rms_norm_eps=1e-5,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


def _mixtral_8x22b(num_hidden_layers: int = 56) -> PreTrainedConfig:
    # mistralai/Mixtral-8x22B-v0.1 (vocab 32768 since the v3 tokenizer update of the repo)
    return MixtralConfig(
        vocab_size=32768,
        hidden_size=6144,
        intermediate_size=16384,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=48,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=65536,
        rope_parameters=_rope(1e6),
        rms_norm_eps=1e-5,
        sliding_window=None,
        bos_token_id=1,
        eos_token_id=2,
        router_jitter_noise=0.0,
        output_router_logits=False,
    )


def _qwen3_moe(
    *, num_hidden_layers: int, hidden_size: int, intermediate_size: int, moe_intermediate_size: int, num_heads: int
) -> PreTrainedConfig:
    return Qwen3MoeConfig(
        vocab_size=151936,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,  # unused: no dense layers (mlp_only_layers=[])
        moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=40960,
        rope_parameters=_rope(1e6),
        rms_norm_eps=1e-6,
        attention_bias=False,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
        output_router_logits=False,
    )


def _qwen3_30b_a3b(num_hidden_layers: int = 48) -> PreTrainedConfig:
    # Qwen/Qwen3-30B-A3B
    return _qwen3_moe(
        num_hidden_layers=num_hidden_layers,
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_heads=32,
    )


def _qwen3_235b_a22b(num_hidden_layers: int = 94) -> PreTrainedConfig:
    # Qwen/Qwen3-235B-A22B
    return _qwen3_moe(
        num_hidden_layers=num_hidden_layers,
        hidden_size=4096,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_heads=64,
    )


def _deepseek_v3(num_hidden_layers: int = 61) -> PreTrainedConfig:
    # deepseek-ai/DeepSeek-V3. The HF class builds the 61 main layers only: the
    # checkpoint's extra multi-token-prediction layer (~14B of its 685B) is not built.
    return DeepseekV3Config(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=128,
        num_key_value_heads=128,
        n_shared_experts=1,
        n_routed_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        first_k_dense_replace=3,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_position_embeddings=163840,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=40.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=1.0,
        ),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        output_router_logits=False,
    )


def _gpt_oss(*, num_hidden_layers: int, num_local_experts: int) -> PreTrainedConfig:
    return GptOssConfig(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=num_local_experts,
        num_experts_per_tok=4,
        sliding_window=128,
        layer_types=[("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(num_hidden_layers)],
        max_position_embeddings=131072,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=150000.0,
            factor=32.0,
            original_max_position_embeddings=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
        ),
        rms_norm_eps=1e-5,
        attention_bias=True,
        swiglu_limit=7.0,
        tie_word_embeddings=False,
        pad_token_id=199999,
        eos_token_id=200002,
        output_router_logits=False,
    )


def _gpt_oss_120b(num_hidden_layers: int = 36) -> PreTrainedConfig:
    # openai/gpt-oss-120b (the checkpoint stores experts in MXFP4; the HF class
    # builds them dequantized, with the same element counts)
    return _gpt_oss(num_hidden_layers=num_hidden_layers, num_local_experts=128)


def _gpt_oss_20b(num_hidden_layers: int = 24) -> PreTrainedConfig:
    # openai/gpt-oss-20b
    return _gpt_oss(num_hidden_layers=num_hidden_layers, num_local_experts=32)


def _olmoe_1b_7b(num_hidden_layers: int = 16) -> PreTrainedConfig:
    # allenai/OLMoE-1B-7B-0924
    return OlmoeConfig(
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=1024,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        clip_qkv=None,
        max_position_embeddings=4096,
        rope_parameters=_rope(10000.0),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=1,
        eos_token_id=50279,
        output_router_logits=False,
    )


def _qwen2_57b_a14b(num_hidden_layers: int = 28) -> PreTrainedConfig:
    # Qwen/Qwen2-57B-A14B
    return Qwen2MoeConfig(
        vocab_size=151936,
        hidden_size=3584,
        intermediate_size=18944,  # unused: no dense layers
        moe_intermediate_size=2560,
        shared_expert_intermediate_size=20480,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_experts=64,
        num_experts_per_tok=8,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
        max_position_embeddings=131072,
        max_window_layers=28,
        use_sliding_window=False,
        rope_parameters=_rope(1e6),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151643,
        output_router_logits=False,
    )


_DEEPSEEK_MOE_16B_NOTE = (
    "transformers has no DeepSeekMoE (v1) class; this is Qwen2MoeConfig, which reproduces its "
    "shapes: MHA 16x128 without bias, layer 0 dense (mlp_only_layers=[0], width 10944), 64 routed "
    "experts of width 1408 with softmax top-6 and no renormalisation (the same router), and the 2 "
    "shared experts fused into one MLP of width 2816 (2x1408: same parameters, same sum). "
    "Differences: Qwen2-MoE adds a sigmoid shared_expert_gate Linear(2048->1) per MoE layer "
    "(+27x2048 = 55,296 parameters, and the shared output is scaled by it) and names the shared "
    "module `mlp.shared_expert` instead of `mlp.shared_experts`. DeepseekV2Config was rejected: "
    "its attention is always MLA (kv_a_proj_with_mqa/kv_b_proj), not MHA."
)


def _deepseek_moe_16b(num_hidden_layers: int = 28) -> PreTrainedConfig:
    # deepseek-ai/deepseek-moe-16b-base (remote-code DeepseekConfig; see _DEEPSEEK_MOE_16B_NOTE)
    return Qwen2MoeConfig(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,  # dense MLP of layer 0
        moe_intermediate_size=1408,
        shared_expert_intermediate_size=2 * 1408,  # n_shared_experts=2
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=6,
        norm_topk_prob=False,  # scoring_func=softmax, no renormalisation of the top-6
        decoder_sparse_step=1,
        mlp_only_layers=[0],  # first_k_dense_replace=1
        qkv_bias=False,  # attention_bias=False
        max_position_embeddings=4096,
        use_sliding_window=False,
        rope_parameters=_rope(10000.0),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=100000,
        eos_token_id=100001,
        output_router_logits=False,
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One full-size checkpoint: where its numbers come from and how to build its config."""

    name: str  # registry key, e.g. "mixtral-8x7b"
    hf_model_id: str  # the checkpoint whose config.json the numbers come from
    family: str  # transformers model_type of the config class used
    config_factory: Callable[..., PreTrainedConfig]  # (num_hidden_layers=<full depth>) -> config
    note: str = ""  # how the built model differs from the checkpoint, if it does

    def make_config(self, num_layers: int | None = None) -> PreTrainedConfig:
        """The config, truncated to the first ``num_layers`` layers when given."""
        if num_layers is not None and num_layers < 1:
            raise ValueError(f"{self.name}: num_layers must be >= 1 or None, got {num_layers}")
        config = self.config_factory() if num_layers is None else self.config_factory(num_hidden_layers=num_layers)
        config._attn_implementation = "eager"
        config._experts_implementation = "grouped_mm"
        return config


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "mixtral", _mixtral_8x7b),
        ModelSpec("mixtral-8x22b", "mistralai/Mixtral-8x22B-v0.1", "mixtral", _mixtral_8x22b),
        ModelSpec("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "qwen3_moe", _qwen3_30b_a3b),
        ModelSpec("qwen3-235b-a22b", "Qwen/Qwen3-235B-A22B", "qwen3_moe", _qwen3_235b_a22b),
        ModelSpec(
            "deepseek-v3",
            "deepseek-ai/DeepSeek-V3",
            "deepseek_v3",
            _deepseek_v3,
            note="the multi-token-prediction layer of the checkpoint is not built (as in transformers)",
        ),
        ModelSpec("gpt-oss-120b", "openai/gpt-oss-120b", "gpt_oss", _gpt_oss_120b),
        ModelSpec("gpt-oss-20b", "openai/gpt-oss-20b", "gpt_oss", _gpt_oss_20b),
        ModelSpec("olmoe-1b-7b", "allenai/OLMoE-1B-7B-0924", "olmoe", _olmoe_1b_7b),
        ModelSpec("qwen2-57b-a14b", "Qwen/Qwen2-57B-A14B", "qwen2_moe", _qwen2_57b_a14b),
        ModelSpec(
            "deepseek-moe-16b",
            "deepseek-ai/deepseek-moe-16b-base",
            "qwen2_moe",
            _deepseek_moe_16b,
            note=_DEEPSEEK_MOE_16B_NOTE,
        ),
    )
}


def _spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registry names: {', '.join(REGISTRY)}") from None


def full_size_config(name: str, *, num_layers: int | None = None) -> PreTrainedConfig:
    """The config of registry entry ``name`` (eager attention, grouped_mm experts)."""
    return _spec(name).make_config(num_layers)


def meta_model(name: str, *, num_layers: int | None = None, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Registry entry ``name`` built on the meta device (shapes only, no memory), in train mode.

    ``num_layers`` keeps the first layers only (dense prefixes included).
    """
    config = full_size_config(name, num_layers=num_layers)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    return model


def resolve_model(name: str, **kwargs) -> PreTrainedModel:
    """A registry name gives ``meta_model(name, **kwargs)``; a tiny family gives ``tiny_model``.

    Registry names win: ``"deepseek-v3"`` is the full-size entry, spell the tiny
    family ``"deepseek_v3"``.
    """
    if name in REGISTRY:
        return meta_model(name, **kwargs)
    if name.strip().lower().replace("-", "_") in TINY_FAMILIES:
        return tiny_model(name, **kwargs)
    raise ValueError(
        f"resolve_model: unknown name {name!r}; registry names: {', '.join(REGISTRY)}; "
        f"tiny families: {', '.join(TINY_FAMILIES)}"
    )
