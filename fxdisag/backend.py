"""``torch.compile(model, backend="fxdisag")``: the torch.compile front door.

Contract::

    cmodel = torch.compile(model, backend="fxdisag", options={"plan": "auto"})   # under torchrun
    out = cmodel(input_ids=ids, labels=ids)   # every rank, the same global batch
    out.loss.backward()                       # runs the pipeline's backward half
    opt.step()                                # opt built on model.parameters(), as usual

* registered through the ``torch_dynamo_backends`` entry point: no import needed;
* dynamo's graph goes through :func:`~fxdisag.capture_dynamo.from_dynamo` (the same
  region tags as ``capture``), then the same ``build`` as ``disaggregate``: planner,
  ``Plan``, schedule, runtime;
* parameters stay the model's own: nothing is released, and expert ranks compute with
  the model's full experts tensors (``expert_weights="model"``), so an optimizer built on
  ``model.parameters()`` trains what the pipeline computes with. Each rank keeps the
  whole model in memory (use ``disaggregate`` to free what a rank does not compute);
* ``out.loss`` is the global batch's loss on every rank. The other outputs (logits, the
  KV cache) are meta tensors of the right shape and dtype: the step computes logits per
  micro-batch on the last attention stage and does not gather them;
* one process (no process group, no ``RANK`` in the environment): the graph runs
  unchanged, and a warning names the plan the job would use (with ``cluster`` given);
* a re-compile (dynamo sees a new input shape) keeps the first compile's plan: roles,
  expert placement and micro-batch count, so every parameter and its optimizer state
  stay on the rank that trains them. Every rank checks, through the c10d store with a
  timeout, that all ranks compile the same shapes with the same plan; otherwise each
  rank raises (never a hang).

Options (``torch.compile(..., options={...})``)::

    plan            Plan | "auto"            (default "auto": the planner's choice)
    cluster         ClusterSpec | str | None  (None: measured online)
    microbatches    int | None               pins m for "auto"
    mode            "afpipe" | "ep" | "ep-overlap"   (the EP baselines, same runtime)
    trace           bool                     record a timeline (fxdisag.disaggregated(model))
    compile_stages  bool                     inductor on every stage program on the rank
    timeout_s       float                    the compile handshake's limit, and every wait on a peer
                                             (disaggregate's timeout=; default 300)
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fxdisag.capture import CaptureError
from fxdisag.capture_dynamo import (DynamoInputs, DynamoOutputs, dynamo_inputs, dynamo_outputs, from_dynamo,
                                     graph_root)
from fxdisag.layout import find_layout

__all__ = ["BACKEND_OPTIONS", "disaggregated", "fxdisag_backend"]

logger = logging.getLogger("fxdisag")

BACKEND_OPTIONS = ("plan", "cluster", "microbatches", "mode", "trace", "compile_stages", "timeout_s")
_MODES = ("afpipe", "ep", "ep-overlap")


@dataclass
class _Options:
    plan: Any = "auto"
    cluster: Any = None
    microbatches: int | None = None
    mode: str = "afpipe"
    trace: bool = False
    compile_stages: bool = False
    timeout_s: float = 300.0

    @classmethod
    def parse(cls, options: dict | None) -> "_Options":
        options = dict(options or {})
        unknown = sorted(set(options) - set(BACKEND_OPTIONS))
        if unknown:
            raise ValueError(f"torch.compile(backend='fxdisag'): unknown option(s) {unknown}; "
                             f"the options are {list(BACKEND_OPTIONS)}")
        opts = cls(**options)
        if opts.mode not in _MODES:
            raise ValueError(f"torch.compile(backend='fxdisag'): mode must be one of {list(_MODES)}, got {opts.mode!r}")
        if opts.mode != "afpipe" and opts.plan != "auto":
            raise ValueError("torch.compile(backend='fxdisag'): give either plan= or an EP mode, not both")
        return opts

    def fingerprint(self) -> str:
        plan = self.plan if isinstance(self.plan, str) else self.plan.to_json()
        cluster = self.cluster if self.cluster is None or isinstance(self.cluster, str) else self.cluster.describe()
        return json.dumps([plan, cluster, self.microbatches, self.mode, self.compile_stages], sort_keys=True)


@dataclass
class _ModelState:
    plan: Any = None  # the first compile's Plan: later compiles keep it
    built: list = field(default_factory=list)


_STATES: "weakref.WeakKeyDictionary[nn.Module, _ModelState]" = weakref.WeakKeyDictionary()
_COMPILES = [0]  # backend calls in this process: every rank makes the same sequence


def disaggregated(model: nn.Module):
    """The :class:`~fxdisag.api.DisaggregatedModel` the backend built last for ``model`` (for
    timelines, ``consolidated_state_dict()``, the plan); errors before the first compiled call."""
    state = _STATES.get(getattr(model, "_orig_mod", model))
    if state is None or not state.built:
        raise RuntimeError("the fxdisag backend has not compiled this model yet: call the compiled model first")
    return state.built[-1]


def fxdisag_backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None,
                    mode: str | None = None):
    """A dynamo backend: ``torch.compile(model, backend="fxdisag", options={...})``."""
    if mode is not None:
        raise ValueError(f"torch.compile(backend='fxdisag', mode={mode!r}): mode= selects inductor presets; "
                         "pass options={'compile_stages': True} to compile the stage programs")
    opts = _Options.parse(options)
    _, root = graph_root(gm)  # first: a partial graph (a graph break) is reported here
    io = dynamo_inputs(gm)
    names = io.names
    batch = {name: t for name, t in zip(names, example_inputs) if name}
    outs = dynamo_outputs(gm, find_layout(root).vocab_size, io)
    if outs.labels_alias:
        batch["labels"] = batch["input_ids"]
    # Stage programs run per micro-batch, so they need a graph that is not specialised to
    # this call's batch: dynamo's dynamic-shape graph of the same model (its sizes become
    # size() calls on the inputs). Dynamo traces it here, once, if the user's was static.
    captured = from_dynamo(gm, example_inputs) if io.is_dynamic else _dynamic_capture(root, batch)
    if not dist.is_initialized() and "RANK" not in os.environ:
        logger.warning("fxdisag backend: no process group, one process: running the captured graph unchanged. %s",
                       _plan_note(captured, batch, opts))
        return gm.forward
    from fxdisag.api import _init_distributed, build

    _init_distributed(opts.timeout_s)
    state = _STATES.setdefault(captured.model, _ModelState())
    first = state.plan is None
    _agree_across_ranks(batch, opts, state, timeout_s=opts.timeout_s)
    plan = state.plan if not first else _first_plan(captured, batch, opts)
    dmodel = build(captured, batch, plan, opts.cluster, sync_params=first, trace=opts.trace, release_unused=False,
                   expert_weights="model", compile_stages=opts.compile_stages, timeout=opts.timeout_s)
    state.plan = dmodel.plan
    state.built.append(dmodel)
    if dmodel.rank == 0:
        logger.info("fxdisag backend: compiled %s for inputs %s with plan %s", type(captured.model).__name__,
                    {k: tuple(v.shape) for k, v in batch.items()}, dmodel.plan)
    return _Compiled(dmodel, io, outs)


class _Grabbed(Exception):
    pass


def _dynamic_capture(root: nn.Module, batch: dict):
    """Dynamo's dynamic-shape graph of ``root`` on ``batch``, through ``from_dynamo``.

    A nested torch.compile with a backend that keeps the rewritten graph and whose compiled
    function raises before running anything (no extra forward). Its cache entry is guarded
    on that backend, so the user's compiled model never runs it."""
    got = {}

    def grab(gm, example_inputs, **_):
        got["captured"] = from_dynamo(gm, example_inputs)

        def never_run(*args):
            raise _Grabbed

        return never_run

    try:
        torch.compile(root, backend=grab, dynamic=True, fullgraph=False)(**batch)
    except _Grabbed:
        pass
    except torch._dynamo.exc.BackendCompilerFailed as exc:  # our own CaptureError, unwrapped
        raise exc.inner_exception from None
    if "captured" not in got:
        raise CaptureError(f"dynamo compiled no graph of {type(root).__name__} with dynamic shapes")
    return got["captured"]


