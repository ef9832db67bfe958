"""The benchmark's peers (benchmarks/peers.py: DDP and FSDP2 on the whole HF model) train
exactly like eager on the global batch, so the benchmark compares like with like."""

from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from eager import grad_errors, train_eager

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

STEPS = 3


def _train(rank: int, world: int, kind: str, family: str) -> dict:
    import peers
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model(family, seed=0)
    reference = copy.deepcopy(model)
    names = [n for n, _ in model.named_parameters()]
    batches = [example_batch(model, 4, 12, seed=s) for s in range(STEPS)]
    for b in batches:  # uneven label counts per rank: the loss must weight shards by tokens
        b["labels"][0, 3:7] = -100
    peer = peers.build_peer(kind, model)
    opt = torch.optim.SGD(peer.parameters(), lr=0.1)
    losses, grads0 = [], None
    for step, batch in enumerate(batches):
        out = peer(**batch)
        out.loss.backward()
        if step == 0:
            grads0 = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                      for n, p in zip(names, peer.parameters())}
        losses.append(float(out.loss))
        opt.step()
        opt.zero_grad()
    spans = peer.step_spans()
    sent = peer.step_sent_bytes()
    if rank != 0:
        return {"losses": losses}
    ref_losses, ref_grads = train_eager(reference, batches, partial(torch.optim.SGD, lr=0.1))
    err = grad_errors(grads0, ref_grads)
    return {"losses": losses, "ref_losses": ref_losses, "grad_err": err, "spans": [(s.rank, str(s.action)) for s in spans],
            "sent": sent, "param_bytes": sum(p.numel() * 4 for p in reference.parameters())}


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_peer_trains_like_eager(kind):
    out = run_distributed(_train, 2, kind, "qwen3_moe", timeout=120)
    r0 = out[0]
    assert out[1]["losses"] == pytest.approx(r0["losses"], abs=1e-7)  # the global loss on every rank
    for got, want in zip(r0["losses"], r0["ref_losses"]):
        assert abs(got - want) <= 1e-5
    worst = max(r0["grad_err"].items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-4, worst
    assert sorted(r0["spans"]) == [(0, "B0.0"), (0, "F0.0"), (1, "B0.0"), (1, "F0.0")]
    factor = 2.0 if kind == "ddp" else 3.0
    assert r0["sent"] == {1: int(factor * 0.5 * r0["param_bytes"])}
