"""profile(): FLOPs and bytes per region against hand-computed values."""

import json

import pytest
import torch

from fxdisag import capture
from fxdisag.testing.models import example_batch, meta_model, tiny_model
from fxdisag.planner.profile import ModelProfile, ProfileError, profile

# tiny Mixtral (fxdisag.testing.models): vocab 128, hidden 64, 4 heads of 16, 2 KV heads, 4 experts of width 32, top-2
H, V, HEADS, HD, KV, E, K, I = 64, 128, 4, 16, 2, 4, 2, 32


@pytest.fixture(scope="module")
def mixtral():
    model = tiny_model("mixtral")
    return capture(model, example_batch(model, 2, 16))


@pytest.fixture(scope="module")
def p16(mixtral):
    return profile(mixtral, 2, 16, torch.bfloat16)


def test_flops_per_region_match_hand_counts(p16):
    B, S = 2, 16
    T = B * S
    q, k, v, o = HEADS * HD, KV * HD, KV * HD, HEADS * HD
    for layer in (0, 1):
        attn = B * p16.region("attn", layer).fwd_flops.at(S)
        assert attn == 2 * T * H * (q + k + v + o) + 2 * 2 * B * HEADS * S**2 * HD
        assert B * p16.region("router", layer).fwd_flops.at(S) == 2 * T * H * E
        assert B * p16.region("experts", layer).fwd_flops.at(S) == 2 * T * K * 3 * H * I
        assert p16.region("attn", layer).bwd_flops.at(S) == 2 * p16.region("attn", layer).fwd_flops.at(S)
    assert B * p16.region("head").fwd_flops.at(S) == 2 * T * H * V
    assert p16.region("embed").fwd_flops.at(S) == 0


def test_weights_and_boundary_bytes_match_hand_counts(p16):
    q, kv = HEADS * HD, KV * HD
    assert p16.region("attn", 0).params == H * q + 2 * H * kv + q * H
    assert p16.region("attn", 0).weight_bytes == 2 * p16.region("attn", 0).params  # bf16
    assert p16.region("experts", 0).params == E * 3 * H * I
    assert p16.region("router", 0).params == H * E
    assert p16.region("head").params == H * V and p16.region("embed").params == V * H
    moe = p16.moe[0]
    assert (moe.num_experts, moe.top_k, moe.params_per_expert) == (E, K, 3 * H * I)
    assert moe.fwd_flops_per_row == 2 * 3 * H * I
    # one message row per (token, expert rank): the bf16 hidden row, K bf16 weights, K int32 local ids
    assert moe.dispatch_bytes_per_row == H * 2 + K * (2 + 4)
    assert moe.combine_bytes_per_row == moe.combine_grad_bytes_per_row == H * 2  # summed on the expert rank
    assert moe.dispatch_grad_bytes_per_row == H * 2 + K * 2  # the row's gradient and K weight gradients
    assert moe.dispatch_bytes(3, 16, 1.5) == 3 * 16 * 1.5 * (H * 2 + K * 6)
    # SwiGLU expert keeps its input (H), gate/up output (2I), activation and product (I each)
    assert moe.saved_bytes_per_row == (H + 4 * I) * 2
    assert p16.total_params == sum(p.numel() for p in tiny_model("mixtral").parameters())


def test_attention_flops_grow_with_seq_len_squared(mixtral, p16):
    p64 = profile(mixtral, 2, 64)
    for kind in ("attn", "router", "experts", "head"):
        assert p16.region(kind, 0 if kind != "head" else None).fwd_flops.at(64) == pytest.approx(
            p64.region(kind, 0 if kind != "head" else None).fwd_flops.at(64), rel=1e-12)
    attn = p16.region("attn", 0).fwd_flops
    assert attn.quadratic == 2 * 2 * HEADS * HD  # per sequence: 4 heads * S^2 * head_dim, two matmuls
    assert attn.at(64) / attn.at(16) > 64 / 16  # superlinear
    assert p16.region("router", 0).fwd_flops.quadratic == 0


def test_costs_are_per_sequence(mixtral, p16):
    p1 = profile(mixtral, 1, 16)
    for kind in ("attn", "router", "experts", "head"):
        layer = None if kind == "head" else 1
        assert p1.region(kind, layer).fwd_flops == p16.region(kind, layer).fwd_flops
        assert p1.region(kind, layer).saved_bytes.at(16) == pytest.approx(p16.region(kind, layer).saved_bytes.at(16))


