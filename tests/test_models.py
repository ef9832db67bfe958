"""Tests of fxdisag.testing.models: tiny families run and are deterministic; full-size
registry entries build on meta and match the published parameter counts."""

from __future__ import annotations

import math
import time

import expecttest
import torch

from fxdisag.testing.models import (
    EXPERTS_IMPLEMENTATIONS,
    REGISTRY,
    TINY_FAMILIES,
    example_batch,
    full_size_config,
    meta_model,
    resolve_model,
    tiny_config,
    tiny_model,
)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _describe(model) -> str:
    """One line per decoder layer: attention type, MLP kind, MoE children and expert shapes."""
    cfg = model.config
    lines = [
        f"{type(model).__name__} attn={cfg._attn_implementation} experts={cfg._experts_implementation} "
        f"training={model.training} top_k={cfg.num_experts_per_tok}"
    ]
    layer_types = getattr(cfg, "layer_types", None)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        kind = layer_types[i] if layer_types else "full_attention"
        window = getattr(attn, "sliding_window", None)
        head = f"  {i}: {type(attn).__name__}({kind}{f', window={window}' if window else ''})"
        if hasattr(layer.mlp, "experts"):
            children = ",".join(name for name, _ in layer.mlp.named_children())
            shapes = " ".join(f"{n}{list(p.shape)}" for n, p in layer.mlp.experts.named_parameters())
            lines.append(f"{head} moe[{children}] {shapes}")
        else:
            lines.append(f"{head} dense {type(layer.mlp).__name__}(up={list(layer.mlp.up_proj.weight.shape)})")
    return "\n".join(lines)


