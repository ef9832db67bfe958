"""The pipeline hop: which values cross a cut, and their message codec."""

import pytest
import torch

from fxdisag.runtime import hop
from fxdisag.testing.models import example_batch, tiny_model


def _program(family="qwen3_moe"):
    import fxdisag
    from fxdisag.codegen.insert_dispatch import insert_dispatch
    from fxdisag.codegen.split_stages import split_stages

    model = tiny_model(family, seed=0)
    batch = example_batch(model, 2, 8)
    captured = fxdisag.capture(model, batch)
    E = captured.layout.moe[0].num_experts
    return split_stages(insert_dispatch(captured.graph_module, captured.layout, [0] * E, 1)), model


def test_hop_values_are_exactly_what_later_stages_read():
    program, _ = _program()
    cuts = hop.hop_values(program)
    assert len(cuts) == len(program.boundaries)
    produced = {}
    for st in program.stages:
        for n in st.outputs:
            produced.setdefault(n, st.index)
    ys = {b.ys for b in program.boundaries}
    for s, names in enumerate(cuts):
        want = {n for later in program.stages[s + 1:] for n in later.inputs
                if n not in ys and produced.get(n, s + 1) <= s}
        assert set(names) == want and len(names) == len(want)
        assert not set(names) & set(program.inputs)
    # the residual stream crosses every cut: stage s+1 reads something stage s made
    for s, names in enumerate(cuts):
        assert set(names) & set(program.stages[s].outputs) & set(program.stages[s + 1].inputs)


def test_encode_decode_round_trip():
    a = torch.randn(2, 3, requires_grad=True) * 2  # a non-leaf that needs a gradient
    values = {"h": a, "rot": (torch.randn(4), torch.arange(3)), "n": 7, "none": None,
              "mask": torch.ones(2, 2, dtype=torch.bool)}
    payload, grad_layout = hop.encode(values)
    assert payload.dtype == torch.uint8
    out, got_layout = hop.decode(payload)
    assert grad_layout == got_layout == [("h", (2, 3), torch.float32)]
    assert torch.equal(out["h"], a.detach()) and out["h"].requires_grad and out["h"].is_leaf
    assert torch.equal(out["rot"][0], values["rot"][0]) and torch.equal(out["rot"][1], values["rot"][1])
    assert isinstance(out["rot"], tuple) and out["n"] == 7 and out["none"] is None
    assert out["mask"].dtype == torch.bool and not out["rot"][0].requires_grad


def test_a_container_holding_a_grad_tensor_is_refused_by_name():
    t = torch.randn(2, requires_grad=True)
    with pytest.raises(NotImplementedError, match="'pair' crosses a pipeline hop as a tuple"):
        hop.encode({"pair": (t, t)})


def test_tied_embeddings_across_groups_are_refused_by_name():
    """The input embedding (stage 0) and the tied head (stage J) would sit on different
    attention groups at p = 2: their summed gradient is not built, so the error names them."""
    import fxdisag
    from transformers import AutoModelForCausalLM

    from fxdisag.api import _check_parameters_stay_in_group
    from fxdisag.codegen.insert_dispatch import insert_dispatch
    from fxdisag.codegen.split_stages import split_stages
    from fxdisag.planner.plan import Plan
    from fxdisag.testing.models import tiny_config

    config = tiny_config("qwen3_moe", num_layers=2)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    captured = fxdisag.capture(model, example_batch(model, 2, 8))
    E = captured.layout.moe[0].num_experts
    program = split_stages(insert_dispatch(captured.graph_module, captured.layout, [0] * E, 1))
    split = Plan.manual(num_attention=1, num_expert=1, num_experts=E, num_microbatches=2, pipeline_depth=2,
                        loss_group=1)
    with pytest.raises(NotImplementedError, match=r"embed_tokens.*different attention groups.*tie_word_embeddings"):
        _check_parameters_stay_in_group(program, split.schedule(2))
    # round robin over 2 MoE layers puts the head (stage 2) back on group 0: accepted
    together = Plan.manual(num_attention=1, num_expert=1, num_experts=E, num_microbatches=2, pipeline_depth=2)
    assert together.schedule(2).stages.stage_group == (0, 1, 0)
    _check_parameters_stay_in_group(program, together.schedule(2))