def test_fused_attention_drops_the_s2_activations(mixtral, p16):
    eager = profile(mixtral, 2, 16, fused_attention=False)
    assert eager.region("attn", 0).saved_bytes.quadratic > 0  # eager keeps B x heads x S x S probabilities
    assert p16.region("attn", 0).saved_bytes.quadratic == 0
    dropped = p16.region("attn", 0).materialised_bytes.quadratic
    assert dropped == eager.region("attn", 0).saved_bytes.quadratic + eager.region("attn", 0).io_bytes.quadratic
    assert eager.region("attn", 0).fwd_flops == p16.region("attn", 0).fwd_flops


def test_table_and_round_trip(p16):
    text = p16.table()
    assert "attn[0]" in text and "experts[0-1]" in text and f"dispatch {H * 2 + K * 6} B" in text
    assert ModelProfile.from_dict(p16.to_dict()) == p16


def old_format(data: dict) -> dict:
    """A profile dict as written before message rows: top_k rows per token, one int32 id and
    one weight each."""
    data = json.loads(json.dumps(data))
    for m in data["moe"]:
        for name in ("dispatch", "combine", "combine_grad", "dispatch_grad"):
            del m[f"{name}_bytes_per_row"]
        k, h, d = m["top_k"], m["hidden_size"], data["dtype_bytes"]
        m.update(dispatch_bytes_per_token=k * (h * d + 4 + d), combine_bytes_per_token=k * h * d,
                 combine_grad_bytes_per_token=k * h * d, dispatch_grad_bytes_per_token=k * (h * d + d))
    return data


def test_old_profile_files_load_with_bytes_per_row(p16):
    assert ModelProfile.from_dict(old_format(p16.to_dict())) == p16
    edited = old_format(p16.to_dict())
    edited["moe"][1]["combine_bytes_per_token"] += 1  # not what the old format wrote: no conversion
    with pytest.raises(ProfileError, match="MoE layer 1 .*combine_bytes_per_token"):
        ModelProfile.from_dict(edited)


def test_full_size_meta_deepseek_mla_matches_hand_counts():
    model = meta_model("deepseek-v3", num_layers=4)  # layers 0-2 dense, layer 3 MoE
    captured = capture(model, example_batch(model, 1, 16, device="meta"))
    p = profile(captured, 1, 4096)
    # MLA projections: q_a 7168x1536, q_b 1536x(128*192), kv_a 7168x576, kv_b 512x(128*256), o 16384x7168
    proj = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    attn = p.region("attn", 3).fwd_flops
    assert attn.linear == 2 * proj
    assert attn.quadratic == 2 * 128 * (192 + 128)  # scores (qk dim 192) + weighted values (v dim 128)
    assert p.region("dense_mlp", 0).fwd_flops.linear == 2 * 3 * 7168 * 18432
    assert p.region("shared_experts", 3).fwd_flops.linear == 2 * 3 * 7168 * 2048
    (moe,) = p.moe
    assert (moe.layer, moe.num_experts, moe.top_k) == (3, 256, 8)
    assert moe.fwd_flops_per_row == 2 * 3 * 7168 * 2048
    assert moe.dispatch_bytes_per_row == 7168 * 2 + 8 * (2 + 4)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_stage_params_are_what_each_split_stage_reads(family):
    # Two derivations: the profile walks the captured graph, split_stages cuts it with
    # torch.fx.passes.split_module. Shared experts sit on either side of the cut by family.
    from fxdisag.codegen.insert_dispatch import insert_dispatch
    from fxdisag.codegen.split_stages import split_stages

    model = tiny_model(family, seed=0, num_layers=3)
    captured = capture(model, example_batch(model, 2, 8))
    prof = profile(captured, batch_size=1, seq_len=8, dtype=torch.float32)
    E = captured.layout.moe[0].num_experts
    program = split_stages(insert_dispatch(captured.graph_module, captured.layout, [0] * E, 1))
    seen, want = set(), []
    for stage in program.stages:
        fresh = [p for p in stage.module.parameters() if id(p) not in seen]
        seen |= {id(p) for p in fresh}
        want.append(sum(p.numel() for p in fresh))
    assert prof.stage_params == want
    experts = sum(p.numel() for m in captured.layout.moe for p in model.get_submodule(m.experts).parameters())
    assert sum(prof.stage_params) + experts == sum(p.numel() for p in model.parameters())
    assert ModelProfile.from_dict(prof.to_dict()).stage_params == want
