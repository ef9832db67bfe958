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
from fxdisag.runtime.dispatch import combine, expert_rows, pack, row_ranks


def test_pack_combine_equals_the_experts_call():
    torch.manual_seed(0)
    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    hidden = torch.randn(10, 64)
    idx = torch.randint(0, 4, (10, 2))
    w = torch.rand(10, 2)
    owner = (1, 0, 1, 0)
    xs, ws, ids, token, n = pack(hidden, idx, w, owner=owner)
    # One row per (token, rank reached), grouped by owner slot: slot 0 (experts 1, 3) first.
    reached = {(t, owner[int(e)]) for t in range(10) for e in idx[t]}
    assert xs.shape[0] == len(reached) and n.shape == (10, 0)
    slot = row_ranks(ids, torch.tensor(owner))
    assert torch.equal(slot, slot.sort().values)
    assert sorted(zip(token.tolist(), slot.tolist())) == sorted(reached)
    # a row's valid slots are exactly the token's choices on its rank, weights beside them
    for r in range(xs.shape[0]):
        t = int(token[r])
        for k in range(2):
            on_rank = owner[int(idx[t, k])] == int(slot[r])
            assert int(ids[r, k]) == (int(idx[t, k]) if on_rank else -1)
            assert float(ws[r, k]) == (float(w[t, k]) if on_rank else 0.0)
    out = combine(expert_rows(experts, xs, ids, ws), token, n)
    torch.testing.assert_close(out, experts(hidden, idx, w), rtol=1e-6, atol=1e-6)