@pytest.mark.parametrize("family, ranks", [("qwen2_moe", 1), ("deepseek_v3", 2)])
def test_modelled_hop_bytes_are_what_the_program_sends(family, ranks):
    # The cost model's hop (cost_afpipe.hop_bytes_per_token: HOP_BYTES = the profile's
    # liveness on the captured graph, fake tensors, plus the combine's row -> token index per
    # message row, which the captured graph does not have) against the split program's
    # hop_values evaluated on real tensors, and against the H message encode() makes of
    # them. They agree per sequence; the program also re-sends batch-independent buffers
    # (rotary inv_freq), which the profile leaves out (constants, under 1 KiB here), and the
    # message adds its descriptor. ``ranks`` expert ranks: 2 give 1..top_k rows per token,
    # counted from the program's own row -> token index.
    import dataclasses

    import torch.fx as fx
    from torch.utils._pytree import tree_leaves

    import fxdisag
    from fxdisag.codegen.insert_dispatch import insert_dispatch
    from fxdisag.codegen.split_stages import split_stages
    from fxdisag.planner.cost_afpipe import hop_bytes_per_token
    from fxdisag.planner.profile import profile
    from fxdisag.planner.workload import Workload

    model = tiny_model(family, seed=0, num_layers=3)
    real, modelled, index, wire = {}, {}, {}, {}
    for b in (2, 4):
        batch = example_batch(model, b, 8)
        captured = fxdisag.capture(model, batch)
        prof = profile(captured, b, 8, torch.float32, fused_attention=False)  # eager: the mask is sent
        fused = profile(captured, 4, 8, torch.float32).hop_bytes  # fused attention: no S x S mask crosses
        work = Workload.from_profile(prof, 8)
        E = captured.layout.moe[0].num_experts
        owner = [e % ranks for e in range(E)]  # interleaved: deepseek routes within one expert group
        program = split_stages(insert_dispatch(captured.graph_module, captured.layout, owner, ranks))
        values = {}

        class Record(fx.Interpreter):
            def run_node(self, n):
                values[n.name] = out = super().run_node(n)
                return out

        Record(program.graph_module, garbage_collect_values=False).run(*(batch[k] for k in captured.input_names))
        sizes, model_sizes, rows, sent = [], [], [], []
        for s, names in enumerate(hop.hop_values(program)):
            storages = {id(t._base if t._base is not None else t): t._base if t._base is not None else t
                        for name in names for t in tree_leaves(values[name]) if isinstance(t, torch.Tensor)}
            sizes.append(sum(t.numel() * t.element_size() for t in storages.values()))
            token = [n for n in names if n.startswith("token_")]  # the combine of MoE layer s runs after the cut
            assert len(token) == 1 and values[token[0]].dtype == torch.int64
            rows.append(values[token[0]].numel())
            tokens = b * 8
            at_cut = dataclasses.replace(work, hop_per_seq=prof.hop_bytes[s].at(8))  # this cut's, not the mean
            model_sizes.append(tokens * hop_bytes_per_token(at_cut, rows[-1] / tokens)[0])
            payload, _ = hop.encode({n: values[n] for n in names})
            descriptor = int(payload[:8].view(torch.int64).item())
            sent.append((payload.numel(), 8 + -(-descriptor // 8) * 8))
        real[b], modelled[b], index[b], wire[b] = sizes, model_sizes, rows, sent
    assert len(real[2]) == len(modelled[2]) == 2 + (family != "deepseek_v3")
    if ranks > 1:  # several rows for some tokens, not every token top_k
        assert all(b * 8 < sum(index[b]) / len(index[b]) < b * 8 * model.config.num_experts_per_tok for b in (2, 4))
    for s in range(len(real[2])):
        assert real[4][s] - real[2][s] == pytest.approx(modelled[4][s] - modelled[2][s], abs=1e-6)
        for b in (2, 4):
            assert 0 <= real[b][s] - modelled[b][s] < 1024
            size, header = wire[b][s]  # the message: header + descriptor, then the tensors 8-byte aligned
            assert 0 <= size - header - modelled[b][s] < 1024 + 8 * 16
    assert real[2][0] > 2 * 8 * 64 * 4  # at least the residual stream, B x S x H fp32
    assert all(f.quadratic == 0 and f.linear == c.linear for f, c in zip(fused, prof.hop_bytes))
