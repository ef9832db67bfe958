"""capture(): exact parity with eager for every family, region tags, errors, dumps."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os

import expecttest
import pytest
import torch
from torch import nn

import fxdisag
from fxdisag.capture import REGION_KINDS, CaptureError
from fxdisag.layout import LayoutError
from fxdisag.testing.models import TINY_FAMILIES, example_batch, meta_model, tiny_model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_loss_and_every_grad_match_eager(family):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    batch = example_batch(model, batch_size=2, seq_len=12)

    ref = reference(**batch, use_cache=False)
    ref.loss.backward()
    captured = fxdisag.capture(model, batch)
    out = captured(**batch)
    out.loss.backward()

    assert abs(out.loss.item() - ref.loss.item()) <= 1e-6
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-6)
    ref_grads, grads = _grads(reference), _grads(model)
    assert ref_grads.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for name in ref_grads:
        assert _rel(grads[name], ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_node_is_tagged_and_each_moe_layer_has_one_experts_node(family):
    model = tiny_model(family)
    captured = fxdisag.capture(model, example_batch(model, 2, 8))
    kinds = set()
    for node in captured.graph_module.graph.nodes:
        tag = node.meta["fxdisag_region"]
        assert tag.kind in REGION_KINDS, (node.name, tag)
        kinds.add(tag.kind)
    experts = [
        n for n in captured.graph_module.graph.nodes if n.meta["fxdisag_region"].kind == "experts"
    ]
    assert [n.op for n in experts] == ["call_module"] * len(captured.layout.moe)
    assert [n.target for n in experts] == [m.experts for m in captured.layout.moe]
    assert {"embed", "attn", "router", "experts", "norm", "head", "loss"} <= kinds
    if family in ("qwen2_moe", "deepseek_v3"):
        assert "shared_experts" in kinds
    if family == "deepseek_v3":
        assert "dense_mlp" in kinds


def test_graph_is_not_specialised_to_the_example_shape():
    model = tiny_model("qwen3_moe")
    captured = fxdisag.capture(model, example_batch(model, 2, 8))
    assert captured.specialized == []
    other = example_batch(model, 3, 13, seed=1)
    torch.testing.assert_close(captured(**other).loss, model(**other, use_cache=False).loss, rtol=0, atol=1e-6)


def test_batched_mm_experts_and_attention_mask_input():
    model = tiny_model("mixtral", experts_implementation="batched_mm")
    batch = example_batch(model, 2, 8)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["attention_mask"][1, :3] = 0
    captured = fxdisag.capture(model, batch)
    ref = copy.deepcopy(model)(**batch, use_cache=False)
    torch.testing.assert_close(captured(**batch).loss, ref.loss, rtol=0, atol=1e-6)


def test_full_size_deepseek_v3_layers_capture_on_meta():
    model = meta_model("deepseek-v3", num_layers=5)
    ids = torch.zeros(1, 4096, dtype=torch.long, device="meta")
    captured = fxdisag.capture(model, {"input_ids": ids, "labels": ids})
    layout = captured.layout
    assert sorted(layout.dense_mlp) == [0, 1, 2]
    assert [m.layer for m in layout.moe] == [3, 4]
    assert layout.moe[0].num_experts == 256 and layout.moe[0].top_k == 8
    assert layout.moe[0].shared == ["model.layers.3.mlp.shared_experts"]


class RegionTableTest(expecttest.TestCase):
    def test_mixtral(self):
        model = tiny_model("mixtral")
        captured = fxdisag.capture(model, example_batch(model, 2, 8))
        self.assertExpectedInline(
            captured.region_table(),
            """\
region                nodes            params       bytes  example output
-------------------------------------------------------------------------
embed                    12             8,192     32.0 KB  (1x8x16, 1x8x16)
norm[0]                   2               128       512 B  2x8x64
attn[0]                   5            12,288     48.0 KB  2x8x64
router[0]                11               256      1.0 KB  16x2
experts[0]                1            24,576     96.0 KB  16x64
combine[0]                1                 0         0 B  2x8x64
norm[1]                   2               128       512 B  2x8x64
attn[1]                   5            12,288     48.0 KB  2x8x64
router[1]                11               256      1.0 KB  16x2
experts[1]                1            24,576     96.0 KB  16x64
combine[1]                1                 0         0 B  2x8x64
norm                      2                64       256 B  2x8x64
head                      1             8,192     32.0 KB  2x8x128
loss                     10                 0         0 B  scalar
-------------------------------------------------------------------------
total                    65            90,944    355.2 KB""",
        )

    def test_deepseek_v3(self):
        model = tiny_model("deepseek_v3")
        captured = fxdisag.capture(model, example_batch(model, 2, 8))
        self.assertExpectedInline(
            captured.region_table(),
            """\
