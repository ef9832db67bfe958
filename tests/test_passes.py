"""insert_dispatch + split_stages: single-process parity and the shape of the split."""

from __future__ import annotations

import copy

import expecttest
import pytest
import torch

import fxdisag
from fxdisag.testing.models import TINY_FAMILIES, example_batch, tiny_model
from fxdisag.codegen.insert_dispatch import insert_dispatch
from fxdisag.codegen.split_stages import split_stages
from fxdisag.runtime.dispatch import combine, pack


def test_pack_combine_equals_the_experts_call():
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(10, 64)
    idx = torch.randint(0, 4, (10, 2))
    w = torch.rand(10, 2)
    xs, ws, ids, inv = pack(hidden, idx, w, owner=(1, 0, 1, 0))
    # Rows are grouped by owner slot: slot 0 (experts 1, 3) first.
    slot = torch.tensor([1, 0, 1, 0])[ids.view(-1)]
    assert torch.equal(slot, slot.sort().values)
    out = combine(experts(xs, ids, ws), inv, top_k=2)
    torch.testing.assert_close(out, experts(hidden, idx, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_split_program_matches_eager_in_one_process(family):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    batch = example_batch(model, 2, 8)
    captured = fxdisag.capture(model, batch)
    num_experts = captured.layout.moe[0].num_experts
    owner = [e * 3 // num_experts for e in range(num_experts)]
    program = split_stages(insert_dispatch(captured.graph_module, captured.layout, owner, 3))
    assert len(program.stages) == len(captured.layout.moe) + 1
    loss, _ = program.graph_module(batch["input_ids"], batch["labels"])
    loss.backward()
    ref = reference(**batch, use_cache=False)
    ref.loss.backward()
    assert abs(float(loss) - float(ref.loss)) <= 1e-6
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)) <= 1e-5, name


class SplitShapeTest(expecttest.TestCase):
    def test_mixtral_stage_boundaries(self):
        model = tiny_model("mixtral")
        batch = example_batch(model, 2, 8)
        captured = fxdisag.capture(model, batch)
        program = split_stages(insert_dispatch(captured.graph_module, captured.layout, [0, 0, 1, 1], 2))
        self.assertExpectedInline(program.describe(), """\
attention stage 0: inputs ['input_ids', 'config'] -> outputs ['xs_0', 'ids_0', 'ws_0', 'inv_0', 'getitem_23', 'getitem_24', 'getitem_25', 'add_1', 'model_rotary_emb', 'create_causal_mask', 'unsqueeze']
  boundary 0 (model.layers.0.mlp.experts): send xs_0, ids_0, ws_0 -> receive ys_0
attention stage 1: inputs ['ys_0', 'inv_0', 'getitem_23', 'getitem_24', 'getitem_25', 'add_1', 'model_rotary_emb', 'create_causal_mask', 'unsqueeze'] -> outputs ['xs_1', 'ids_1', 'ws_1', 'inv_1', 'getitem_26', 'getitem_27', 'getitem_28', 'add_3']
  boundary 1 (model.layers.1.mlp.experts): send xs_1, ids_1, ws_1 -> receive ys_1
attention stage 2: inputs ['ys_1', 'inv_1', 'getitem_26', 'getitem_27', 'getitem_28', 'add_3', 'labels'] -> outputs ['cross_entropy', 'lm_head']""")

    def test_insert_dispatch_rejects_bad_placement(self):
        model = tiny_model("mixtral")
        captured = fxdisag.capture(model, example_batch(model, 1, 4))
        with self.assertRaisesRegex(ValueError, r"owner slots .* must lie in \[0, 2\)"):
            insert_dispatch(captured.graph_module, captured.layout, [0, 1, 2, 0], 2)
        with self.assertRaisesRegex(ValueError, "placement gives 3 experts, MoE layer 0 has 4"):
            insert_dispatch(captured.graph_module, captured.layout, [0, 1, 0], 2)
