"""The demo (examples/train.py) and its corpus helper (examples/corpus.py).

* The demo runs end-to-end under torchrun (2 ranks, 3 steps) and reports parity, the
  held-out loss, the final loss and the median step time.
* A real mismatch between the disaggregated model and its eager reference makes the demo
  return 1 on every rank (the eager reference's logits are perturbed by 1%).
* Corpus: split by file, bytes identical to the source files read directly; batches are
  windows of the corpus and depend only on the generator's seed.
* Helpers: width scaling of the config, the plan's rank layout, the relative error,
  the ASCII plot.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from expecttest import TestCase

from distributed import run_distributed

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))

import corpus  # noqa: E402
import train  # noqa: E402

SMALL = ["--steps", "3", "--batch-size", "4", "--seq-len", "32", "--num-layers", "2", "--hidden-size", "64",
         "--corpus-mb", "0.3", "--eval-batches", "1", "--quiet"]


def _run_with_timeout(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own session; on timeout kill the whole group (torchrun's workers too)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s; output:\n{out}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out)


# --------------------------------------------------------------------------- end to end


def _run_demo(nproc: int, extra: list[str], timeout: float) -> str:
    """The demo under torchrun with SMALL + ``extra``: it exits 0 and reports parity within bounds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(EXAMPLES / "train.py"), *SMALL, *extra]
    result = _run_with_timeout(cmd, timeout=timeout)
    out = result.stdout
    assert result.returncode == 0, out
    parity = re.search(r"parity vs eager: loss (\S+) vs (\S+) .*max grad rel err (\S+) .*: OK", out)
    assert parity, out
    assert abs(float(parity[1]) - float(parity[2])) <= 1e-5
    assert float(parity[3]) <= 1e-4
    heldout = re.search(r"held-out loss: (\d+\.\d+) before -> (\d+\.\d+) after 3 steps", out)
    assert heldout and float(heldout[2]) < float(heldout[1]), out
    return out


@pytest.mark.dist
def test_demo_runs_under_torchrun():
    out = _run_demo(2, [], timeout=120)
    final = re.search(r"final loss: (\d+\.\d+)", out)
    assert final, out
    # 3 steps of AdamW at lr 3e-3 from a uniform start (ln 256 = 5.545) must already help.
    assert float(final[1]) < 5.5, out
    assert re.search(r"median step time: \d+\.\d+ s", out), out
    assert "rank 1: experts 0-7" in out, out


@pytest.mark.dist
def test_demo_runs_with_pipeline_depth_2_on_4_ranks():
    # 2 layers dealt over 2 groups of 1 attention + 1 expert rank: every hop of the ring is crossed.
    out = _run_demo(4, ["--pipeline-depth", "2", "--schedule", "1f1b"], timeout=180)
    assert "pipeline depth 2" in out, out


def _main_with_skewed_reference(rank: int, world_size: int, argv: list[str]) -> int:
    """train.main where rank 0's eager reference computes logits x 1.01 (same initial weights)."""
    import train as demo

    built = []
    original = demo.build_model

    def build(config, seed):
        model = original(config, seed)
        built.append(model)
        if len(built) == 2:  # the first build is the trained model, the second parity_check's reference
            model.lm_head.register_forward_hook(lambda module, inputs, output: output * 1.01)
        return model

    demo.build_model = build
    return demo.main(argv)


@pytest.mark.dist
def test_parity_mismatch_fails_on_every_rank():
    codes = run_distributed(_main_with_skewed_reference, 2, SMALL, timeout=90)
    assert codes == [1, 1]


def test_help_lists_options():
    result = _run_with_timeout([sys.executable, str(EXAMPLES / "train.py"), "--help"], timeout=60)
    assert result.returncode == 0, result.stdout
    for option in ("--family", "--steps", "--batch-size", "--seq-len", "--microbatches", "--attention-ranks",
                   "--pipeline-depth", "--schedule", "--lr", "--seed", "--plot", "--trace", "--quiet"):
        assert option in result.stdout, option


# --------------------------------------------------------------------------- corpus


def test_corpus_is_the_stdlib_files_split_by_file():
    c = corpus.load_stdlib_corpus(max_bytes=200_000, holdout_every=3)
    root = Path(sysconfig.get_paths()["stdlib"])
    # Reference: walk the tree independently of stdlib_files().
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        if set(rel) & {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}:
            continue
        paths += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    paths.sort(key=lambda p: p.relative_to(root).as_posix())
    train_bytes, heldout_bytes, used = b"", b"", 0
    for i, path in enumerate(paths):
        if used >= 200_000:
            break
        data = path.read_bytes()[: 200_000 - used] + b"\n"
        used += len(data)
        if i % 3 == 2:
            heldout_bytes += data
        else:
            train_bytes += data
    assert bytes(c.train.tolist()) == train_bytes
    assert bytes(c.heldout.tolist()) == heldout_bytes
    assert len(c.train) + len(c.heldout) == used
    assert c.train.dtype == torch.uint8