class TinyModelTest(expecttest.TestCase):
    def test_every_family_trains_one_step_with_finite_loss_and_grads(self):
        for family in TINY_FAMILIES:
            with self.subTest(family=family):
                model = tiny_model(family)
                self.assertTrue(model.training)
                batch = example_batch(model, batch_size=2, seq_len=24)
                loss = model(**batch).loss
                self.assertTrue(torch.isfinite(loss))
                # Random init with std 0.02 gives near-uniform logits: loss ~ ln(vocab).
                self.assertAlmostEqual(loss.item(), math.log(128), delta=0.2)
                loss.backward()
                missing = [n for n, p in model.named_parameters() if p.grad is None]
                self.assertEqual(missing, [], f"{family}: parameters without gradient")
                for name, p in model.named_parameters():
                    self.assertTrue(torch.isfinite(p.grad).all(), f"{family}: non-finite grad in {name}")

    def test_structure_of_every_family(self):
        text = "\n".join(_describe(tiny_model(f)) for f in TINY_FAMILIES)
        self.assertExpectedInline(text, """\
MixtralForCausalLM attn=eager experts=grouped_mm training=True top_k=2
  0: MixtralAttention(full_attention) moe[gate,experts] gate_up_proj[4, 64, 64] down_proj[4, 64, 32]
  1: MixtralAttention(full_attention) moe[gate,experts] gate_up_proj[4, 64, 64] down_proj[4, 64, 32]
Qwen2MoeForCausalLM attn=eager experts=grouped_mm training=True top_k=2
  0: Qwen2MoeAttention(full_attention) moe[gate,experts,shared_expert,shared_expert_gate] gate_up_proj[4, 64, 64] down_proj[4, 64, 32]
  1: Qwen2MoeAttention(full_attention) moe[gate,experts,shared_expert,shared_expert_gate] gate_up_proj[4, 64, 64] down_proj[4, 64, 32]
Qwen3MoeForCausalLM attn=eager experts=grouped_mm training=True top_k=2
  0: Qwen3MoeAttention(full_attention) moe[experts,gate] gate_up_proj[8, 64, 64] down_proj[8, 64, 32]
  1: Qwen3MoeAttention(full_attention) moe[experts,gate] gate_up_proj[8, 64, 64] down_proj[8, 64, 32]
DeepseekV3ForCausalLM attn=eager experts=grouped_mm training=True top_k=2
  0: DeepseekV3Attention(full_attention) dense DeepseekV3MLP(up=[128, 64])
  1: DeepseekV3Attention(full_attention) moe[experts,gate,shared_experts] gate_up_proj[8, 64, 64] down_proj[8, 64, 32]
OlmoeForCausalLM attn=eager experts=grouped_mm training=True top_k=2
  0: OlmoeAttention(full_attention) moe[gate,experts] gate_up_proj[8, 64, 64] down_proj[8, 64, 32]
  1: OlmoeAttention(full_attention) moe[gate,experts] gate_up_proj[8, 64, 64] down_proj[8, 64, 32]
GptOssForCausalLM attn=eager experts=grouped_mm training=True top_k=2
  0: GptOssAttention(sliding_attention, window=8) moe[router,experts] gate_up_proj[4, 64, 64] gate_up_proj_bias[4, 64] down_proj[4, 32, 64] down_proj_bias[4, 64]
  1: GptOssAttention(full_attention) moe[router,experts] gate_up_proj[4, 64, 64] gate_up_proj_bias[4, 64] down_proj[4, 32, 64] down_proj_bias[4, 64]""")

    def test_deepseek_v3_router_uses_group_top_k_and_no_noise_features(self):
        cfg = tiny_config("deepseek_v3")
        self.assertEqual((cfg.n_routed_experts, cfg.n_group, cfg.topk_group, cfg.n_shared_experts), (8, 2, 1, 1))
        self.assertEqual(cfg.first_k_dense_replace, 1)
        model = tiny_model("deepseek_v3")
        router = model.model.layers[1].mlp.gate
        # Every token's experts must lie in a single group of 4 (topk_group=1).
        hidden = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
        _, _, indices = router(hidden)
        groups = indices // 4
        self.assertTrue((groups == groups[:, :1]).all(), indices)
        self.assertFalse(tiny_config("mixtral").router_jitter_noise)
        for family in TINY_FAMILIES:
            self.assertFalse(tiny_config(family).output_router_logits, family)

    def test_hyphenated_family_names_build_the_same_model(self):
        a = tiny_model("qwen3-moe", seed=3)
        b = tiny_model("qwen3_moe", seed=3)
        for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            self.assertEqual(na, nb)
            self.assertTrue(torch.equal(pa, pb), na)
        self.assertEqual(type(tiny_model("GPT-OSS")).__name__, "GptOssForCausalLM")

    def test_same_seed_same_weights_other_seed_other_weights_global_rng_untouched(self):
        torch.manual_seed(123)
        expected_next = torch.rand(3)
        torch.manual_seed(123)
        a = tiny_model("deepseek_v3", seed=7).state_dict()
        self.assertTrue(torch.equal(torch.rand(3), expected_next), "tiny_model consumed the global RNG")
        b = tiny_model("deepseek_v3", seed=7).state_dict()
        c = tiny_model("deepseek_v3", seed=8).state_dict()
        self.assertTrue(all(torch.equal(a[k], b[k]) for k in a))
        experts = "model.layers.1.mlp.experts.gate_up_proj"
        self.assertFalse(torch.equal(a[experts], c[experts]))

    def test_experts_implementation_is_applied_and_all_give_the_eager_loss(self):
        # `eager` is a Python loop over experts: the reference for the fused kernels.
        for family in ("qwen2_moe", "deepseek_v3", "gpt_oss"):
            losses = {}
            for impl in EXPERTS_IMPLEMENTATIONS:
                model = tiny_model(family, experts_implementation=impl)
                self.assertEqual(model.config._experts_implementation, impl)
                losses[impl] = model(**example_batch(model, 2, 16, seed=5)).loss
            for impl in EXPERTS_IMPLEMENTATIONS:
                torch.testing.assert_close(losses[impl], losses["eager"], msg=f"{family} {impl}")

    def test_dtype_and_num_layers(self):
        model = tiny_model("olmoe", num_layers=3, dtype=torch.bfloat16)
        self.assertEqual(len(model.model.layers), 3)
        self.assertEqual({p.dtype for p in model.parameters()}, {torch.bfloat16})
        gpt = tiny_config("gpt_oss", num_layers=3)
        self.assertEqual(gpt.layer_types, ["sliding_attention", "full_attention", "sliding_attention"])

    def test_bad_arguments_name_the_argument(self):
        with self.assertRaisesRegex(ValueError, "unknown family 'llama'.*mixtral, qwen2_moe"):
            tiny_model("llama")
        with self.assertRaisesRegex(ValueError, "experts_implementation='fast'"):
            tiny_model("mixtral", experts_implementation="fast")
        with self.assertRaisesRegex(ValueError, "num_layers must be >= 1"):
            tiny_model("mixtral", num_layers=0)


