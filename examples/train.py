"""fxdisag demo: train a small MoE language model with attention and experts on disjoint ranks.

Launch (CPU, gloo; every rank runs this same script)::

    torchrun --nproc-per-node 2 examples/train.py                       # 1 attention + 1 expert rank
    torchrun --nproc-per-node 4 examples/train.py --attention-ranks 2   # 2 attention + 2 expert ranks

What it guarantees
------------------
* The model is a small random-init HF MoE causal LM (``--family``, default Qwen3-MoE) over
  byte tokens (vocabulary 256), trained on the Python standard library's own source
  (``examples/corpus.py``: no download), with a held-out split of whole files.
* Every rank draws the same global batches from a generator seeded with ``--seed``, as
  ``fxdisag.disaggregate`` requires; AdamW runs on each rank's own ``dmodel.parameters()``.
* Before training, a parity check runs one batch through the disaggregated model and
  through a fresh eager copy of the same initial model (same seed, plain PyTorch, rank 0).
  The script exits with status 1 if the losses differ by more than 1e-5 or any
  consolidated gradient has a relative error above 1e-4 (``max|g - g_eager| / max|g_eager|``
  per parameter), before training starts.
* Rank 0 prints the plan, progress (a tqdm bar on a terminal, periodic lines otherwise),
  then the loss curve, held-out loss before/after, the final loss and the median step time.

Pseudo-code::

    model = build_model(config, seed)                     # identical on every rank
    dmodel = disaggregate(model, batch0, plan=make_plan(...))
    parity_check(dmodel, config, seed, parity_batch)      # rank 0 rebuilds the model eagerly; exit 1 on mismatch
    for step in range(steps):
        x = sample_batch(train, B, T, generator)          # same x on every rank
        dmodel(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run from a checkout without installing: the repository root holds the fxdisag package.
_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "fxdisag").is_dir() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel  # noqa: E402

from corpus import VOCAB_SIZE, load_stdlib_corpus, sample_batch  # noqa: E402
import fxdisag  # noqa: E402
from fxdisag import DisaggregatedModel, Plan, disaggregate, find_layout  # noqa: E402
from fxdisag.testing.models import TINY_FAMILIES, tiny_config  # noqa: E402

LOSS_TOLERANCE = 1e-5  # absolute, on the mean cross-entropy
GRAD_TOLERANCE = 1e-4  # relative, per parameter, max-norm

# Fields of the tiny configs that are widths: all scale with --hidden-size so that heads,
# experts and (DeepSeek) MLA projections keep the tiny model's proportions.
_WIDTH_FIELDS = (
    "hidden_size",
    "head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "qk_head_dim",
    "v_head_dim",
)


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a small MoE LM disaggregated with fxdisag (launch with torchrun).",
        epilog="Example: torchrun --nproc-per-node 2 examples/train.py --steps 200",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--family", default="qwen3_moe", help=f"MoE model family, one of {', '.join(TINY_FAMILIES)}")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32,
                   help="global batch (sequences); a multiple of attention ranks x micro-batches")
    p.add_argument("--seq-len", type=int, default=128, help="tokens (bytes) per sequence, at most 256")
    p.add_argument("--microbatches", type=int, default=2, help="micro-batches per attention rank (AF-pipe depth)")
    p.add_argument("--attention-ranks", type=int, default=1,
                   help="ranks 0..N-1 run attention, the other ranks run the experts")
    p.add_argument("--plan", choices=("manual", "auto"), default="manual",
                   help="manual: --attention-ranks/--microbatches as given; auto: fxdisag's planner chooses the split "
                        "and micro-batches from online profiling (matmul rate, link bandwidth) of these ranks")
    p.add_argument("--schedule", choices=("gpipe", "1f1b"), default="gpipe",
                   help="gpipe: all forwards, then all backwards; 1f1b: at most 2 micro-batches in flight, backward "
                        "first (bounded activation memory); manual plans only")
    p.add_argument("--pipeline-depth", type=int, default=1,
                   help="p attention groups and p expert groups, layers dealt round-robin (world = p x group)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the model weights and the batches")
    p.add_argument("--num-layers", type=int, default=4, help="decoder layers")
    p.add_argument("--hidden-size", type=int, default=128,
                   help="model width, a multiple of 64 (every width of the tiny config scales with it)")
    p.add_argument("--corpus-mb", type=float, default=2.0, help="MB of standard-library source to read")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches for the held-out loss")
    p.add_argument("--plot", metavar="FILE.png", help="save the loss curve as a PNG (needs matplotlib)")
    p.add_argument("--trace", metavar="FILE.json",
                   help="record per-rank timelines; write the last training step as a Chrome trace "
                        "(and FILE.png, a Gantt chart, when matplotlib is installed)")
    p.add_argument("--front-door", choices=("disaggregate", "compile"), default="disaggregate",
                   help="disaggregate: fxdisag.disaggregate(model, ...); compile: torch.compile(model, "
                        "backend='fxdisag'), with AdamW on model.parameters() as for any compiled model")
    p.add_argument("--compile-stages", action="store_true",
                   help="run every stage program and experts call through torch.compile (inductor) on its rank")
    p.add_argument("--quiet", action="store_true", help="no progress bar or periodic progress lines")
    args = p.parse_args(argv)
    if args.family.strip().lower().replace("-", "_") not in TINY_FAMILIES:
        p.error(f"--family {args.family!r}: choose one of {', '.join(TINY_FAMILIES)}")
    for name in ("steps", "batch_size", "seq_len", "microbatches", "attention_ranks", "num_layers", "eval_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.hidden_size < 64 or args.hidden_size % 64:
        p.error(f"--hidden-size must be a positive multiple of 64, got {args.hidden_size}")
    if args.batch_size % (args.attention_ranks * args.microbatches):
        p.error(
            f"--batch-size {args.batch_size} must be a multiple of --attention-ranks x --microbatches = "
            f"{args.attention_ranks * args.microbatches}"
        )
    if args.schedule != "gpipe" and args.plan == "auto":
        p.error("--schedule applies to manual plans; with --plan auto the planner chooses the schedule")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: `pip install matplotlib` (or `pip install fxdisag[plot]`)")
    return args


# --------------------------------------------------------------------------- model and plan


def build_config(family: str, *, num_layers: int, hidden_size: int) -> PreTrainedConfig:
    """``tiny_config(family)`` over bytes (vocab 256), with every width scaled to ``hidden_size``."""
    config = tiny_config(family, num_layers=num_layers)
    base = config.hidden_size
    if hidden_size % base:
        raise ValueError(f"hidden_size={hidden_size} must be a multiple of the tiny config's {base}")
    scale = hidden_size // base
    for name in _WIDTH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, value * scale)
    config.vocab_size = VOCAB_SIZE
    return config


def build_model(config: PreTrainedConfig, seed: int) -> PreTrainedModel:
    """A random-init model of ``config``, the same weights for the same seed (global RNG restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.train()
    return model


def make_plan(
    world_size: int,
    attention_ranks: int,
    num_experts: int,
    num_microbatches: int,
    *,
    batch_size: int,
    seq_len: int,
    model_name: str = "",
    schedule_kind: str = "gpipe",
    pipeline_depth: int = 1,
) -> Plan:
    """Ranks 0..attention_ranks-1 run attention; the rest hold the experts in contiguous blocks.
    With ``pipeline_depth`` p the world is p groups of each kind and ``attention_ranks`` is
    per group (layers dealt round-robin over the groups).

    The one place the demo's plan is made: swap in ``fxdisag.planner`` search here.
    """
    if pipeline_depth < 1 or world_size % pipeline_depth:
        raise ValueError(f"--pipeline-depth {pipeline_depth} does not divide the {world_size} ranks into equal "
                         "groups; launch a multiple of it with torchrun --nproc-per-node")
    world_size //= pipeline_depth
    num_expert_ranks = world_size - attention_ranks
    if num_expert_ranks < 1:
        raise ValueError(
            f"--attention-ranks {attention_ranks} leaves no expert rank in a world of {world_size}; "
            f"use at most {world_size - 1} (or launch more ranks with torchrun --nproc-per-node)"
        )
    if num_expert_ranks > num_experts:
        raise ValueError(
            f"{num_expert_ranks} expert ranks but the model has {num_experts} experts per layer and the runtime "
            f"keeps one copy of each: raise --attention-ranks to >= {world_size - num_experts} or launch fewer ranks"
        )
    plan = Plan.manual(attention_ranks, num_expert_ranks, num_experts, num_microbatches,
                       microbatch_size=batch_size // (attention_ranks * num_microbatches), schedule_kind=schedule_kind,
                       pipeline_depth=pipeline_depth)
    # Descriptive fields only (they title str(plan)); the runtime does not read them.
    plan.model, plan.cluster = model_name, f"CPU/gloo x{world_size * pipeline_depth}"
    plan.seq_len, plan.global_batch = seq_len, batch_size
    return plan


def describe_placement(plan: Plan) -> str:
    """One line per expert rank: which experts it holds."""
    lines = []
    for r in plan.expert_ranks:
        held = [e for e, ranks in enumerate(plan.expert_placement) if r in ranks]
        lines.append(f"  rank {r}: experts {_span_list(held)}")
    return "\n".join(lines)


def _span_list(ids: list[int]) -> str:
    if ids and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0])
    return ",".join(map(str, ids))