region                nodes            params       bytes  example output
-------------------------------------------------------------------------
embed                    12             8,192     32.0 KB  (1x8x8, 1x8x8)
norm[0]                   2               128       512 B  2x8x64
attn[0]                   5            11,312     44.2 KB  2x8x64
dense_mlp[0]              1            24,576     96.0 KB  2x8x64
norm[1]                   2               128       512 B  2x8x64
attn[1]                   5            11,312     44.2 KB  2x8x64
router[1]                 7               512      2.0 KB  16x64
experts[1]                1            49,152    192.0 KB  16x64
combine[1]                6                 0         0 B  2x8x64
shared_experts[1]         1             6,144     24.0 KB  2x8x64
norm                      2                64       256 B  2x8x64
head                      1             8,192     32.0 KB  2x8x128
loss                     10                 0         0 B  scalar
-------------------------------------------------------------------------
total                    55           119,712    467.6 KB""",
        )


# ----------------------------------------------------------------------------- errors


def test_dense_model_error_names_the_class_and_what_was_looked_for():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    with pytest.raises(LayoutError, match=r"LlamaForCausalLM has no routed experts.*3-D expert weights"):
        fxdisag.capture(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"inputs_embeds": torch.zeros(1, 4, 64)}, "unsupported input 'inputs_embeds'"),
        ({"input_ids": [[1, 2, 3]]}, "input 'input_ids' must be a torch.Tensor"),
        ({"labels": torch.zeros(1, 4, dtype=torch.long)}, "'input_ids' is required"),
    ],
)
def test_unsupported_inputs(inputs, message):
    model = tiny_model("mixtral")
    with pytest.raises(TypeError, match=message):
        fxdisag.capture(model, inputs)


def test_called_with_other_inputs_than_captured():
    model = tiny_model("mixtral")
    batch = example_batch(model, 1, 4)
    captured = fxdisag.capture(model, batch)
    with pytest.raises(TypeError, match="was captured with inputs"):
        captured(input_ids=batch["input_ids"])


def test_router_aux_loss_is_refused_with_the_fix():
    model = tiny_model("mixtral")
    model.config.output_router_logits = True
    with pytest.raises(CaptureError, match="output_router_logits = False"):
        fxdisag.capture(model, example_batch(model, 1, 4))


class _Attention(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.proj = nn.Linear(h, h)

    def forward(self, x, attention_mask=None):
        return self.proj(x)


class _Experts(nn.Module):
    def __init__(self, e, h):
        super().__init__()
        self.w = nn.Parameter(torch.randn(e, h, h) * 0.1)

    def forward(self, x, top_k_index, top_k_weights):
        out = torch.einsum("nh,nkhg->nkg", x, self.w[top_k_index])
        return (out * top_k_weights.unsqueeze(-1)).sum(1)


class _Block(nn.Module):
    def __init__(self, e, h):
        super().__init__()
        self.gate = nn.Linear(h, e, bias=False)
        self.experts = _Experts(e, h)
        self.top_k = 2

    def forward(self, x):
        w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
        return self.experts(x, idx, w)


class _Layer(nn.Module):
    def __init__(self, e, h, branch):
        super().__init__()
        self.self_attn = _Attention(h)
        self.mlp = _Block(e, h)
        self.branch = branch

    def forward(self, x):
        x = x + self.self_attn(x)
        if self.branch and x.sum() > 0:  # data-dependent control flow outside any leaf module
            x = x * 2
        return x + self.mlp(x.view(-1, x.shape[-1])).view_as(x)


class _ToyLM(nn.Module):
    def __init__(self, e=4, h=8, v=16, branch=False):
        super().__init__()
        self.embed = nn.Embedding(v, h)
        self.layers = nn.ModuleList([_Layer(e, h, branch)])
        self.head = nn.Linear(h, v)

    def forward(self, input_ids, use_cache=False):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.head(x))


def test_capture_failure_names_the_module_and_the_construct():
    model = _ToyLM(branch=True)
    with pytest.raises(CaptureError, match=r"module 'layers\.0' \(_Layer\) at .*test_capture.py.*x.sum\(\) > 0.* branches on a tensor value"):
        fxdisag.capture(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})


def test_capture_failure_quotes_user_code_kept_in_a_folder_named_fxdisag(tmp_path):
    # A user's folder called ``fxdisag`` (e.g. a clone of this repository) is still the user's
    # code: the error must quote its line, not skip it as a library frame.
    folder = tmp_path / "fxdisag"
    folder.mkdir()
    classes = [_Attention, _Experts, _Block, _Layer, _ToyLM]
    source = "import torch\nfrom torch import nn\n\n\n" + "\n\n".join(inspect.getsource(c) for c in classes)
    (folder / "user_model.py").write_text(source)
    spec = importlib.util.spec_from_file_location("user_model_in_fxdisag_folder", folder / "user_model.py")
    user_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user_model)
    model = user_model._ToyLM(branch=True)
    pattern = r"module 'layers\.0' \(_Layer\) at .*/fxdisag/user_model\.py.*x\.sum\(\) > 0.* branches on a tensor value"
    with pytest.raises(CaptureError, match=pattern):
        fxdisag.capture(model, {"input_ids": torch.zeros(1, 4, dtype=torch.long)})


def test_a_family_built_the_same_way_works_without_code_changes():
    model = _ToyLM()  # not a transformers model, but the same structure: router -> experts(x, idx, w)
    ids = torch.randint(0, 16, (2, 5))
    captured = fxdisag.capture(model, {"input_ids": ids})
    torch.testing.assert_close(captured(input_ids=ids).logits, model(ids).logits)
    assert [m.experts for m in captured.layout.moe] == ["layers.0.mlp.experts"]
    assert captured.layout.moe[0].router == "layers.0.mlp.gate"


def test_dump_env_writes_the_captured_graph(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDISAG_DUMP_DIR", str(tmp_path))
    model = tiny_model("olmoe")
    fxdisag.capture(model, example_batch(model, 1, 4))
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith("_captured.txt") for f in files) and any(f.endswith("_captured.py") for f in files)
    text = (tmp_path / next(f for f in files if f.endswith("_captured.txt"))).read_text()
    assert "experts[1]" in text and "call_module[target=model.layers.1.mlp.experts]" in text