class ExampleBatchTest(expecttest.TestCase):
    def test_batch_shape_range_labels_and_determinism(self):
        config = tiny_config("mixtral")
        batch = example_batch(config, batch_size=3, seq_len=10, seed=4)
        self.assertEqual(sorted(batch), ["input_ids", "labels"])
        ids, labels = batch["input_ids"], batch["labels"]
        self.assertEqual((ids.shape, ids.dtype), (torch.Size([3, 10]), torch.int64))
        self.assertTrue(((ids >= 0) & (ids < 128)).all())
        self.assertTrue(torch.equal(ids, labels))
        self.assertNotEqual(ids.data_ptr(), labels.data_ptr())  # a clone, not an alias
        self.assertTrue(torch.equal(example_batch(config, 3, 10, seed=4)["input_ids"], ids))
        self.assertFalse(torch.equal(example_batch(config, 3, 10, seed=5)["input_ids"], ids))
        # a model and its config give the same batch; the ids span the vocabulary
        model = tiny_model("mixtral")
        model_ids = example_batch(model, 8, 64, seed=0)["input_ids"]
        self.assertTrue(torch.equal(model_ids, example_batch(model.config, 8, 64, seed=0)["input_ids"]))
        self.assertGreater(int(model_ids.max()), 120)

    def test_bad_arguments(self):
        config = tiny_config("mixtral")
        with self.assertRaisesRegex(ValueError, "seq_len=257 exceeds max_position_embeddings=256"):
            example_batch(config, 1, 257)
        with self.assertRaisesRegex(TypeError, "got str"):
            example_batch("mixtral", 1, 4)


# Published total parameter counts, with their source. DeepSeek-V3: the model card
# gives 671B for the main model and 685B including the 14B multi-token-prediction
# module, which the HF class does not build, so 671e9 is the reference.
PUBLISHED_PARAMS = {
    "mixtral-8x7b": 46.7e9,  # Mistral AI blog / model card
    "mixtral-8x22b": 141e9,  # Mistral AI blog "Cheaper, Better, Faster, Stronger"
    "qwen3-30b-a3b": 30.5e9,  # Qwen3-30B-A3B model card
    "qwen3-235b-a22b": 235e9,  # Qwen3-235B-A22B model card
    "deepseek-v3": 671e9,  # DeepSeek-V3 model card (without MTP)
    "gpt-oss-120b": 116.8e9,  # gpt-oss model card (OpenAI), table of parameters
    "gpt-oss-20b": 20.9e9,  # gpt-oss model card
    "olmoe-1b-7b": 6.9e9,  # OLMoE paper / model card (6.9B total, 1.3B active)
    "qwen2-57b-a14b": 57.4e9,  # Qwen2 technical report (57.4B total)
    "deepseek-moe-16b": 16.4e9,  # DeepSeekMoE paper (16.4B total)
}


def _mixtral_8x7b_params_by_hand() -> int:
    V, H, I, L, E = 32000, 4096, 14336, 32, 8
    kv = 8 * 128
    attn = H * H * 2 + H * kv * 2  # q, o ; k, v
    per_layer = attn + E * 3 * H * I + E * H + 2 * H  # experts, router, 2 norms
    return 2 * V * H + L * per_layer + H


def _deepseek_v3_params_by_hand() -> int:
    V, H, heads = 129280, 7168, 128
    q_rank, kv_rank, rope, nope, v = 1536, 512, 64, 128, 128
    attn = (
        H * q_rank + q_rank + q_rank * heads * (nope + rope)  # q_a, q_a_norm, q_b
        + H * (kv_rank + rope) + kv_rank + kv_rank * heads * (nope + v)  # kv_a, kv_a_norm, kv_b
        + heads * v * H  # o
    )
    dense = 3 * H * 18432
    moe = 256 * 3 * H * 2048 + 256 * H + 3 * H * 2048  # routed, router, 1 shared
    return 2 * V * H + 3 * (attn + dense + 2 * H) + 58 * (attn + moe + 2 * H) + H


def _deepseek_moe_16b_params_by_hand() -> int:
    """The real DeepSeekMoE-16B (remote-code DeepseekForCausalLM)."""
    V, H, L = 102400, 2048, 28
    attn = 4 * H * H
    dense = 3 * H * 10944
    moe = 64 * 3 * H * 1408 + 64 * H + 2 * 3 * H * 1408  # routed, router, 2 shared
    return 2 * V * H + (attn + dense + 2 * H) + (L - 1) * (attn + moe + 2 * H) + H