def test_pack_gradients_equal_the_experts_call():
    torch.manual_seed(1)
    experts = tiny_model("qwen3_moe").model.layers[0].mlp.experts
    E = experts.gate_up_proj.shape[0]
    hidden = torch.randn(12, experts.gate_up_proj.shape[1], requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:4] for _ in range(12)])
    w = torch.rand(12, 4, requires_grad=True)
    xs, ws, ids, token, n = pack(hidden, idx, w, owner=tuple(e % 3 for e in range(E)))
    out = combine(expert_rows(experts, xs, ids, ws), token, n)
    g = torch.randn_like(out)
    gh, gw = torch.autograd.grad(out, [hidden, w], g)
    ref = experts(hidden, idx, w)
    rh, rw = torch.autograd.grad(ref, [hidden, w], g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def _assert_trains_like_eager(program, model, reference, batch) -> None:
    """The split program's loss (<= 1e-6) and every gradient (relative <= 1e-5) equal eager's."""
    loss, _ = program.graph_module(batch["input_ids"], batch["labels"])
    loss.backward()
    ref = reference(**batch, use_cache=False)
    ref.loss.backward()
    assert abs(float(loss) - float(ref.loss)) <= 1e-6
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert float((p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-30)) <= 1e-5, name


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
    _assert_trains_like_eager(program, model, reference, batch)


class SplitShapeTest(expecttest.TestCase):
    def test_mixtral_stage_boundaries(self):
        model = tiny_model("mixtral")
        batch = example_batch(model, 2, 8)
        captured = fxdisag.capture(model, batch)
        program = split_stages(insert_dispatch(captured.graph_module, captured.layout, [0, 0, 1, 1], 2))
        self.assertExpectedInline(program.describe(), """\
attention stage 0: inputs ['input_ids', 'config'] -> outputs ['xs_0', 'ids_0', 'ws_0', 'token_0', 'ntok_0', 'getitem_25', 'getitem_26', 'getitem_27', 'add_1', 'model_rotary_emb', 'create_causal_mask', 'unsqueeze']
  boundary 0 (model.layers.0.mlp.experts): send xs_0, ids_0, ws_0 -> receive ys_0
attention stage 1: inputs ['ys_0', 'token_0', 'ntok_0', 'getitem_25', 'getitem_26', 'getitem_27', 'add_1', 'model_rotary_emb', 'create_causal_mask', 'unsqueeze'] -> outputs ['xs_1', 'ids_1', 'ws_1', 'token_1', 'ntok_1', 'getitem_28', 'getitem_29', 'getitem_30', 'add_3']
  boundary 1 (model.layers.1.mlp.experts): send xs_1, ids_1, ws_1 -> receive ys_1
attention stage 2: inputs ['ys_1', 'token_1', 'ntok_1', 'getitem_28', 'getitem_29', 'getitem_30', 'add_3', 'labels'] -> outputs ['cross_entropy', 'lm_head']""")

    def test_insert_dispatch_rejects_bad_placement(self):
        model = tiny_model("mixtral")
        captured = fxdisag.capture(model, example_batch(model, 1, 4))
        with self.assertRaisesRegex(ValueError, r"owner slots .* must lie in \[0, 2\)"):
            insert_dispatch(captured.graph_module, captured.layout, [0, 1, 2, 0], 2)
        with self.assertRaisesRegex(ValueError, "placement gives 3 experts, MoE layer 0 has 4"):
            insert_dispatch(captured.graph_module, captured.layout, [0, 1, 0], 2)


@pytest.mark.parametrize("family, slots", [("qwen2_moe", (1,)), ("deepseek_v3", (0,)), ("qwen2_moe", (0, 1)),
                                           ("deepseek_v3", (0, 1))])
def test_shared_experts_as_an_expert_match_eager_in_one_process(family, slots):
    """insert_dispatch(shared_slots=...): the shared experts run inside the experts boundary as
    expert E (one host) or E + slot (a copy per slot), and the split program still computes
    the model's loss and gradients."""
    model = tiny_model(family, num_layers=3)
    reference = copy.deepcopy(model)
    batch = example_batch(model, 2, 8)
    captured = fxdisag.capture(model, batch)
    E = captured.layout.moe[0].num_experts
    program = split_stages(insert_dispatch(captured.graph_module, captured.layout, [e * 2 // E for e in range(E)], 2,
                                           shared_slots=slots))
    shared = [m.shared for m in captured.layout.moe]
    assert [b.shared_fqn for b in program.boundaries] == [next(f for f in s if not f.endswith("_gate")) for s in shared]
    # the shared experts' parameters left the attention stages (the gate, if any, stays)
    staged = {id(p) for st in program.stages for p in st.module.parameters()}
    for b in program.boundaries:
        assert all(id(p) not in staged for p in model.get_submodule(b.shared_fqn).parameters())
    _assert_trains_like_eager(program, model, reference, batch)


class SharedExpertsPassTest(expecttest.TestCase):
    def test_qwen2_moe_boundary_carries_the_shared_expert(self):
        model = tiny_model("qwen2_moe")
        captured = fxdisag.capture(model, example_batch(model, 2, 8))
        program = split_stages(insert_dispatch(captured.graph_module, captured.layout, [0, 0, 1, 1], 2,
                                               shared_slots=[1]))
        self.assertExpectedInline("\n".join(program.describe().splitlines()[1::2]), """\
  boundary 0 (model.layers.0.mlp.experts + shared experts model.layers.0.mlp.shared_expert): send xs_0, ids_0, ws_0 -> receive ys_0
  boundary 1 (model.layers.1.mlp.experts + shared experts model.layers.1.mlp.shared_expert): send xs_1, ids_1, ws_1 -> receive ys_1""")
        # the routing every token carries: its top_k slots and the shared experts' (id E = 4, last)
        index, weights = torch.tensor([[1, 3], [0, 2]]), torch.tensor([[0.625, 0.375], [0.5, 0.5]])
        from fxdisag.runtime.dispatch import with_shared

        got_index, got_weights = with_shared(index, weights, torch.tensor([[0.25], [0.75]]), 4)
        self.assertEqual(got_index.tolist(), [[1, 3, 4], [0, 2, 4]])
        self.assertEqual(got_weights.tolist(), [[0.625, 0.375, 0.25], [0.5, 0.5, 0.75]])
        self.assertEqual(with_shared(index, weights, None, 4)[1][:, 2].tolist(), [1.0, 1.0])
        # a copy per expert-rank slot: the token's on the slot of its first routed expert (E + slot)
        owner = (0, 0, 1, 1)
        self.assertEqual(with_shared(index, weights, None, 4, owner)[0][:, 2].tolist(), [4 + 0, 4 + 0])
        self.assertEqual(with_shared(torch.tensor([[3, 0]]), weights[:1], None, 4, owner)[0].tolist(), [[3, 0, 5]])

    def test_refuses_what_it_cannot_move(self):
        from fxdisag.codegen.insert_dispatch import movable_shared_experts

        model = tiny_model("qwen3_moe")
        captured = fxdisag.capture(model, example_batch(model, 1, 4))
        with self.assertRaisesRegex(ValueError, "has no shared experts: there is nothing to place"):
            insert_dispatch(captured.graph_module, captured.layout, [0, 0, 1, 1], 2, shared_slots=[0])
        model = tiny_model("qwen2_moe")
        captured = fxdisag.capture(model, example_batch(model, 1, 4))
        gm = captured.graph_module
        self.assertEqual(movable_shared_experts(gm, captured.layout),
                         {0: "model.layers.0.mlp.shared_expert", 1: "model.layers.1.mlp.shared_expert"})
        call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "model.layers.1.mlp.shared_expert")
        with gm.graph.inserting_after(call):
            gm.graph.call_function(torch.neg, (call,))  # a second use of the shared output
        found = movable_shared_experts(gm, captured.layout)
        self.assertIsInstance(found[1], ValueError)
        self.assertRegex(str(found[1]), r"MoE layer 1 \(model.layers.1.mlp\): shared experts "
                                        r"'model.layers.1.mlp.shared_expert' must be called once.*"
                                        r"keep its shared experts on the attention group")
        with self.assertRaisesRegex(ValueError, "MoE layer 1 .* must be called once"):
            insert_dispatch(gm, captured.layout, [0, 0, 1, 1], 2, shared_slots=[0])