def test_corpus_rejects_a_budget_without_heldout_file():
    with pytest.raises(ValueError, match="no held-out file"):
        corpus.load_stdlib_corpus(max_bytes=10, holdout_every=10)


def test_sample_batch_windows_come_from_the_tokens_and_the_seed():
    text = bytes(range(256)) * 4
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    a = corpus.sample_batch(tokens, 5, 16, torch.Generator().manual_seed(3))
    b = corpus.sample_batch(tokens, 5, 16, torch.Generator().manual_seed(3))
    c = corpus.sample_batch(tokens, 5, 16, torch.Generator().manual_seed(4))
    assert a.shape == (5, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    for row in a.tolist():  # a window of consecutive bytes of `text`
        assert bytes(row) in text
    with pytest.raises(ValueError, match="seq_len=1024"):
        corpus.sample_batch(tokens, 1, 1024, torch.Generator())


# --------------------------------------------------------------------------- helpers


def test_build_config_scales_every_width():
    q = train.build_config("qwen3_moe", num_layers=3, hidden_size=128)
    # tiny qwen3_moe: hidden 64, head_dim 16, moe_intermediate 32 -> x2
    assert (q.vocab_size, q.num_hidden_layers, q.hidden_size, q.head_dim, q.moe_intermediate_size) == (256, 3, 128, 32, 64)
    d = train.build_config("deepseek_v3", num_layers=2, hidden_size=192)
    # tiny deepseek_v3: q_lora 32, kv_lora 16, rope 8, nope 8, v 16 -> x3
    assert (d.q_lora_rank, d.kv_lora_rank, d.qk_rope_head_dim, d.qk_nope_head_dim, d.v_head_dim) == (96, 48, 24, 24, 48)
    model = train.build_model(q, seed=0)
    ids = torch.randint(0, 256, (2, 8))
    assert model(input_ids=ids).logits.shape == (2, 8, 256)


def test_make_plan_layout_and_errors():
    plan = train.make_plan(4, 2, 8, 4, batch_size=16, seq_len=32)
    assert (plan.attention_ranks, plan.expert_ranks, plan.num_microbatches, plan.microbatch_size) == ([0, 1], [2, 3], 4, 2)
    assert plan.expert_placement == [[2]] * 4 + [[3]] * 4
    deep = train.make_plan(4, 1, 8, 2, batch_size=4, seq_len=32, pipeline_depth=2)
    assert (deep.attention_groups(), deep.expert_groups(), deep.microbatch_size) == ([[0], [1]], [[2], [3]], 2)
    with pytest.raises(ValueError, match="does not divide the 4 ranks"):
        train.make_plan(4, 1, 8, 2, batch_size=4, seq_len=32, pipeline_depth=3)
    with pytest.raises(ValueError, match="leaves no expert rank"):
        train.make_plan(2, 2, 8, 1, batch_size=4, seq_len=8)
    with pytest.raises(ValueError, match="raise --attention-ranks to >= 2"):
        train.make_plan(6, 1, 4, 1, batch_size=4, seq_len=8)


def test_rel_err_by_hand():
    assert train._rel_err(torch.tensor([1.0, 2.1]), torch.tensor([1.0, 2.0])) == pytest.approx(0.05)
    assert train._rel_err(None, None) == 0.0
    assert train._rel_err(None, torch.tensor([0.0, 2.0])) == 1.0  # a missing gradient is a zero one
    assert train._rel_err(torch.tensor([0.0]), torch.tensor([0.0])) == 0.0
    assert train._rel_err(torch.tensor([1e-9]), torch.tensor([0.0])) == float("inf")


class TestAsciiPlot(TestCase):
    def test_plot_of_a_decreasing_curve(self):
        # 8 values in 4 columns: bucket means 9.5, 7.5, 5.5, 1.5
        self.assertExpectedInline(
            train.ascii_plot([10, 9, 8, 7, 6, 5, 2, 1], width=4, height=5),
            """\
   9.500 |*   
         | *  
         |  * 
         |    
   1.500 |   *
         +----
          step 1 step 8""",
        )