class _Compiled:
    """What dynamo calls in place of its graph: dynamo's flat inputs in, its flat outputs out."""

    def __init__(self, dmodel, io: DynamoInputs, outs: DynamoOutputs):
        self.dmodel = dmodel
        self.names = io.names
        self.sizes = [n.meta["example_value"].node.expr if n in io.sizes else None for n in io.placeholders]
        self.outs = outs

    def __call__(self, *args):
        inputs = {name: a for name, a in zip(self.names, args) if name}
        if self.outs.labels_alias:
            inputs["labels"] = inputs["input_ids"]
        if self.outs.loss is None:
            raise ValueError("fxdisag trains with a loss: call the compiled model with labels=...")
        out = self.dmodel(**inputs)
        symbols = {e: int(a) for e, a in zip(self.sizes, args) if e is not None}

        def concrete(shape):  # a dynamic graph's output sizes, at this call's sizes
            return tuple(int(d) if isinstance(d, int) else int(d.node.expr.xreplace(symbols)) for d in shape)

        result: list[Any] = [None] * self.outs.count
        result[self.outs.loss] = out.loss
        ids = inputs["input_ids"]
        result[self.outs.logits] = torch.empty((*ids.shape, self.dmodel.layout.vocab_size), device="meta")
        for i, shape, dtype in self.outs.extra:
            result[i] = torch.empty(concrete(shape), dtype=dtype, device="meta")
        return tuple(result)


