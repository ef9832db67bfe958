"""A model built on meta is built only where it runs, from an HF checkpoint or a seed.

* the checkpoint reader returns what ``save_pretrained`` wrote, tensor for tensor and
  expert row for expert row, in all three storage forms (fused, per expert, per expert
  with renamed modules); bad checkpoints are errors naming the tensor and the file;
* ``fxdisag.init_weights`` is the model's own init under a per-module seed;
* on 2-3 ranks, ``disaggregate(meta_model, weights=dir)`` trains like eager
  ``from_pretrained(dir)`` (loss <= 1e-5, gradients <= 1e-4 relative, 5-step trajectory)
  and each rank's resident parameter bytes are its share as the planner predicts; a
  seeded meta build equals ``init_weights`` of an eager model with the same seed; with the
  shared experts on an expert rank (``Plan.shared_expert_ranks``) that rank alone reads them.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from distributed import run_distributed
from eager import grad_errors, train_disaggregated, train_eager
from fxdisag.testing.models import example_batch, tiny_model
from fxdisag.weights import HFCheckpoint, init_weights, is_meta_model

STEPS = 5


def _meta_twin(model):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config)


def _saved(family: str, path) -> torch.nn.Module:
    model = tiny_model(family, seed=0)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe"])
def test_checkpoint_reads_what_save_pretrained_wrote(family, tmp_path):
    # mixtral: per-expert tensors under renamed modules (block_sparse_moe.experts.N.w1);
    # qwen2_moe: per-expert tensors plus shared experts; gpt_oss: fused expert tensors
    model = _saved(family, tmp_path)
    ck = HFCheckpoint(tmp_path, _meta_twin(model))
    ck.check()
    want = model.state_dict()
    assert set(ck.persistent) == set(want)
    for name, t in want.items():
        assert torch.equal(ck.read(name), t), name
    expert = next(n for n in want if n.endswith("experts.gate_up_proj"))
    E = want[expert].shape[0]
    for rows in ([0], [1, 2, E - 1], [E - 1, 0]):  # non-contiguous and out of order
        assert torch.equal(ck.read(expert, rows=rows), want[expert][rows])
    assert ck.read(expert, rows=[1], dtype=torch.bfloat16).dtype == torch.bfloat16


def _rewrite(path, edit):
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_bad_checkpoints_name_the_tensor_and_the_file(tmp_path):
    model = _saved("qwen3_moe", tmp_path)
    meta = _meta_twin(model)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight.*model\.safetensors"):
        HFCheckpoint(tmp_path, meta).check()

    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(KeyError, match=r"not in the model: 'model\.layers\.0\.mlp\.extra\.weight' \(model\.safetensors\)"):
        HFCheckpoint(tmp_path, meta).check()

    model.save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' \(model\.safetensors\) has shape \[3\]"):
        HFCheckpoint(tmp_path, meta).check()

    model.save_pretrained(tmp_path)  # one expert short
    _rewrite(tmp_path, lambda t: t.pop("model.layers.0.mlp.experts.3.down_proj.weight"))
    with pytest.raises(KeyError, match=r"7 of the 8 experts of 'model\.layers\.0\.mlp\.experts\.down_proj'.*\[3\]"):
        HFCheckpoint(tmp_path, meta).check()

    model.save_pretrained(tmp_path)  # a per-expert tensor of the wrong width
    _rewrite(tmp_path, lambda t: t.update({k: v[:-1] for k, v in t.items() if k.endswith("experts.0.up_proj.weight")}))
    with pytest.raises(ValueError, match=r"experts\.(0|7)\.up_proj\.weight"):
        HFCheckpoint(tmp_path, meta).check()

    with pytest.raises(FileNotFoundError, match="not a directory"):
        HFCheckpoint(tmp_path / "nowhere", meta)


def test_init_weights_is_the_models_own_init_under_a_seed():
    model = tiny_model("qwen3_moe", seed=0)
    a = init_weights(_meta_twin(model), seed=3)
    torch.manual_seed(123)  # the global RNG does not matter
    b = init_weights(_meta_twin(model), seed=3)
    c = init_weights(_meta_twin(model), seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert not any(t.is_meta for t in sa.values())
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    # what HF's _init_weights does: norms at one, weights ~ N(0, initializer_range), the
    # rotary buffer computed (it is in no checkpoint)
    std = model.config.initializer_range
    assert torch.equal(sa["model.norm.weight"], torch.ones_like(sa["model.norm.weight"]))
    assert abs(float(sa["model.layers.0.mlp.experts.gate_up_proj"].std()) - std) < 0.1 * std
    assert torch.allclose(dict(a.named_buffers())["model.rotary_emb.inv_freq"],
                          dict(model.named_buffers())["model.rotary_emb.inv_freq"])


def test_a_partly_meta_model_is_an_error():
    from fxdisag.api import _weight_source

    model = tiny_model("qwen3_moe", seed=0)
    assert not is_meta_model(model) and is_meta_model(_meta_twin(model))
    with pytest.raises(ValueError, match="weights= loads each rank's own tensors into a model built on the meta"):
        _weight_source(model, "/tmp", 0, "slices")
    model.model.norm.weight = torch.nn.Parameter(torch.empty(64, device="meta"))
    with pytest.raises(ValueError, match=r"partly on the meta device \('model\.norm\.weight' is meta"):
        is_meta_model(model)


def _resident_bytes(model, dmodel, buffers: bool = False) -> int:
    """Bytes of real parameter (or buffer) storage the rank holds: the model's and fxdisag's own."""
    seen = {}
    tensors = (list(model.buffers()) + list(dmodel.buffers())) if buffers else \
        (list(model.parameters()) + list(dmodel.parameters()))
    for p in tensors:
        if not p.is_meta:
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def _train_meta(rank: int, world: int, family: str, n_attn: int, path: str | None, seed: int,
                shared: int | None = None) -> dict:
    import fxdisag
    from fxdisag.planner.plan import Plan

    config = tiny_model(family, seed=0).config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    batches = [example_batch(config, 8, 12, seed=s) for s in range(STEPS)]
    num_experts = fxdisag.find_layout(model).moe[0].num_experts
    plan = Plan.manual(num_attention=n_attn, num_expert=world - n_attn, num_experts=num_experts, num_microbatches=2)
    if shared is not None:
        plan = dataclasses.replace(plan, shared_expert_ranks=[shared])
    dmodel = fxdisag.disaggregate(model, batches[0], plan, weights=path, seed=seed)
    resident = _resident_bytes(model, dmodel)
    buffers = _resident_bytes(model, dmodel, buffers=True)
    losses, grads0 = train_disaggregated(dmodel, batches, [torch.optim.AdamW(dmodel.parameters(), lr=1e-2)])
    out = {"losses": losses, "resident": resident, "buffers": buffers, "materialized": dmodel.materialized_bytes}
    if rank != 0:
        return out
    from fxdisag.planner.memory import rank_parameter_bytes
    from fxdisag.planner.profile import profile

    fresh = tiny_model(family, seed=0)
    out["predicted"] = rank_parameter_bytes(profile(fxdisag.capture(fresh, batches[0]), 1, 12, torch.float32), plan)
    # The eager reference: what a user would build without fxdisag.
    if path is not None:
        ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                   experts_implementation=config._experts_implementation)
    else:
        ref = init_weights(_meta_twin(fresh), seed=seed)
    ref.train()
    ref_losses, ref_grads0 = train_eager(ref, batches, partial(torch.optim.AdamW, lr=1e-2))
    out.update(ref_losses=ref_losses, grad_err=grad_errors(grads0, ref_grads0))
    return out


def _check(results, world):
    r0 = results[0]
    assert abs(r0["losses"][0] - r0["ref_losses"][0]) <= 1e-5
    assert max(r0["grad_err"].values()) <= 1e-4, r0["grad_err"]
    for got, want in zip(r0["losses"], r0["ref_losses"]):
        assert abs(got - want) <= 1e-4
    for r in range(world):
        assert results[r]["losses"] == r0["losses"]
        # resident weight bytes are the rank's own share, nothing of the rest of the model
        assert results[r]["resident"] == r0["predicted"][r], r
        assert results[r]["materialized"] == results[r]["resident"] + results[r]["buffers"], r


@pytest.mark.dist
def test_meta_build_from_a_checkpoint_trains_like_from_pretrained(tmp_path):
    # mixtral stores experts per expert under renamed modules; 1A+2E splits them
    _saved("mixtral", tmp_path)
    results = run_distributed(_train_meta, 3, "mixtral", 1, str(tmp_path), 0, timeout=150)
    _check(results, 3)


@pytest.mark.dist
def test_seeded_meta_build_equals_init_weights(tmp_path):
    # qwen2_moe: shared experts on the attention side
    results = run_distributed(_train_meta, 2, "qwen2_moe", 1, None, 7, timeout=120)
    _check(results, 2)


@pytest.mark.dist
def test_meta_build_reads_the_shared_experts_on_their_expert_host(tmp_path):
    # qwen2_moe, shared experts on expert rank 2: only it reads and holds them
    _saved("qwen2_moe", tmp_path)
    results = run_distributed(_train_meta, 3, "qwen2_moe", 1, str(tmp_path), 0, 2, timeout=150)
    _check(results, 3)