class RegistryTest(expecttest.TestCase):
    def test_every_entry_builds_on_meta_quickly_with_the_published_parameter_count(self):
        for name, spec in REGISTRY.items():
            with self.subTest(name=name):
                start = time.perf_counter()
                model = meta_model(name)
                seconds = time.perf_counter() - start
                self.assertLess(seconds, 10.0, f"{name} took {seconds:.1f}s on meta")
                self.assertEqual({p.device.type for p in model.parameters()}, {"meta"})
                self.assertEqual(model.config.model_type, spec.family)
                count = _num_params(model)
                published = PUBLISHED_PARAMS[name]
                self.assertLess(abs(count - published) / published, 0.02, f"{name}: {count:,} vs {published:,.0f}")

    def test_exact_counts_against_hand_formulas(self):
        self.assertEqual(_num_params(meta_model("mixtral-8x7b")), _mixtral_8x7b_params_by_hand())
        self.assertEqual(_num_params(meta_model("deepseek-v3")), _deepseek_v3_params_by_hand())
        # The Qwen2-MoE stand-in adds one Linear(2048 -> 1) shared-expert gate per MoE layer.
        self.assertEqual(_num_params(meta_model("deepseek-moe-16b")), _deepseek_moe_16b_params_by_hand() + 27 * 2048)

    def test_registry_table(self):
        rows = [
            f"{name:17s} {spec.family:11s} {spec.hf_model_id:35s} {_num_params(meta_model(name)) / 1e9:8.2f}B"
            for name, spec in REGISTRY.items()
        ]
        self.assertExpectedInline("\n".join(rows), """\
mixtral-8x7b      mixtral     mistralai/Mixtral-8x7B-v0.1            46.70B
mixtral-8x22b     mixtral     mistralai/Mixtral-8x22B-v0.1          140.63B
qwen3-30b-a3b     qwen3_moe   Qwen/Qwen3-30B-A3B                     30.53B
qwen3-235b-a22b   qwen3_moe   Qwen/Qwen3-235B-A22B                  235.09B
deepseek-v3       deepseek_v3 deepseek-ai/DeepSeek-V3               671.03B
gpt-oss-120b      gpt_oss     openai/gpt-oss-120b                   116.83B
gpt-oss-20b       gpt_oss     openai/gpt-oss-20b                     20.91B
olmoe-1b-7b       olmoe       allenai/OLMoE-1B-7B-0924                6.92B
qwen2-57b-a14b    qwen2_moe   Qwen/Qwen2-57B-A14B                    57.41B
deepseek-moe-16b  qwen2_moe   deepseek-ai/deepseek-moe-16b-base      16.38B""")

    def test_truncated_meta_models_keep_the_first_layers(self):
        ds = meta_model("deepseek-v3", num_layers=4)
        kinds = ["moe" if hasattr(layer.mlp, "experts") else "dense" for layer in ds.model.layers]
        self.assertEqual(kinds, ["dense", "dense", "dense", "moe"])
        self.assertEqual(tuple(ds.model.layers[3].mlp.experts.gate_up_proj.shape), (256, 4096, 7168))
        dsm = meta_model("deepseek-moe-16b", num_layers=2)
        self.assertEqual(["moe" if hasattr(l.mlp, "experts") else "dense" for l in dsm.model.layers], ["dense", "moe"])
        gpt = full_size_config("gpt-oss-120b", num_layers=3)
        self.assertEqual(gpt.layer_types, ["sliding_attention", "full_attention", "sliding_attention"])
        self.assertEqual(full_size_config("gpt-oss-20b").layer_types[:2], ["sliding_attention", "full_attention"])
        self.assertEqual(full_size_config("qwen3-30b-a3b")._attn_implementation, "eager")

    def test_resolve_model_routes_names(self):
        self.assertEqual(resolve_model("qwen3-moe").model.layers[0].self_attn.q_proj.weight.device.type, "cpu")
        self.assertEqual(len(resolve_model("deepseek_v3", num_layers=3).model.layers), 3)
        big = resolve_model("deepseek-v3", num_layers=1)  # registry names win over hyphenated families
        self.assertEqual(big.config.hidden_size, 7168)
        self.assertEqual(big.model.embed_tokens.weight.device.type, "meta")

    def test_unknown_names_list_the_valid_ones(self):
        expected = "unknown model 'llama-70b'; registry names: mixtral-8x7b, mixtral-8x22b"
        with self.assertRaisesRegex(ValueError, expected):
            meta_model("llama-70b")
        with self.assertRaisesRegex(ValueError, "registry names: .*deepseek-moe-16b"):
            full_size_config("mixtral")
        with self.assertRaisesRegex(ValueError, "registry names: .*; tiny families: mixtral, qwen2_moe"):
            resolve_model("llama")
        with self.assertRaisesRegex(ValueError, "num_layers must be >= 1 or None"):
            meta_model("mixtral-8x7b", num_layers=0)


if __name__ == "__main__":
    expecttest.run_tests()
