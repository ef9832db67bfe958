"""Faults and bad inputs (issue #12): a hung or lost peer, different batches, a batch one rank refuses.

Every case must end with a clear error on every surviving rank, fast, never a hang:

* a SIGSTOPped rank: the others exit non-zero within ``timeout`` + a few seconds (real
  processes launched like torchrun, fxdisag initialising the process group), the error
  naming the peer and the action (point-to-point waits) or the collective;
* a SIGKILLed rank mid-step: the other fails within seconds (not the timeout), naming the
  lost peer and the action;
* a batch one rank refuses, or different batches: the same error on every rank, before
  any message, naming which ranks.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import DistributedTestError, _die_with_parent, _free_port, run_distributed
from fxdisag.runtime.faults import (PeerLostError, PeerTimeoutError, batch_digest, check_options, inputs_verdict,
                                    peer_error)
from fxdisag.runtime.mailbox import describe_tag, message_tag

REPO = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "fault_worker.py"
# What a surviving rank may take beyond the timeout, on a loaded CI host: to raise (the wait
# began after the step did), and to exit (the traceback, interpreter and process-group teardown).
RAISE_SLACK_S = 3.0
SLACK_S = 8.0


# ---- units
def test_describe_tag_inverts_message_tag():
    assert describe_tag(message_tag("C", 3, 5)) == "C layer 3, micro-batch 5"
    assert describe_tag(message_tag("H", 1, 0) + 1) == "H cut 1, micro-batch 0 (payload)"


def test_batch_digest_sees_names_shapes_dtypes_and_values():
    ids = torch.arange(12).reshape(3, 4)
    base = batch_digest({"input_ids": ids, "labels": ids})
    assert base == batch_digest({"labels": ids.clone(), "input_ids": ids.clone()})  # order-free, by value
    changed = ids.clone()
    changed[2, 3] += 1
    variants = [{"input_ids": changed, "labels": ids}, {"input_ids": ids.int(), "labels": ids},
                {"input_ids": ids.reshape(4, 3), "labels": ids}, {"input_ids": ids, "target": ids},
                {"input_ids": ids.t(), "labels": ids}]
    assert len({base, *map(batch_digest, variants)}) == 1 + len(variants)
    assert batch_digest({"x": torch.ones(2, dtype=torch.bfloat16)}) != batch_digest({"x": torch.ones(2)})


def test_inputs_verdict_names_the_ranks():
    same = ("d0", "input_ids (4, 8) int64", None, None)
    assert inputs_verdict([same, same, same]) is None
    bigger = ("d1", "input_ids (6, 8) int64", None, None)
    err = inputs_verdict([same, bigger, same, bigger])
    assert isinstance(err, ValueError)
    assert "ranks [1, 3] differ from ranks [0, 2] (different shapes or dtypes)" in str(err)
    assert "check_inputs='never'" in str(err)
    refused = (None, None, "ValueError", "input_ids has batch size 6, but ...")
    err = inputs_verdict([same, refused, refused])
    assert isinstance(err, ValueError)
    assert str(err).startswith("ranks [1, 2] refused the step's inputs: input_ids has batch size 6")


def test_options_are_checked():
    with pytest.raises(ValueError, match="timeout must be a positive"):
        check_options(0, "first")
    with pytest.raises(ValueError, match="check_inputs must be one of"):
        check_options(5.0, "sometimes")


def test_peer_errors_are_classified():
    lost = peer_error(0, [1], "no message (C layer 0, micro-batch 0)",
                      RuntimeError("[pair.cc:534] Connection closed by peer [127.0.0.1]:1234"), 0.2, 5.0)
    assert isinstance(lost, PeerLostError)
    assert str(lost).startswith("rank 0 lost rank 1 after 0.2 s (no message (C layer 0, micro-batch 0)): "
                                "[pair.cc:534] Connection closed by peer")
    hung = peer_error(0, [1], "no message (C layer 0, micro-batch 0)",
                      RuntimeError("Timed out waiting 5000ms for recv operation to complete"), 5.0, 5.0)
    assert isinstance(hung, PeerTimeoutError)
    at = hung.located(" at action 3 (recv C[0] mb0)", "GRID")
    assert str(at).startswith("rank 0 waited 5.0 s for rank 1 at action 3 (recv C[0] mb0): no message")
    assert "the peer is hung or gone (timeout=5 s: raise it with disaggregate(..., timeout=...)" in str(at)
    assert str(at).endswith("\nGRID")


# ---- a hung peer: real processes, as torchrun starts them
def _launch(tmp: Path, world: int, victim: int, timeout: float, check_inputs: str, limit: float) -> dict:
    """Start ``world`` ranks of fault_worker.py; wait (at most ``limit`` s) for every rank but
    the victim to exit; kill everything left. Per rank: exit code, exit time, stdout, stderr."""
    port = _free_port()
    procs, files = {}, {}
    env_base = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    exited: dict[int, float] = {}
    try:
        for r in range(world):
            out, err = open(tmp / f"rank{r}.out", "w"), open(tmp / f"rank{r}.err", "w")
            files[r] = (out, err)
            procs[r] = subprocess.Popen(
                [sys.executable, str(WORKER), "--timeout", str(timeout), "--victim", str(victim),
                 "--check-inputs", check_inputs],
                env={**env_base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=out, stderr=err,
                preexec_fn=_die_with_parent, cwd=REPO)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and len(exited) < world - 1:
            for r, p in procs.items():
                if r != victim and r not in exited and p.poll() is not None:
                    exited[r] = time.time()
            time.sleep(0.05)
    finally:
        for p in procs.values():  # SIGKILL also ends the SIGSTOPped victim
            if p.poll() is None:
                p.kill()
        for p in procs.values():
            p.wait(timeout=10)
        for out, err in files.values():
            out.close()
            err.close()
    return {r: {"rc": procs[r].returncode, "exited": exited.get(r), "stdout": (tmp / f"rank{r}.out").read_text(),
                "stderr": (tmp / f"rank{r}.err").read_text()} for r in procs}


def _step_start(stdout: str, rank: int, step: int) -> float:
    m = re.search(rf"fxdisag-fault-test: rank {rank} step {step} start ([\d.]+)", stdout)
    assert m, f"rank {rank} never started step {step}:\n{stdout}"
    return float(m.group(1))


@pytest.mark.dist
@pytest.mark.parametrize("world, check_inputs, waits_at", [
    (3, "first", "point-to-point"),  # the step's messages: names the hung peer and the action
    (2, "always", "collective"),  # the input check's all_gather_object on fxdisag's own group
])
def test_hung_peer_makes_every_other_rank_exit(tmp_path, world, check_inputs, waits_at):
    timeout, victim = 5.0, world - 1
    ranks = _launch(tmp_path, world, victim, timeout, check_inputs, limit=60.0)
    for r in range(world):
        if r == victim:
            continue
        got = ranks[r]
        assert got["exited"] is not None, f"rank {r} still running 60 s after start (hung):\n{got['stderr'][-3000:]}"
        assert got["rc"] != 0, f"rank {r} exited 0 beside a hung peer:\n{got['stdout']}"
        began = _step_start(got["stdout"], r, 1)
        m = re.search(rf"fxdisag-fault-test: rank {r} raised ([\d.]+)", got["stdout"])
        assert m, f"rank {r} exited without its step raising:\n{got['stdout']}\n{got['stderr'][-3000:]}"
        raised, elapsed = float(m.group(1)) - began, got["exited"] - began
        print(f"rank {r} ({waits_at}): raised {raised:.2f} s, exited rc={got['rc']} {elapsed:.2f} s after step 1 "
              f"began (timeout={timeout:g} s)")
        assert raised <= timeout + RAISE_SLACK_S, f"rank {r} took {raised:.1f} s to raise with timeout={timeout} s"
        assert elapsed <= timeout + SLACK_S, f"rank {r} took {elapsed:.1f} s to exit with timeout={timeout} s"
        assert "finished" not in got["stdout"]
        err = got["stderr"]
        assert "fxdisag.runtime.faults.Peer" in err, err[-3000:]
        if r == 0:  # the rank that waited on the victim itself: a timeout, naming it
            assert raised >= 0.9 * timeout, f"rank 0 failed after {raised:.1f} s, before the timeout: {err[-2000:]}"
            assert "PeerTimeoutError" in err
            if waits_at == "point-to-point":
                assert re.search(rf"rank 0 waited \d+\.\d s for rank {victim} at action \d+ \(.*\), grid step \d+ "
                                 r"\(marked !!\): no message \(C layer \d, micro-batch \d\); the peer is hung or gone "
                                 r"\(timeout=5 s: raise it with disaggregate\(\.\.\., timeout=\.\.\.\)", err), \
                    err[-3000:]
            else:
                assert (f"rank 0 waited 5.0 s for rank {victim}: the input check's all_gather_object of every rank's "
                        "batch hash did not complete; the peer is hung or gone (timeout=5 s") in err, err[-3000:]
        else:  # an expert rank that waited on rank 0 (itself waiting on the victim): names rank 0 and the action
            assert re.search(r"rank 1 (waited \d+\.\d s for|lost) rank 0 at action \d+ ", err), err[-3000:]
    assert ranks[victim]["rc"] == -signal.SIGKILL  # stopped until the launcher killed it
    assert "step 1 start" not in ranks[victim]["stdout"]


# ---- a killed peer, mid-step
def _killed_body(rank: int, world: int, timeout: float) -> dict:
    import fxdisag
    from fxdisag.planner.plan import Plan
    from fxdisag.schedule import ActionKind
    from fxdisag.testing.models import example_batch, tiny_model

    model = tiny_model("mixtral", seed=0)
    batches = [example_batch(model, 4, 8, seed=s) for s in range(2)]
    plan = Plan.manual(num_attention=1, num_expert=1, num_experts=fxdisag.find_layout(model).moe[0].num_experts,
                       num_microbatches=2)
    dmodel = fxdisag.disaggregate(model, batches[0], plan, timeout=timeout)
    opt = torch.optim.AdamW(dmodel.parameters(), lr=1e-2)
    for step, batch in enumerate(batches):
        if step == 1 and rank == 1:  # the expert rank dies inside its first expert computation of step 1
            def die(state, action):
                os.kill(os.getpid(), signal.SIGKILL)

            dmodel.runner._handlers[ActionKind.EF] = die
        t0 = time.monotonic()
        try:
            dmodel(**batch).loss.backward()
        except Exception as exc:
            raise RuntimeError(f"fault-test: rank {rank} failed {time.monotonic() - t0:.3f} s into step {step}") \
                from exc
        opt.step()
        opt.zero_grad()
    return {"finished": True}


@pytest.mark.dist
def test_killed_peer_fails_the_other_rank_at_once():
    timeout = 30.0  # far above what a lost connection takes to show: the failure must not wait for it
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_killed_body, 2, timeout, timeout=60, grace=15)
    tracebacks = info.value.tracebacks
    assert "exited with code -9" in tracebacks[1]
    text = tracebacks[0]
    m = re.search(r"fault-test: rank 0 failed ([\d.]+) s into step 1", text)
    assert m, text
    elapsed = float(m.group(1))
    print(f"rank 0 failed {elapsed:.2f} s into step 1 after its peer was SIGKILLed (timeout={timeout} s)")
    assert elapsed < 10.0, text
    assert "PeerLostError" in text, text
    assert re.search(r"rank 0 lost rank 1 at action \d+ \(.*\), grid step \d+ \(marked !!\) after [\d.]+ s "
                     r"\((no message \(C layer \d, micro-batch \d\)|could not post .*)\): .*The peer crashed or exited",
                     text), text


# ---- bad inputs: the same error on every rank, before any message
def _inputs_body(rank: int, world: int) -> dict:
    """Per check_inputs mode, a model and a list of attempts; rank 0 always passes the good
    batch, rank 1 the attempt's. Each attempt's outcome: ("ok", loss) or (error type, message)."""
    import fxdisag
    from fxdisag.planner.plan import Plan
    from fxdisag.testing.models import example_batch, tiny_model

    out = {}
    for mode in ("first", "always"):
        model = tiny_model("mixtral", seed=0)
        good = example_batch(model, 4, 8, seed=0)
        plan = Plan.manual(num_attention=1, num_expert=1, num_experts=fxdisag.find_layout(model).moe[0].num_experts,
                           num_microbatches=2, microbatch_size=2)
        dmodel = fxdisag.disaggregate(model, good, plan, timeout=20.0, check_inputs=mode)
        attempts = {"first": [("bad size", example_batch(model, 6, 8, seed=0)),  # 6 sequences: the plan takes 4
                              ("other values", example_batch(model, 4, 8, seed=1)),
                              ("same", good)],  # passes: the check is done from here on
                    "always": [("same", good), ("other values", example_batch(model, 4, 8, seed=1)),
                               ("missing labels", {"input_ids": good["input_ids"]}), ("same", good)]}[mode]
        results = []
        for what, batch in attempts:
            t0 = time.monotonic()
            try:
                step = dmodel(**(batch if rank == 1 else good))
            except Exception as exc:  # noqa: BLE001 - the test compares every rank's error
                results.append((what, type(exc).__name__, str(exc), time.monotonic() - t0))
                continue
            step.loss.backward()  # the pipeline's backward half: the step is complete
            results.append((what, "ok", float(step.loss.detach()), time.monotonic() - t0))
        out[mode] = results
    return out


@pytest.mark.dist
def test_bad_inputs_raise_the_same_error_on_every_rank():
    out = run_distributed(_inputs_body, 2, timeout=100)
    for mode in ("first", "always"):
        r0, r1 = out[0][mode], out[1][mode]
        assert [x[:3] for x in r0] == [x[:3] for x in r1], (mode, r0, r1)  # same outcome, type, message
        for what, kind, _, seconds in r0 + r1:
            print(f"check_inputs={mode!r}, rank 1 passes {what!r}: {kind} after {seconds:.2f} s")
            assert seconds < 10.0, f"{mode} {what}: {seconds:.1f} s (a timeout, not an agreed error)"
    (_, k1, m1, _), (_, k2, m2, _), (_, k3, loss, _) = out[0]["first"]
    assert k1 == "ValueError" and m1.startswith(
        "rank 1 refused the step's inputs: input_ids has batch size 6, but the plan binds micro-batches of 2 "
        "sequence(s): 1 attention rank(s) x 2 micro-batches x 2 = 4 sequences per call"), m1
    assert k2 == "ValueError" and m2.startswith(
        "the ranks passed different global batches: rank 1 differs from rank 0 (same shapes and dtypes, "
        "different values)"), m2
    assert k3 == "ok" and loss > 0  # the check stays on until a step passes it, then the model trains
    always = out[0]["always"]
    assert [(what, kind) for what, kind, _, _ in always] == [
        ("same", "ok"), ("other values", "ValueError"), ("missing labels", "ValueError"), ("same", "ok")], always
    assert "rank 1 differs from rank 0" in always[1][2]
    assert always[2][2].startswith("rank 1 refused the step's inputs: fxdisag trains with a loss: pass labels=")
    assert always[0][2] == always[3][2]  # the refused steps left the model as it was: same batch, same loss


# ---- the harness itself: a stopped rank is killed, not waited for
def _stop_one(rank: int, world: int) -> None:
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    raise ValueError("rank 0 gives up")


@pytest.mark.dist
def test_run_distributed_kills_a_stopped_rank():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError) as info:
        run_distributed(_stop_one, 2, timeout=30)
    assert time.monotonic() - t0 < 20.0  # the error grace, not the 30 s deadline
    assert "rank 0 gives up" in info.value.tracebacks[0]
    assert "ranks [1] had not finished and were killed" in str(info.value)
