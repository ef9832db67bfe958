"""The benchmark's peers (benchmarks/peers.py: DDP and FSDP2 on the whole HF model) train
exactly like eager on the global batch, so the benchmark compares like with like, and
report the bytes gloo really sends.

One job of 2 gloo ranks per peer kind, against the same model trained eagerly in one
process on the same global batches (uneven label masking, so the shards carry different
token counts):

* the loss of every step (3 SGD steps) within 1e-5 of eager's, the same on both ranks;
  every gradient of step 0 (FSDP2: ``DTensor.full_tensor``) within 1e-4 relative;
* ``step_sent_bytes()`` of steps 1 and 2 against the bytes the rank's process really
  wrote to its sockets during ``peer(**batch)`` + ``backward()`` (``/proc/self/io``
  ``wchar``; at 2 ranks all of a rank's collective bytes go to the other one): at least
  the reported figure, at most 1% + 16 KiB more (gloo's headers, the loss all-reduce).
  Step 0 is left out (DDP's one-off bucket rebuild, lazy initialisation);
* the figures themselves at 2 ranks: DDP one all-reduce of the gradients (= P, all
  parameter bytes), FSDP2 2 P - P_root / 2 (two all-gathers but the root's, gloo's
  reduce-scatter a full all-reduce) within dim-0 padding;
* ``step_spans()``: F, B, R per rank in that order; a batch that does not split over the
  ranks is a ValueError; ``shard_compute_seconds`` is the same positive figure on both ranks.
"""

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


def _wchar() -> int:
    """Bytes this process (every thread) has passed to write-type system calls so far."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line")


def _train(rank: int, world: int, kind: str, family: str) -> dict:
    import torch.distributed as dist

    import peers
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model(family, seed=0)
    reference = copy.deepcopy(model)
    batches = [example_batch(model, 4, 12, seed=s) for s in range(STEPS)]
    for b in batches:  # uneven label counts per rank: the loss must weight shards by tokens
        b["labels"][0, 3:7] = -100
    peer = peers.build_peer(kind, model)
    try:
        peer(**{k: v[:3] for k, v in batches[0].items()})
        uneven = None
    except ValueError as e:
        uneven = str(e)
    opt = torch.optim.SGD(peer.parameters(), lr=0.1)
    losses, grads0, sent, written = [], None, [], []
    for step, batch in enumerate(batches):
        dist.barrier()
        before = _wchar()
        out = peer(**batch)
        out.loss.backward()
        after = _wchar()
        if step:
            written.append(after - before)
            sent.append(peer.step_sent_bytes())
        if step == 0:
            grads0 = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                      for n, p in peer.named_parameters()}
        losses.append(float(out.loss))
        opt.step()
        opt.zero_grad()
    spans = peer.step_spans()
    compute = peers.shard_compute_seconds(tiny_model(family, seed=0), batches[0], repeats=1)
    result = {"losses": losses, "sent": sent, "written": written, "compute": compute, "uneven": uneven}
    if rank != 0:
        return result
    ref_losses, ref_grads = train_eager(reference, batches, partial(torch.optim.SGD, lr=0.1))
    result.update({
        "ref_losses": ref_losses, "grad_err": grad_errors(grads0, ref_grads),
        "spans": [(s.rank, str(s.action), s.kind, s.start, s.end) for s in spans],
        "param_bytes": sum(p.numel() * 4 for p in reference.parameters()),
        # FSDP2's root group: what is not in a decoder layer (embeddings, final norm, LM head)
        "root_bytes": sum(p.numel() * 4 for n, p in reference.named_parameters() if not n.startswith("model.layers.")),
    })
    return result


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_peer_trains_like_eager_and_reports_the_bytes_it_sends(kind):
    out = run_distributed(_train, 2, kind, "qwen3_moe", timeout=120)
    r0 = out[0]
    assert out[1]["losses"] == pytest.approx(r0["losses"], abs=1e-7)  # the global loss on every rank
    assert len(r0["losses"]) == len(r0["ref_losses"]) == STEPS
    for got, want in zip(r0["losses"], r0["ref_losses"]):
        assert abs(got - want) <= 1e-5
    worst = max(r0["grad_err"].items(), key=lambda kv: kv[1])
    assert worst[1] <= 1e-4, worst
    assert "does not split over 2 ranks" in r0["uneven"]
    # spans: F, then B, then R (the exposed wait for the last gradient collectives), per rank
    for rank in (0, 1):
        mine = sorted((s for s in r0["spans"] if s[0] == rank), key=lambda s: s[3])
        assert [(a, k) for _, a, k, _, _ in mine] == [("F0.0", "compute"), ("B0.0", "compute"), ("R", "reduce")]
        assert all(mine[i][4] <= mine[i + 1][3] + 1e-6 for i in range(2))
    assert r0["compute"] > 0 and out[1]["compute"] == r0["compute"]
    # the figures at 2 ranks
    P, root = r0["param_bytes"], r0["root_bytes"]
    want = P if kind == "ddp" else 2 * P - root / 2
    for rank, r in enumerate(out):
        assert len(r["sent"]) == STEPS - 1
        for s in r["sent"]:
            assert set(s) == {1 - rank}
            assert want <= s[1 - rank] <= 1.01 * want, (kind, rank, s, want)
    # what each rank reports is what it wrote to its sockets
    for rank, r in enumerate(out):
        for s, wrote in zip(r["sent"], r["written"]):
            reported = sum(s.values())
            assert reported <= wrote <= 1.01 * reported + 16384, (kind, rank, reported, wrote)


def test_roofline_and_byte_formulas():
    import peers

    assert peers.ring_allreduce_bytes(1000, 1) == 0
    assert peers.ring_allreduce_bytes(1000, 2) == 1000
    assert peers.ring_allreduce_bytes(1200, 4) == 1800
    assert peers.ring_allgather_bytes(300, 4) == 900
    b = peers.roofline(0.2, {(0, 1): 50, (1, 0): 50}, [0, 1], 100.0)
    assert (b.bound, b.limiter, b.transfer, b.attention) == (0.5, "transfer", 0.5, 0.2)
    b = peers.roofline(0.7, {(0, 1): 50}, [0, 1], 100.0)
    assert (b.bound, b.limiter) == (0.7, "compute")
    with pytest.raises(ValueError, match="kind 'zero' is not one of"):
        peers.build_peer("zero", torch.nn.Linear(2, 2))