# --------------------------------------------------------------------------- parity check


@dataclass
class ParityReport:
    loss: float  # disaggregated
    eager_loss: float
    max_grad_rel_err: float
    worst_param: str
    num_params: int

    @property
    def loss_diff(self) -> float:
        return abs(self.loss - self.eager_loss)

    @property
    def ok(self) -> bool:
        return self.loss_diff <= LOSS_TOLERANCE and self.max_grad_rel_err <= GRAD_TOLERANCE

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        return (
            f"parity vs eager: loss {self.loss:.6f} vs {self.eager_loss:.6f} (|diff| {self.loss_diff:.2e}, "
            f"tol {LOSS_TOLERANCE:g}); max grad rel err {self.max_grad_rel_err:.2e} over {self.num_params} "
            f"tensors (tol {GRAD_TOLERANCE:g}, worst {self.worst_param}): {verdict}"
        )


def _rel_err(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """max|got - want| / max|want|; a missing gradient counts as zeros."""
    if got is None and want is None:
        return 0.0
    if got is None:
        got = torch.zeros_like(want)
    if want is None:
        want = torch.zeros_like(got)
    if got.shape != want.shape:
        return math.inf
    scale = want.abs().max().item()
    diff = (got - want).abs().max().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def parity_check(forward, config: PreTrainedConfig, seed: int, batch: torch.Tensor,
                 dmodel=None) -> ParityReport:
    """Loss and consolidated gradients of one step on ``batch``, disaggregated vs eager.

    ``forward``: the disaggregated model, or the torch.compile'd one (then ``dmodel`` is
    looked up after its first call: the backend builds it). Collective (every rank calls
    it). Leaves no gradient behind. Rank 0 builds the eager reference from scratch with
    ``seed`` and first checks it starts from the very weights ``dmodel`` holds, so the
    comparison is of the computation, not of the init.
    """
    out = forward(input_ids=batch, labels=batch)
    out.loss.backward()
    dmodel = dmodel or fxdisag.disaggregated(forward)
    weights = dmodel.consolidated_state_dict()  # no optimizer step yet: the initial weights
    grads = dmodel.consolidated_grads()
    for p in list(dmodel.parameters()) + list(dmodel._model.parameters()):
        p.grad = None
    report = None
    if dist.get_rank() == 0:
        reference = build_model(config, seed)
        ref_params = dict(reference.named_parameters())
        if set(ref_params) != set(weights):
            raise RuntimeError(
                f"consolidated_state_dict names differ from the model's: only in fxdisag "
                f"{sorted(set(weights) - set(ref_params))[:5]}, only in eager {sorted(set(ref_params) - set(weights))[:5]}"
            )
        for name, p in ref_params.items():
            if not torch.equal(p.detach(), weights[name]):
                raise RuntimeError(f"the eager reference's initial {name} differs from the disaggregated model's")
        ref_loss = reference(input_ids=batch, labels=batch).loss
        ref_loss.backward()
        errs = {name: _rel_err(grads[name], p.grad) for name, p in ref_params.items()}
        worst = max(errs, key=errs.__getitem__)
        report = ParityReport(out.loss.item(), ref_loss.item(), errs[worst], worst, len(errs))
    box = [report]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def heldout_loss(forward, batches: list[torch.Tensor]) -> float:
    """Mean loss over ``batches`` (a forward without backward: the runtime drops its activations)."""
    return sum(float(forward(input_ids=x, labels=x).loss) for x in batches) / len(batches)


# --------------------------------------------------------------------------- trace


def write_trace(dmodel: DisaggregatedModel, path: str) -> list[str]:
    """The last step's timeline as Chrome trace JSON at ``path`` and, with matplotlib, a Gantt PNG
    beside it (collective: rank 0 writes). Returns the lines to report."""
    try:
        import matplotlib  # noqa: F401

        png = str(Path(path).with_suffix(".png"))
    except ImportError:
        png = None
    dmodel.write_timeline(trace_json=path, png=png)
    return [path, png or "(no Gantt PNG: matplotlib is not installed)"]


# --------------------------------------------------------------------------- output


def ascii_plot(values: list[float], width: int = 60, height: int = 10) -> str:
    """``values`` as a plot of '*' in ``height`` rows: one column per bucket of consecutive values (their mean)."""
    if not values:
        return "(no values)"
    width = min(width, len(values))
    buckets = [values[len(values) * c // width : len(values) * (c + 1) // width] for c in range(width)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    span = (hi - lo) or 1.0
    rows = [[" "] * width for _ in range(height)]
    for c, v in enumerate(means):
        rows[height - 1 - round((v - lo) / span * (height - 1))][c] = "*"
    lines = []
    for r, row in enumerate(rows):
        label = f"{hi:8.3f} " if r == 0 else (f"{lo:8.3f} " if r == height - 1 else " " * 9)
        lines.append(label + "|" + "".join(row))
    lines.append(" " * 9 + "+" + "-" * width)
    left, right = "step 1", f"step {len(values)}"
    lines.append(" " * 10 + left + " " * max(width - len(left) - len(right), 1) + right)
    return "\n".join(lines)


def save_plot(losses: list[float], heldout: tuple[float, float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=0.8, label="train loss (batch)")
    ax.scatter([0, len(losses)], list(heldout), color="C3", zorder=3, label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class Progress:
    """Rank 0's progress: a tqdm bar on a terminal, else a line every ~10% of the steps."""

    def __init__(self, steps: int, enabled: bool):
        self.steps = steps
        self.enabled = enabled
        self.every = max(1, steps // 10)
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, step_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}, {tokens_per_s:,.0f} tok/s, {step_s:.3f} s/step", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step in (1, self.steps):
            print(f"step {step:>5}/{self.steps}  loss {loss:.4f}  {tokens_per_s:>8,.0f} tok/s  {step_s:.3f} s/step",
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- main


def _init_distributed() -> bool:
    """Join the torchrun job (gloo); returns whether this call created the process group."""
    if dist.is_initialized():  # a caller (e.g. a test harness) set it up
        return False
    if "RANK" not in os.environ:
        raise SystemExit("examples/train.py runs on several ranks: launch it with "
                         "`torchrun --nproc-per-node 2 examples/train.py`")
    dist.init_process_group("gloo")
    # FXDISAG_THROTTLE=400mbit: emulate a slow network in-process (tooling, not the library).
    from fxdisag.testing import throttle

    throttle.install_from_env()
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    owns_group = _init_distributed()
    try:
        return _run(args)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _run(args: argparse.Namespace) -> int:
    rank, world = dist.get_rank(), dist.get_world_size()
    if world < 2:
        raise SystemExit("fxdisag needs >= 2 ranks (one attention, one expert): torchrun --nproc-per-node 2 ...")
    say = print if rank == 0 else (lambda *a, **k: None)

    corpus = load_stdlib_corpus(max_bytes=int(args.corpus_mb * 1e6))
    config = build_config(args.family, num_layers=args.num_layers, hidden_size=args.hidden_size)
    if args.seq_len > config.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's {config.max_position_embeddings} positions")
    model = build_model(config, args.seed)
    num_experts = find_layout(model).moe[0].num_experts
    if args.plan == "auto":
        plan = "auto"
    else:
        try:
            plan = make_plan(world, args.attention_ranks, num_experts, args.microbatches,
                             batch_size=args.batch_size, seq_len=args.seq_len, model_name=f"byte-level {args.family}",
                             schedule_kind=args.schedule, pipeline_depth=args.pipeline_depth)
        except ValueError as e:
            raise SystemExit(f"train.py: {e}") from None

    say(f"corpus: {corpus.describe()}")
    say(f"model: {type(model).__name__}, {args.num_layers} layers, hidden {args.hidden_size}, "
        f"{num_experts} experts/layer, {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    if plan != "auto":
        say(str(plan))
        say("expert placement (every MoE layer):\n" + describe_placement(plan))
    say(f"batch: {args.batch_size} x {args.seq_len} bytes = {args.batch_size * args.seq_len:,} tokens per step")

    batches = torch.Generator().manual_seed(args.seed)  # identical stream on every rank
    heldout_batches = torch.Generator().manual_seed(args.seed + 1)
    eval_set = [sample_batch(corpus.heldout, args.batch_size, args.seq_len, heldout_batches)
                for _ in range(args.eval_batches)]
    parity_batch = sample_batch(corpus.train, args.batch_size, args.seq_len, torch.Generator().manual_seed(args.seed + 2))

    t0 = time.perf_counter()
    if args.front_door == "compile":
        # The torch.compile front door: the backend disaggregates on the first call (the parity
        # step), and the optimizer holds the model's own parameters, as for any compiled model.
        forward = torch.compile(model, backend="fxdisag", options={
            "plan": plan, "trace": bool(args.trace), "compile_stages": args.compile_stages})
        parity = parity_check(forward, config, args.seed, parity_batch)
        dmodel = fxdisag.disaggregated(model)
        params = list(model.parameters())
    else:
        dmodel = disaggregate(model, {"input_ids": parity_batch, "labels": parity_batch}, plan=plan,
                              trace=bool(args.trace), compile_stages=args.compile_stages)
        forward, params = dmodel, list(dmodel.parameters())
        parity = parity_check(dmodel, config, args.seed, parity_batch, dmodel)
    if plan == "auto":
        say(str(dmodel.plan))
        say("expert placement (every MoE layer):\n" + describe_placement(dmodel.plan))
    say(f"disaggregated ({args.front_door}{', compiled stages' if args.compile_stages else ''}) and checked in "
        f"{time.perf_counter() - t0:.1f} s; rank {rank} computes with "
        f"{sum(p.numel() for p in dmodel.parameters()) / 1e6:.2f} M parameters")
    say(str(parity), flush=True)
    if not parity.ok:
        return 1

    before = heldout_loss(forward, eval_set)
    say(f"held-out loss before training: {before:.4f}", flush=True)

    opt = torch.optim.AdamW(params, lr=args.lr)
    progress = Progress(args.steps, enabled=rank == 0 and not args.quiet)
    losses: list[float] = []
    step_times: list[float] = []
    tokens = args.batch_size * args.seq_len
    for step in range(1, args.steps + 1):
        x = sample_batch(corpus.train, args.batch_size, args.seq_len, batches)
        start = time.perf_counter()
        loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise SystemExit(f"loss became {losses[-1]} at step {step}: lower --lr (now {args.lr})")
        progress.update(step, losses[-1], tokens / step_times[-1], step_times[-1])
    progress.close()

    if args.trace:  # before any other forward: the runtime keeps the spans of the latest step only
        say("timeline of the last step: " + ", ".join(write_trace(dmodel, args.trace)))
    after = heldout_loss(forward, eval_set)

    timed = step_times[1:] or step_times  # step 1 pays one-off warm-up (allocations, first messages)
    median = statistics.median(timed)
    tail = losses[-min(10, len(losses)):]
    say("\ntraining loss (per step, bucket means):")
    say(ascii_plot(losses))
    say(f"held-out loss: {before:.4f} before -> {after:.4f} after {args.steps} steps "
        f"(uniform over bytes: {math.log(VOCAB_SIZE):.4f})")
    say(f"final loss: {losses[-1]:.4f} (mean of the last {len(tail)} steps {sum(tail) / len(tail):.4f})")
    say(f"median step time: {median:.3f} s ({tokens / median:,.0f} tokens/s) over {len(timed)} steps, "
        f"{world} ranks ({len(dmodel.plan.attention_ranks)} attention + {len(dmodel.plan.expert_ranks)} expert), "
        f"{dmodel.plan.num_microbatches} micro-batches")
    if args.plot and rank == 0:
        save_plot(losses, (before, after), args.plot,
                  f"{args.family}, {world} ranks: {len(dmodel.plan.attention_ranks)} attention + {len(dmodel.plan.expert_ranks)} expert")
        say(f"loss curve saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