def _first_plan(captured, batch, opts: _Options):
    from fxdisag.planner.plan import Plan

    if opts.mode == "afpipe":
        if opts.plan == "auto" and opts.microbatches is not None:
            from fxdisag.planner.auto import auto_plan

            return auto_plan(captured, batch, cluster=opts.cluster, num_microbatches=opts.microbatches)
        return opts.plan
    experts = captured.layout.moe[0].num_experts
    return Plan.expert_parallel(dist.get_world_size(), experts, opts.microbatches or 1,
                                overlap=opts.mode == "ep-overlap")


def _agree_across_ranks(batch, opts: _Options, state: _ModelState, timeout_s: float) -> None:
    """Every rank compiles the n-th graph for the same shapes and plan, or every rank raises."""
    n = _COMPILES[0]
    _COMPILES[0] += 1
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = json.dumps({"shapes": {k: list(v.shape) for k, v in batch.items()}, "options": opts.fingerprint(),
                       "plan": None if state.plan is None else state.plan.to_json()}, sort_keys=True)
    store = dist.distributed_c10d._get_default_store()
    keys = [f"fxdisag/compile/{n}/{r}" for r in range(world)]
    store.set(keys[rank], mine)
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as exc:
        missing = [r for r, k in enumerate(keys) if not store.check([k])]
        raise CaptureError(
            f"fxdisag backend: rank {rank} compiled graph #{n} (inputs {json.loads(mine)['shapes']}) but rank(s) "
            f"{missing} did not within {timeout_s:.0f} s: every rank must call the compiled model with the same "
            "input shapes, in the same order (a re-compile on one rank only would deadlock the pipeline)") from exc
    views = [store.get(k).decode() for k in keys]
    if len(set(views)) > 1:
        table = "\n".join(f"  rank {r}: {v}" for r, v in enumerate(views))
        raise CaptureError(f"fxdisag backend: ranks compiled graph #{n} differently; all ranks must use the same "
                           f"input shapes and options:\n{table}")


def _plan_note(captured, batch, opts: _Options) -> str:
    if opts.cluster is None:
        return ("Launch with torchrun to disaggregate; pass options={'cluster': '2x1xh100'} (for one) to have "
                "the plan it would use printed here.")
    from fxdisag.planner.auto import _param_dtype, runnable_plan
    from fxdisag.planner.cluster import ClusterSpec
    from fxdisag.planner.profile import profile

    cluster = ClusterSpec.parse(opts.cluster) if isinstance(opts.cluster, str) else opts.cluster
    b, seq = batch["input_ids"].shape
    prof = profile(captured, batch_size=1, seq_len=seq, dtype=_param_dtype(captured))
    best, _ = runnable_plan(prof, cluster, b, seq, opts.microbatches)
    return f"Under torchrun on {cluster.describe()} it would use: {best}"
