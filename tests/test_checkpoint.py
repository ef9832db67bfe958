"""Checkpoints (``fxdisag.save`` / ``load`` / ``export_hf``), multi-process, gloo, hard timeouts.

* resume: 3 steps, save, load in fresh processes (other initial weights, an empty
  optimizer), 3 more steps: the losses equal those of 6 uninterrupted steps (<= 1e-5);
* atomic: a re-save at the same path where rank 1 dies half-way through writing its
  shards: rank 0 fails (no hang), the previous checkpoint still loads (the resume above
  starts from it), and neither the partial directory nor a path never committed does;
* export_hf: the resumed model's directory loads with ``from_pretrained``, no missing or
  unexpected keys, parameters equal to ``consolidated_state_dict()``;
* reshard: a checkpoint of 1A+2E (non-contiguous placement, two experts replicated, a
  list of optimizers with different learning rates) loads into 2A+2E: consolidated
  weights, exp_avg of an attention and an expert tensor and the learning rates equal the
  saved ones; one optimizer over parameters saved with two learning rates is refused;
* p = 1 into p = 2: a checkpoint of a 1A+1E pipeline loads into a 2-group pipeline built
  on meta (other seeded weights): the weights equal the saved ones and the next step's
  loss equals the p = 1 run's;
* shared experts: saved from their expert host (``Plan.shared_expert_ranks``), weights and
  Adam state load into a plan that runs them on the attention group, and the next step's
  loss equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil

import pytest
import torch

from distributed import DistributedTestError, run_distributed

LR = 1e-2
# When rank 1 dies, wait this long for rank 0's own error before the harness kills it.
_GRACE = {"grace": 20.0} if "grace" in inspect.signature(run_distributed).parameters else {}


def _build(family: str, plan, seed: int, steps: int):
    import fxdisag
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model(family, seed=seed)
    batches = [example_batch(model, 8, 12, seed=s) for s in range(steps)]
    return fxdisag.disaggregate(model, batches[0], plan), batches


def _train(dmodel, opts, batches) -> list[float]:
    losses = []
    for batch in batches:
        out = dmodel(**batch)
        out.loss.backward()
        losses.append(float(out.loss.detach()))
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return losses


def _plan(n_attn: int, n_exp: int, num_experts: int):
    from fxdisag.planner.plan import Plan

    return Plan.manual(num_attention=n_attn, num_expert=n_exp, num_experts=num_experts, num_microbatches=2)


# ---- one 2-rank story: resume, a killed re-save, export (two launches, shared by three tests)
FAMILY = "deepseek_v3"  # a dense layer, shared experts, a persistent buffer (e_score_correction_bias)


def _die_half_way(original):
    def write_data(self, plan, planner):
        # Write half of this rank's items, then die as a killed process would (no cleanup).
        original(self, dataclasses.replace(plan, items=plan.items[: len(plan.items) // 2]), planner).wait()
        os._exit(1)

    return write_data


def _first_life(rank: int, world: int, path: str, out: str) -> None:
    import fxdisag
    from torch.distributed.checkpoint import FileSystemWriter

    dmodel, batches = _build(FAMILY, _plan(1, 1, 8), seed=0, steps=6)
    opt = torch.optim.AdamW(dmodel.parameters(), lr=LR)
    losses = _train(dmodel, [opt], batches[:3])
    fxdisag.save(dmodel, opt, path, step=3)
    saved = dmodel.consolidated_state_dict()
    losses += _train(dmodel, [opt], batches[3:])  # the uninterrupted run goes on
    if rank == 0:  # this launch ends in a failure: results go through a file
        torch.save({"losses": losses, "saved": saved}, out)
    # Re-save at the same path; rank 1 dies half-way through writing its shards.
    if rank == 1:
        FileSystemWriter.write_data = _die_half_way(FileSystemWriter.write_data)
    try:
        fxdisag.save(dmodel, opt, path, step=6)
    except fxdisag.CheckpointError as e:
        with open(out + ".error", "w") as f:  # the survivor failed (rather than hung): the parent checks
            f.write(str(e))
        raise


def _second_life(rank: int, world: int, path: str, partial: str, fresh: str, export: str) -> dict:
    import fxdisag

    # Other initial weights and an optimizer with no state: everything must come from the checkpoint.
    dmodel, batches = _build(FAMILY, _plan(1, 1, 8), seed=1, steps=6)
    opt = torch.optim.AdamW(dmodel.parameters(), lr=LR)
    errors = {}
    for name, p in (("partial", partial), ("fresh", fresh)):
        try:
            fxdisag.load(dmodel, opt, p)
        except fxdisag.CheckpointError as e:
            errors[name] = str(e)
    fxdisag.load(dmodel, None, path)  # weights only, from a checkpoint with optimizer state
    weights_only = dmodel.consolidated_state_dict()
    manifest = fxdisag.load(dmodel, opt, path)
    loaded = dmodel.consolidated_state_dict()
    losses = _train(dmodel, [opt], batches[3:])
    fxdisag.export_hf(dmodel, export)
    fxdisag.save(dmodel, None, export + "-weights")  # weights only: refused with an optimizer
    try:
        fxdisag.load(dmodel, opt, export + "-weights")
    except fxdisag.CheckpointError as e:
        errors["weights"] = str(e)
    return {"losses": losses, "loaded": loaded, "weights_only": weights_only, "step": manifest["step"], "errors": errors,
            "final": dmodel.consolidated_state_dict(), "exported": os.path.isdir(export)}


@pytest.fixture(scope="module")
def lives(tmp_path_factory):
    from fxdisag.checkpoint import _partial

    tmp = tmp_path_factory.mktemp("ckpt")
    path, out, export = str(tmp / "ckpt"), str(tmp / "first.pt"), str(tmp / "hf")
    try:
        run_distributed(_first_life, 2, path, out, timeout=110, **_GRACE)
        failure = None
    except DistributedTestError as e:
        failure = str(e)
    partial = _partial(path)
    fresh = str(tmp / "fresh")  # never committed, with a dead save's partial sibling
    if os.path.isdir(partial):
        shutil.copytree(partial, _partial(fresh))
    second = run_distributed(_second_life, 2, path, partial, fresh, export, timeout=110)
    error = open(out + ".error").read() if os.path.exists(out + ".error") else None
    return {"first": torch.load(out), "failure": failure, "error": error, "partial": partial,
            "second": second, "export": export}


@pytest.mark.dist
def test_resume_matches_uninterrupted(lives):
    first, second = lives["first"], lives["second"]
    assert second[0]["step"] == 3
    saved, loaded = first["saved"], second[0]["loaded"]
    assert sorted(saved) == sorted(loaded)
    for got in (loaded, second[0]["weights_only"]):
        assert all(torch.equal(saved[n], got[n]) for n in saved), [n for n in saved if not torch.equal(saved[n], got[n])]
    want, got = first["losses"][3:], second[0]["losses"]
    diff = max(abs(a - b) for a, b in zip(want, got))
    print(f"resume: uninterrupted {want}, resumed {got}, max |diff| {diff:.3g}")
    assert diff <= 1e-5, (want, got)
    assert second[1]["losses"] == second[0]["losses"]  # the loss is global: identical on every rank


@pytest.mark.dist
def test_killed_save_keeps_previous_checkpoint(lives):
    assert lives["failure"] is not None and "rank 1 exited with code 1" in lives["failure"], lives["failure"]
    assert lives["error"] is not None, f"rank 0 did not fail after rank 1 died (hung until killed?): {lives['failure']}"
    assert "failed on rank 0" in lives["error"] and "untouched" in lives["error"]
    partial = lives["partial"]
    assert os.path.isdir(partial) and not os.path.exists(os.path.join(partial, "fxdisag.json"))
    errors = lives["second"][0]["errors"]
    assert "incomplete" in errors.get("partial", "") and "incomplete" in errors.get("fresh", ""), errors
    assert "weights only" in errors.get("weights", ""), errors
    print(f"killed save: rank 0 said {lives['error'][:160]!r}...; "
          f"loading the partial directory: {errors['partial'][:120]!r}...")
    assert lives["second"][0]["step"] == 3  # the previous checkpoint, loaded (its values: the resume test)


@pytest.mark.dist
def test_export_hf_loads_with_from_pretrained(lives):
    from transformers import AutoModelForCausalLM

    assert all(r["exported"] for r in lives["second"])
    final = lives["second"][0]["final"]
    hf, info = AutoModelForCausalLM.from_pretrained(lives["export"], output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected, mismatched keys
    params = dict(hf.named_parameters())
    assert sorted(params) == sorted(final)
    wrong = [n for n in final if not torch.equal(params[n], final[n])]
    assert not wrong, wrong


# ---- reshard
FAMILY_RESHARD = "mixtral"
ATTN_NAME = "model.layers.0.self_attn.q_proj.weight"
EXPERT_NAME = "model.layers.1.mlp.experts.gate_up_proj"
# Expert ranks 1 and 2: rank 1 non-contiguous ids (0, 2, 3), experts 2 and 3 on both.
PLACEMENT = [[1], [2], [1, 2], [2, 1]]
# Loaded into expert ranks 2 and 3: rank 3 non-contiguous (0, 2, 3), expert 2 on both.
PLACEMENT_4 = [[3], [2], [2, 3], [3]]


def _exp_avg(dmodel, opts, name: str):
    """(expert ids or None, this rank's exp_avg of ``name``, lr of its group), or None."""
    for n, p, ids, rows in dmodel.named_local_tensors():
        if n != name:
            continue
        for o in opts:
            for g in o.param_groups:
                if any(q is p for q in g["params"]):
                    return ids, o.state[p]["exp_avg"].detach()[rows].clone(), g["lr"]
    return None


def _lrs(opts) -> dict[int, float]:
    """id(parameter) -> the learning rate of its param group."""
    return {id(p): g["lr"] for o in opts for g in o.param_groups for p in g["params"]}


def _full(pieces, shape):
    out = torch.full(shape, float("nan"))
    for piece in pieces:
        if piece is not None:
            ids, t, _ = piece
            if ids is None:
                return t
            out[list(ids)] = t
    return out


def _reshard_save(rank: int, world: int, path: str) -> dict:
    import fxdisag

    plan = dataclasses.replace(_plan(1, 2, 4), expert_placement=PLACEMENT)
    dmodel, batches = _build(FAMILY_RESHARD, plan, seed=0, steps=2)
    # A list of optimizers, as users build one per param group; the second half of the
    # attention side at another learning rate.
    attn = dmodel.attention_parameters()
    opts = [torch.optim.AdamW(attn[: len(attn) // 2], lr=LR), torch.optim.AdamW(attn[len(attn) // 2:], lr=LR / 2)] \
        if dmodel.has_attention else [torch.optim.AdamW(dmodel.expert_parameters(), lr=LR)]
    _train(dmodel, opts, batches)
    fxdisag.save(dmodel, opts, path, step=2)
    lrs = _lrs(opts)
    return {"state": dmodel.consolidated_state_dict(), "ids": dmodel.expert_ids if dmodel.has_experts else None,
            "attn": _exp_avg(dmodel, opts, ATTN_NAME), "expert": _exp_avg(dmodel, opts, EXPERT_NAME),
            "lrs": {n: lrs[id(p)] for n, p, _, _ in dmodel.named_local_tensors() if id(p) in lrs}}


def _reshard_load(rank: int, world: int, path: str) -> dict:
    import fxdisag

    dmodel, _ = _build(FAMILY_RESHARD, dataclasses.replace(_plan(2, 2, 4), expert_placement=PLACEMENT_4),
                       seed=1, steps=1)
    # One optimizer cannot hold the two saved learning rates in one group: refused, on every rank.
    try:
        fxdisag.load(dmodel, torch.optim.AdamW(dmodel.parameters(), lr=1e-3), path)
        conflict = None
    except fxdisag.CheckpointError as e:
        conflict = str(e)
    # The saved split, another lr and no state yet: all restored. Expert ranks: another
    # number of optimizers than at save (one per tensor kind).
    attn, experts = dmodel.attention_parameters(), dmodel.expert_parameters()
    opts = [torch.optim.AdamW(attn[: len(attn) // 2], lr=1e-3), torch.optim.AdamW(attn[len(attn) // 2:], lr=1e-3)] \
        if dmodel.has_attention else [torch.optim.AdamW(experts[:1], lr=1e-3), torch.optim.AdamW(experts[1:], lr=1e-3)]
    manifest = fxdisag.load(dmodel, opts, path)
    lrs = _lrs(opts)
    return {"state": dmodel.consolidated_state_dict(), "ids": dmodel.expert_ids if dmodel.has_experts else None,
            "attn": _exp_avg(dmodel, opts, ATTN_NAME), "expert": _exp_avg(dmodel, opts, EXPERT_NAME),
            "conflict": conflict, "layout": manifest["layout"],
            "lrs": {n: lrs[id(p)] for n, p, _, _ in dmodel.named_local_tensors() if id(p) in lrs}}


@pytest.mark.dist
def test_reshard_1a2e_into_2a2e(tmp_path):
    path = str(tmp_path / "ckpt")
    before = run_distributed(_reshard_save, 3, path, timeout=110)
    assert before[1]["ids"] == [0, 2, 3] and before[2]["ids"] == [1, 2, 3]  # the layout under test
    after = run_distributed(_reshard_load, 4, path, timeout=120)
    assert after[0]["layout"]["expert_placement"] == PLACEMENT
    assert after[2]["ids"] == [1, 2] and after[3]["ids"] == [0, 2, 3]
    assert all("build the param groups as when saved" in (r["conflict"] or "") for r in after), after[3]["conflict"]
    saved, loaded = before[0]["state"], after[0]["state"]
    assert sorted(saved) == sorted(loaded)
    wrong = [n for n in saved if not torch.equal(saved[n], loaded[n])]
    assert not wrong, wrong
    # Optimizer state: the attention tensor on both replicas, the expert tensor over its shards.
    assert torch.equal(after[0]["attn"][1], before[0]["attn"][1]) and torch.equal(after[1]["attn"][1], before[0]["attn"][1])
    shape = saved[EXPERT_NAME].shape
    want = _full([r["expert"] for r in before], shape)
    assert not want.isnan().any() and want.abs().sum() > 0
    for r in after[2:]:  # each replica of expert 2 holds it
        ids, rows, _ = r["expert"]
        assert torch.equal(rows, want[list(ids)]), ids
    # Per-parameter learning rates of the saved optimizer list, in the loaded ones.
    saved_lrs = {n: lr for r in before for n, lr in r["lrs"].items()}
    for r in after:
        for n, lr in r["lrs"].items():
            assert lr == saved_lrs[n], (n, lr, saved_lrs[n])
    assert {LR, LR / 2} <= set(saved_lrs.values())
    print(f"reshard: {len(saved)} tensors equal after 1A+2E -> 2A+2E; exp_avg of {ATTN_NAME} and {EXPERT_NAME} equal")


# ---- p = 1 into p = 2, loaded into a model built on meta
FAMILY_DEPTH = "qwen3_moe"
LAYERS_DEPTH = 3  # an odd number of MoE layers per group


def _depth_batches(config, steps: int):
    from fxdisag.testing.models import example_batch

    return [example_batch(config, 8, 12, seed=s) for s in range(steps)]


def _depth_save(rank: int, world: int, path: str) -> dict:
    import fxdisag

    dmodel = _build_layers(FAMILY_DEPTH, _plan(1, 1, 8), LAYERS_DEPTH)
    batches = _depth_batches(dmodel._model.config, 3)
    opt = torch.optim.AdamW(dmodel.parameters(), lr=LR)
    _train(dmodel, [opt], batches[:2])
    fxdisag.save(dmodel, opt, path, step=2)
    saved = dmodel.consolidated_state_dict()
    return {"state": saved, "next": _train(dmodel, [opt], batches[2:])}


def _build_layers(family: str, plan, layers: int):
    import fxdisag
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model(family, seed=0, num_layers=layers)
    return fxdisag.disaggregate(model, example_batch(model, 8, 12, seed=0), plan)


def _depth_load(rank: int, world: int, path: str) -> dict:
    import fxdisag
    from fxdisag.planner.plan import Plan
    from fxdisag.testing.models import tiny_config
    from transformers import AutoModelForCausalLM

    config = tiny_config(FAMILY_DEPTH, num_layers=LAYERS_DEPTH)
    with torch.device("meta"):  # fresh processes build only their own part (seeded), then load
        model = AutoModelForCausalLM.from_config(config)
    batches = _depth_batches(config, 3)
    plan = Plan.manual(1, 1, 8, 2, pipeline_depth=2)
    dmodel = fxdisag.disaggregate(model, batches[0], plan, seed=5)
    opt = torch.optim.AdamW(dmodel.parameters(), lr=LR)
    manifest = fxdisag.load(dmodel, opt, path)
    return {"state": dmodel.consolidated_state_dict(), "next": _train(dmodel, [opt], batches[2:]),
            "layout": manifest["layout"], "layers": dmodel.expert_layers if dmodel.has_experts else None}


@pytest.mark.dist
def test_p1_checkpoint_loads_into_p2_built_on_meta(tmp_path):
    path = str(tmp_path / "ckpt")
    before = run_distributed(_depth_save, 2, path, timeout=110)
    after = run_distributed(_depth_load, 4, path, timeout=150)
    assert after[0]["layout"]["world_size"] == 2 and after[1]["layers"] != after[3]["layers"]  # p = 2 under test
    saved, loaded = before[0]["state"], after[0]["state"]
    assert sorted(saved) == sorted(loaded)
    wrong = [n for n in saved if not torch.equal(saved[n], loaded[n])]
    assert not wrong, wrong
    # The step after the load, on the p = 2 pipeline, is the p = 1 run's next step: weights
    # and AdamW state (moments, step count) all came through.
    assert abs(after[0]["next"][0] - before[0]["next"][0]) <= 1e-5, (after[0]["next"], before[0]["next"])
    print(f"p=1 -> p=2: {len(saved)} tensors equal; next loss {after[0]['next'][0]} vs {before[0]['next'][0]}")


# ---- shared experts saved from their expert host, loaded where the attention ranks run them
SHARED_NAME = "model.layers.1.mlp.shared_expert.down_proj.weight"


def _shared_save(rank: int, world: int, path: str) -> dict:
    import fxdisag

    plan = dataclasses.replace(_plan(1, 2, 4), shared_expert_ranks=[2])
    dmodel, batches = _build("qwen2_moe", plan, seed=0, steps=3)
    opts = [torch.optim.AdamW(dmodel.parameters(), lr=LR)]
    _train(dmodel, opts, batches[:2])
    fxdisag.save(dmodel, opts, path, step=2)
    saved = {"state": dmodel.consolidated_state_dict(), "shared": _exp_avg(dmodel, opts, SHARED_NAME)}
    return {**saved, "next_loss": _train(dmodel, opts, batches[2:])[0]}  # the uninterrupted run's step 3


def _shared_load(rank: int, world: int, path: str) -> dict:
    import fxdisag

    dmodel, batches = _build("qwen2_moe", _plan(1, 2, 4), seed=1, steps=3)
    opts = [torch.optim.AdamW(dmodel.parameters(), lr=LR)]
    fxdisag.load(dmodel, opts, path)
    state = dmodel.consolidated_state_dict()
    shared = _exp_avg(dmodel, opts, SHARED_NAME)
    return {"state": state, "shared": shared, "loss": _train(dmodel, opts, batches[2:])[0]}


@pytest.mark.dist
def test_shared_experts_hosted_on_an_expert_rank_save_and_load(tmp_path):
    """The host's shared experts (weights and Adam state) reach the checkpoint, and load into
    a plan that runs them on the attention group; the next step's loss is the one of an
    uninterrupted run."""
    path = str(tmp_path / "ckpt")
    before = run_distributed(_shared_save, 3, path, timeout=120)
    assert before[0]["shared"] is None and before[1]["shared"] is None  # only the host holds them
    ids, saved_avg, _ = before[2]["shared"]
    assert ids is None and saved_avg.abs().sum() > 0
    after = run_distributed(_shared_load, 3, path, timeout=120)
    saved, loaded = before[0]["state"], after[0]["state"]
    wrong = [n for n in saved if not torch.equal(saved[n], loaded[n])]
    assert sorted(saved) == sorted(loaded) and not wrong, wrong
    assert after[0]["shared"] is not None and torch.equal(after[0]["shared"][1], saved_avg)
    assert abs(after[0]["loss"] - before[0]["next_loss"]) <= 1e-5
