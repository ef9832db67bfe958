"""The step runner: handler tables, and a hand-written non-GPipe schedule at parity with eager.

The interleaved schedule runs the forward and backward of two micro-batches interleaved
(micro-batch 0's backward starts before micro-batch 1's forward ends), all in the forward
call: the runner seeds the loss gradient with 1 and rescales in ``loss.backward()``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from distributed import run_distributed
from fxdisag.runtime.grads import GradSync
from fxdisag.runtime.mailbox import Mailbox
from fxdisag.runtime.runner import StepRunner
from fxdisag.schedule import Action, ActionKind, Schedule, af_pipe_schedule, validate

K = ActionKind

# 1 attention rank (0) + 1 expert rank (1), 2 MoE layers, 2 micro-batches.
_ATTENTION = ("F0.0 <C0.0 >D0.0 F0.1 <C0.1 >D0.1 F1.0 <C1.0 >D1.0 F2.0 B2.0 <GD1.0 >GC1.0 F1.1 <C1.1 >D1.1 "
              "B1.0 <GD0.0 >GC0.0 F2.1 B2.1 <GD1.1 >GC1.1 B0.0 B1.1 <GD0.1 >GC0.1 B0.1 R")
_EXPERT = ("<D0.0 <D0.1 EF0.0 >C0.0 <D1.0 EF0.1 >C0.1 EF1.0 >C1.0 <GC1.0 <D1.1 EB1.0 >GD1.0 <GC0.0 EF1.1 >C1.1 "
           "<GC1.1 EB0.0 >GD0.0 <GC0.1 EB1.1 >GD1.1 EB0.1 >GD0.1 R")


def _parse(text: str, peers: tuple[int, ...], group: tuple[int, ...]) -> list[Action]:
    """``F1.0`` / ``EB0.1`` / ``>D0.1`` / ``<GC1.0`` / ``R`` -> actions (the grid's notation)."""
    out = []
    for tok in text.split():
        if tok == "R":
            out.append(Action(K.REDUCE, -1, -1, group))
            continue
        if tok[0] in "<>":
            ch = tok[1:].rstrip("0123456789.")
            stage, mb = tok[1 + len(ch):].split(".")
            kind = K.comm("send" if tok[0] == ">" else "recv", ch)
            out.append(Action(kind, int(stage), int(mb), peers))
        else:
            name = tok.rstrip("0123456789.")
            stage, mb = tok[len(name):].split(".")
            out.append(Action(K[name], int(stage), int(mb)))
    return out


def interleaved_schedule() -> Schedule:
    attention, expert = _parse(_ATTENTION, (1,), (0,)), _parse(_EXPERT, (0,), (1,))
    return Schedule((0,), (1,), 2, 2, {0: attention, 1: expert},
                    forward_len={0: len(attention) - 1, 1: len(expert) - 1}, name="interleaved")


def test_the_interleaved_schedule_is_valid_and_defers_the_loss_gradient():
    s = interleaved_schedule()
    validate(s)
    assert s.defers_loss_grad(0) and s.defers_loss_grad(1)
    assert [str(a) for a in s.phase(0, "backward")] == ["R"]
    # it is not GPipe: a backward runs before the last forward
    acts = [str(a) for a in s.actions[0]]
    assert acts.index("B2.0") < acts.index("F2.1")
    gpipe = af_pipe_schedule([0], [1], 2, 2)
    assert not gpipe.defers_loss_grad(0)


class _Handlers:
    def __init__(self, role, kinds):
        self.role = role
        self.grad_sync = GradSync([], [])
        self._kinds = kinds

    def handlers(self):
        return {k: (lambda st, a: None) for k in self._kinds}

    def prepare(self, state, batch):
        pass


def test_runner_refuses_a_kind_registered_twice_or_of_another_role_and_names_missing_handlers():
    s = af_pipe_schedule([0], [1], 1, 1)
    runner = StepRunner(s, 0, Mailbox(torch.device("cpu")))
    with pytest.raises(ValueError, match="role A"):
        runner.register(_Handlers("E", [K.EF]))
    runner.register(_Handlers("A", [K.F, K.SEND_D]))
    with pytest.raises(ValueError, match="F already has a handler"):
        runner.register(_Handlers("A", [K.F]))
    with pytest.raises(ValueError, match=r"no handler for action kinds \['B', 'RECV_C', 'RECV_GD', 'SEND_GC'\]"):
        runner.check_complete()
    with pytest.raises(ValueError, match="RECV_D, a kind of role E"):
        runner.register(_Handlers("A", [K.RECV_D]))


def _interleaved(rank: int, world: int, recompute: bool) -> dict:
    import fxdisag
    from fxdisag.planner.plan import Plan
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model("qwen3_moe", seed=0)
    reference = copy.deepcopy(model)
    batches = [example_batch(model, 4, 12, seed=s) for s in range(3)]
    plan = Plan.manual(1, 1, 8, 2)
    if recompute:
        plan.recompute = {"attention": True, "experts": True}
    dmodel = fxdisag.disaggregate(model, batches[0], plan, schedule=interleaved_schedule())
    calls = []  # forward calls of a stage / of an experts module (a recomputed one runs twice)
    module = dmodel.stages[1] if dmodel.has_attention else dmodel.local_experts[0]
    module.register_forward_pre_hook(lambda *_: calls.append(1))  # recompute may stop early
    # step 0: plain backward; step 1: accumulate with the loss scaled by 2 (the runner rescales)
    losses = []
    out = dmodel(**batches[0])
    out.loss.backward()
    losses.append(float(out.loss))
    calls_per_step = len(calls)
    out = dmodel(**batches[1])
    (2 * out.loss).backward()
    losses.append(float(out.loss))
    grads = dmodel.consolidated_grads()
    with torch.no_grad():
        no_grad_loss = float(dmodel(**batches[2]).loss)
    if rank != 0:
        return {"calls": calls_per_step}
    ref = []
    for k, b in enumerate(batches[:2]):
        loss = reference(**b, use_cache=False).loss
        (loss * (k + 1)).backward()
        ref.append(float(loss))
    with torch.no_grad():
        ref_no_grad = float(reference(**batches[2], use_cache=False).loss)
    err = {n: float((grads[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-30))
           for n, p in reference.named_parameters()}
    return {"losses": losses, "ref": ref, "err": err, "no_grad": (no_grad_loss, ref_no_grad),
            "calls": calls_per_step}


@pytest.mark.dist
@pytest.mark.parametrize("recompute", [False, True], ids=["plain", "recompute"])
def test_interleaved_schedule_trains_like_eager(recompute):
    results = run_distributed(_interleaved, 2, recompute, timeout=180)
    r0 = results[0]
    # 2 micro-batches: each module runs once per micro-batch, twice when recomputed
    assert [r["calls"] for r in results] == [4 if recompute else 2] * 2
    for a, b in zip(r0["losses"], r0["ref"]):
        assert abs(a - b) <= 1e-5, (a, b)
    worst = max(r0["err"], key=r0["err"].get)
    assert r0["err"][worst] <= 1e-4, (worst, r0["err"][worst])
    a, b = r0["no_grad"]
    assert abs(a - b) <= 1e-5
