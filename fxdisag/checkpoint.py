"""Checkpoints of a disaggregated model: sharded save/load with resharding, and HF export.

Contract::

    fxdisag.save(dmodel, optimizer, path, step=n)   # collective; every rank writes its own shards
    manifest = fxdisag.load(dmodel, optimizer, path) # collective; any layout into any layout
    fxdisag.export_hf(dmodel, path)                  # collective; rank 0 writes an HF model directory

* ``path`` is a ``torch.distributed.checkpoint`` (DCP) directory plus a manifest
  ``fxdisag.json`` (format version, the writing layout, ``step``). Keys are the HF
  parameter (and persistent buffer) names, e.g. ``model.layers.0.mlp.experts.gate_up_proj``,
  always with the *full* shape; optimizer state under ``optim.state.<name>.<key>`` (e.g.
  ``exp_avg``, ``step``) and the hyper-parameters of each parameter's group under
  ``optim.param_groups.<name>.<key>`` (``lr``, ``betas``, ...).
* the attention side is written as plain tensors by every attention rank (DCP's planner
  keeps one copy of a replicated key); each routed-experts tensor (and its optimizer
  state) as a ShardedTensor whose shards are the rank's rows, one shard per contiguous
  run of expert ids, an expert held by several ranks written by the lowest of them.
  Loading asks each rank for exactly its rows, so a checkpoint written by one plan (any
  placement, world size, attention replicas) loads into another: DCP reads the byte
  ranges each rank needs, nothing is gathered.
* ``optimizer``: None (weights only), one optimizer, or a list of them (one AdamW per
  param group, ZeRO excluded); state is keyed by parameter name, so the lists need not
  match between save and load. An optimizer whose state is still empty at load is
  initialised first (zero gradients, one step at lr 0, as torch's ``_init_optim_state``).
* atomic: the shards go to a sibling ``.<name>.fxdisag-partial`` directory; after every
  rank has written, rank 0 writes the manifest and renames it into place (a previous
  checkpoint at ``path`` is replaced only then). A save that dies half-way leaves
  ``path`` as it was; ``load`` refuses a directory without a manifest, saying the save
  was incomplete.
* ``export_hf`` gathers the full tensors onto rank 0 only (``gather_object``) and calls the
  original model's ``save_pretrained(path, state_dict=full)``: transformers converts its
  fused experts back to the checkpoint format and writes the config;
  ``AutoModelForCausalLM.from_pretrained(path)`` loads it with no missing keys.

Pseudo-code of ``save``::

    rank 0: refuse a path that is not a fxdisag checkpoint; empty the partial sibling
    state = {name: tensor | ShardedTensor(rows of this rank)} + optimizer state and groups
    dcp.save(state, FileSystemWriter(partial))      # each rank its shards, rank 0 .metadata
    rank 0: write fxdisag.json; path -> old, partial -> path, remove old; broadcast outcome
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

__all__ = ["CheckpointError", "MANIFEST", "export_hf", "load", "save"]

MANIFEST = "fxdisag.json"
FORMAT = "fxdisag-checkpoint"
VERSION = 1
# DCP warns on every ShardedTensor; DTensor cannot express arbitrary expert placement (it
# shards into even contiguous chunks), so ShardedTensor it is.
_ST_DEPRECATED = "Please use DTensor instead and we are deprecating ShardedTensor"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read: incomplete, of another model, mismatched."""


# ---- where things go
def _partial(path: str) -> str:
    head, base = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{base}.fxdisag-partial")


def _old(path: str) -> str:
    head, base = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{base}.fxdisag-old")


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for o in opts:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be None, a torch.optim.Optimizer or a list of them, got {type(o).__name__}")
        if type(o).__name__ == "ZeroRedundancyOptimizer":
            raise NotImplementedError("optimizer: ZeroRedundancyOptimizer shards its state by itself; consolidate it "
                                      "(consolidate_state_dict) and save that, or use one plain optimizer per param group")
    return opts


def _group(dmodel):
    """The model's world group, made with its ``timeout`` (``disaggregate(timeout=)``): a
    peer that dies or hangs during a save or load fails it in that time, not gloo's 30 min."""
    return getattr(dmodel, "_world", None)


# ---- this rank's tensors
class _Local:
    """One tensor the rank holds: its full shape, and for routed experts the rows and their ids."""

    def __init__(self, name: str, tensor: torch.Tensor, ids: tuple[int, ...] | None, rows: slice | list[int],
                 full_shape: torch.Size):
        self.name, self.tensor, self.ids, self.rows, self.full_shape = name, tensor, ids, rows, full_shape

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """The rank's rows of ``t`` (the parameter or a state tensor of its shape), a view where possible."""
        return t.detach() if isinstance(self.rows, slice) else t.detach()[self.rows]

    def write_back(self, t: torch.Tensor, value: torch.Tensor, rows: bool) -> None:
        """Copy ``value`` into ``t``: into the rank's rows when ``rows``, else whole."""
        with torch.no_grad():
            if rows and not isinstance(self.rows, slice):
                t[self.rows] = value.to(t.dtype)
            else:
                t.copy_(value)


def _locals(dmodel) -> list[_Local]:
    shapes = {n: p.shape for n, p in dmodel._model.named_parameters()}
    out = []
    for name, t, ids, rows in dmodel.named_local_tensors():
        out.append(_Local(name, t, ids, rows, shapes.get(name, t.shape)))
    return out


def _runs(ids: Sequence[int], skip: set[int]) -> list[tuple[int, int, int]]:
    """(first local row, first global id, length) of each run of consecutive ids not in ``skip``."""
    runs: list[list[int]] = []
    for i, e in enumerate(ids):
        if e in skip:
            continue
        if runs and runs[-1][0] + runs[-1][2] == i and runs[-1][1] + runs[-1][2] == e:
            runs[-1][2] += 1
        else:
            runs.append([i, e, 1])
    return [tuple(r) for r in runs]  # type: ignore[misc]


def _sharded(local: torch.Tensor, full_shape: Sequence[int], runs: list[tuple[int, int, int]]) -> ShardedTensor:
    """A ShardedTensor of global ``full_shape`` whose local shards are the ``runs`` of ``local``'s rows.

    ShardedTensor insists that its metadata covers the whole tensor without overlap, but
    DCP reads only the local shards (at save, the checkpoint's chunks are merged from
    every rank's local shards; at load, each rank asks for its own). So the rows this rank
    does not contribute are listed as one placeholder shard per gap on another rank: no
    rank needs the others' lists, and two replicas of an expert can both load it.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    local = local.contiguous()
    tail = list(local.shape[1:])
    shards, metas, covered = [], [], []
    for row, first, n in runs:
        md = ShardMetadata(shard_offsets=[first] + [0] * len(tail), shard_sizes=[n] + tail,
                           placement=f"rank:{rank}/{local.device}")
        shards.append(Shard(local[row:row + n], md))
        metas.append(md)
        covered.append((first, first + n))
    start, other = 0, (rank + 1) % world
    for lo, hi in sorted(covered) + [(full_shape[0], full_shape[0])]:
        if lo > start:  # a gap: rows other ranks write (or read)
            metas.append(ShardMetadata(shard_offsets=[start] + [0] * len(tail), shard_sizes=[lo - start] + tail,
                                       placement=f"rank:{other}/{local.device}"))
        start = max(start, hi)
    props = TensorProperties(dtype=local.dtype, layout=local.layout, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    meta = ShardedTensorMetadata(shards_metadata=metas, size=torch.Size(full_shape), tensor_properties=props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, meta)


def _lowest_holders(locals_: list[_Local], group) -> dict[str, set[int]]:
    """Per expert tensor name, the expert ids a lower rank also holds (it writes them instead:
    shards must not overlap)."""
    mine = {loc.name: loc.ids for loc in locals_ if loc.ids is not None}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine, group=group)  # names and ids only, never tensors
    rank = dist.get_rank()
    return {name: {e for r in range(rank) for e in (every[r] or {}).get(name, ())} for name in mine}


def _entry(loc: _Local, t: torch.Tensor, skip: set[int]) -> Any:
    """What goes into the DCP state dict for ``t``, the parameter or one of its state tensors
    (None: nothing of it is this rank's to write)."""
    if loc.ids is None or t.dim() == 0 or t.shape != loc.tensor.shape:
        return t.detach()  # attention side, or a scalar such as Adam's step: replicated
    runs = _runs(loc.ids, skip)
    return _sharded(loc.rows_of(t), loc.full_shape, runs) if runs else None


def _optim_names(opts: list[torch.optim.Optimizer], locals_: list[_Local]
                 ) -> list[tuple[torch.optim.Optimizer, dict, torch.Tensor, _Local]]:
    """(optimizer, param group, parameter, what it is) for every parameter the optimizers hold."""
    by_id = {id(loc.tensor): loc for loc in locals_}
    out = []
    for o in opts:
        for group in o.param_groups:
            for p in group["params"]:
                if id(p) not in by_id:
                    raise CheckpointError(
                        "optimizer holds a parameter that is not one of dmodel's on this rank (shape "
                        f"{tuple(p.shape)}): build the optimizer on dmodel.parameters() (or attention_parameters() "
                        "/ expert_parameters()), not on the original model's")
                out.append((o, group, p, by_id[id(p)]))
    return out


def _state_dict(dmodel, opts: list[torch.optim.Optimizer]) -> dict[str, Any]:
    locals_ = _locals(dmodel)
    skip = _lowest_holders(locals_, _group(dmodel))
    state: dict[str, Any] = {}
    for loc in locals_:
        entry = _entry(loc, loc.tensor, skip.get(loc.name, set()))
        if entry is not None:
            state[loc.name] = entry
    for o, group, p, loc in _optim_names(opts, locals_):
        for key, value in o.state.get(p, {}).items():
            entry = _entry(loc, value, skip.get(loc.name, set())) if torch.is_tensor(value) else value
            if entry is not None:
                state[f"optim.state.{loc.name}.{key}"] = entry
        for key, value in group.items():
            if key != "params":
                state[f"optim.param_groups.{loc.name}.{key}"] = value
    return state


# ---- save
def save(dmodel, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None, path: str | os.PathLike,
         *, step: int | None = None) -> None:
    """Write this rank's shards of ``dmodel`` (and ``optimizer``'s state) to the checkpoint ``path``.

    Collective: every rank calls it with the same ``path``. ``step`` is recorded in the
    manifest (``load`` returns it). ``path`` is replaced only once the whole checkpoint is
    written; a directory there that is not a fxdisag checkpoint is refused.
    """
    path = os.fspath(path)
    rank = dist.get_rank()
    opts = _optimizers(optimizer)
    partial = _partial(path)
    problem = None
    if rank == 0:
        if os.path.exists(path) and not os.path.exists(os.path.join(path, MANIFEST)):
            problem = (f"path {path!r} exists and is not a complete fxdisag checkpoint (no {MANIFEST}); fxdisag.save "
                       "replaces only its own checkpoints: choose another path or remove it")
        else:
            try:
                shutil.rmtree(partial, ignore_errors=True)  # a previous save that died
                os.makedirs(partial)
            except OSError as e:
                problem = f"fxdisag.save({path!r}): cannot create {partial!r} beside it: {e}"
    _raise_everywhere(problem, rank, _group(dmodel))
    state, problem = {}, None
    try:
        state = _state_dict(dmodel, opts)
    except CheckpointError as e:
        problem = str(e)
    _agree(problem, _group(dmodel))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_ST_DEPRECATED)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(partial), process_group=_group(dmodel))
    except Exception as e:  # a peer died or a write failed: path keeps what it had
        raise CheckpointError(f"fxdisag.save({path!r}) failed on rank {rank} while writing shards ({e}); the "
                              f"checkpoint at {path!r}, if any, is untouched, the partial files are in {partial!r}") from e
    problem = None
    if rank == 0:
        try:
            _commit(dmodel, opts, path, partial, step)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            problem = f"fxdisag.save({path!r}): committing the checkpoint failed on rank 0: {e!r}"
    _raise_everywhere(problem, rank, _group(dmodel))


def _raise_everywhere(problem: str | None, rank: int, group) -> None:
    """Rank 0's verdict, on every rank (so no rank waits for a peer that raised)."""
    box = [problem]
    dist.broadcast_object_list(box, src=0, group=group)
    if box[0] is not None:
        raise CheckpointError(box[0])


def _layout(dmodel) -> dict:
    plan = dmodel.plan
    return {"world_size": dist.get_world_size(), "kind": plan.kind, "attention_ranks": list(plan.attention_ranks),
            "expert_ranks": list(plan.expert_ranks), "expert_placement": [list(r) for r in plan.expert_placement],
            "pipeline_depth": plan.pipeline_depth}


def _commit(dmodel, opts, path: str, partial: str, step: int | None) -> None:
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "optimizer": bool(opts),
                "model_class": type(dmodel._model).__name__, "layout": _layout(dmodel)}
    tmp = os.path.join(partial, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(partial, MANIFEST))
    old = _old(path)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
        os.rename(path, old)
    # The one window where path is missing: between these renames (load then names both).
    os.rename(partial, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))  # the renames survive a power cut
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- load
def _read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if os.path.exists(file):
        with open(file) as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
            raise CheckpointError(f"path {path!r}: {MANIFEST} is format {manifest.get('format')!r} version "
                                  f"{manifest.get('version')!r}; this fxdisag reads {FORMAT!r} up to version {VERSION}")
        return manifest
    partial = _partial(path)
    if os.path.exists(path):
        raise CheckpointError(f"path {path!r} has no {MANIFEST}: the save that wrote it was incomplete (or it is not "
                              "a fxdisag checkpoint); load a checkpoint fxdisag.save committed")
    if os.path.exists(os.path.join(partial, MANIFEST)) and os.path.exists(_old(path)):
        raise CheckpointError(f"no checkpoint at {path!r}: a save was interrupted while committing; the new checkpoint "
                              f"is complete in {partial!r} (the previous one in {_old(path)!r}): rename one to {path!r}")
    if os.path.exists(partial):
        raise CheckpointError(f"no checkpoint at {path!r}: the save to it was incomplete (it died before committing; "
                              f"its partial files are in {partial!r}); load an earlier checkpoint")
    raise CheckpointError(f"no checkpoint at {path!r} (no such directory)")


def _init_optimizer_state(o: torch.optim.Optimizer) -> None:
    """Create the state tensors of an optimizer that has not stepped yet, without moving
    any parameter: zero gradients, one step at lr 0 (torch's ``_init_optim_state``)."""
    params = [p for g in o.param_groups for p in g["params"] if p.requires_grad]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g.get("lr") for g in o.param_groups]
    for g in o.param_groups:
        if "lr" in g:
            g["lr"] = torch.zeros_like(g["lr"]) if torch.is_tensor(g["lr"]) else 0.0
    try:
        o.step()
    finally:
        for g, lr in zip(o.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p, grad in zip(params, grads):
            p.grad = grad


def load(dmodel, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
         path: str | os.PathLike) -> dict:
    """Load the checkpoint ``path`` into ``dmodel`` (and ``optimizer``), resharding as needed.

    Collective. The checkpoint may come from any plan of the same model: each rank reads
    the rows it holds. Returns the manifest (``step``, the writing ``layout``). Raises
    :class:`CheckpointError` on every rank for an incomplete save, a checkpoint of another
    model (naming the missing key), a weights-only checkpoint loaded with an optimizer, or
    a param group whose parameters were saved with different hyper-parameters.
    """
    path = os.fspath(path)
    manifest = _read_manifest(path)  # the same files on every rank: the same verdict, no collective
    opts = _optimizers(optimizer)
    reader = dcp.FileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    problem, locals_, entries = None, [], []
    try:
        if opts and not manifest.get("optimizer"):
            raise CheckpointError(f"path {path!r} holds weights only (saved with optimizer=None): pass "
                                  "optimizer=None, or save a checkpoint with the optimizer")
        locals_ = _locals(dmodel)
        entries = _optim_names(opts, locals_)
    except CheckpointError as e:
        problem = str(e)
    _agree(problem, _group(dmodel))
    # Phase 1: the hyper-parameters (small objects), checked before any tensor moves.
    hyper = {f"optim.param_groups.{loc.name}.{key}": group[key]
             for _, group, _, loc in entries for key in group
             if key != "params" and f"optim.param_groups.{loc.name}.{key}" in saved}
    _dcp_load(hyper, reader, _group(dmodel))
    problem = _apply_hyper(opts, entries, hyper)
    _agree(problem, _group(dmodel))
    for o in opts:
        if not o.state:
            _init_optimizer_state(o)
    # Phase 2: the tensors, into the live parameters and state where they are this rank's rows as they are.
    state: dict[str, Any] = {}
    copies: list[tuple[_Local, torch.Tensor, torch.Tensor, bool]] = []  # (owner, tensor, buffer DCP fills, rows)
    problem = None

    def want(loc: _Local, t: torch.Tensor, key: str) -> None:
        sharded = loc.ids is not None and t.dim() > 0 and t.shape == loc.tensor.shape
        full = loc.full_shape if sharded else t.shape
        md = saved.get(key)
        if md is None:
            raise CheckpointError(f"checkpoint {path!r} has no {key!r} (written from another model, or with other "
                                  f"layers?); its keys start {sorted(saved)[:3]}: load a checkpoint of this model")
        if getattr(md, "size", None) is not None and tuple(md.size) != tuple(full):
            raise CheckpointError(f"checkpoint {path!r}: {key!r} has shape {tuple(md.size)}, this model's is "
                                  f"{tuple(full)}: a checkpoint of another configuration")
        buf = loc.rows_of(t) if sharded else t.detach()
        if buf.data_ptr() != t.data_ptr() or not buf.is_contiguous():
            buf = buf.contiguous().clone()  # rows picked out of a full experts tensor: copied back after
            copies.append((loc, t, buf, sharded))
        state[key] = _sharded(buf, full, _runs(loc.ids, set())) if sharded else buf

    try:
        for loc in locals_:
            want(loc, loc.tensor, loc.name)
        for o, group, p, loc in entries:
            prefix = f"optim.state.{loc.name}."
            has_saved = any(k.startswith(prefix) for k in saved)
            if o.state.get(p) and not has_saved:
                o.state.pop(p)  # it had no state when saved (never had a gradient): the same now
            elif has_saved and not o.state.get(p):
                raise CheckpointError(f"optimizer has no state for {loc.name!r} (it stepped, but never with a gradient "
                                      "for it) while the checkpoint has: load into an optimizer that has not stepped")
            for key, value in o.state.get(p, {}).items():
                if torch.is_tensor(value):
                    want(loc, value, prefix + key)
                elif prefix + key in saved:
                    state[prefix + key] = value
    except CheckpointError as e:
        problem = str(e)
    _agree(problem, _group(dmodel))
    _dcp_load(state, reader, _group(dmodel))
    for loc, t, buf, rows in copies:
        loc.write_back(t, buf, rows)
    for o, group, p, loc in entries:  # non-tensor state comes back as new objects
        prefix = f"optim.state.{loc.name}."
        for key, value in list(o.state.get(p, {}).items()):
            if not torch.is_tensor(value) and prefix + key in state:
                o.state[p][key] = state[prefix + key]
    return manifest


def _dcp_load(state: dict[str, Any], reader, group) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ST_DEPRECATED)
        dcp.load(state, storage_reader=reader, process_group=group)


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def _apply_hyper(opts, entries, hyper: dict[str, Any]) -> str | None:
    """Set each param group's saved hyper-parameters; a group whose parameters were saved with
    different values cannot take both: the problem, else None."""
    chosen: dict[tuple[int, str], tuple[str, Any]] = {}
    for o, group, _, loc in entries:
        for key in group:
            k = f"optim.param_groups.{loc.name}.{key}"
            if key == "params" or k not in hyper:
                continue
            first = chosen.setdefault((id(group), key), (loc.name, hyper[k]))
            if not _same(first[1], hyper[k]):
                return (f"optimizer: one param group holds {first[0]!r} (saved with {key}={first[1]!r}) and "
                        f"{loc.name!r} (saved with {key}={hyper[k]!r}); build the param groups as when saved "
                        "(one optimizer or group per set of hyper-parameters)")
    groups = {id(g): g for _, g, _, _ in entries}
    for (gid, key), (_, value) in chosen.items():
        groups[gid][key] = value
    return None


def _agree(problem: str | None, group) -> None:
    """Raise on every rank if any rank found a problem (before a collective it would skip)."""
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, problem, group=group)
    for r, p in enumerate(every):
        if p is not None:
            raise CheckpointError(p if r == dist.get_rank() else f"on rank {r}: {p}")


# ---- export
def export_hf(dmodel, path: str | os.PathLike, **save_pretrained_kwargs: Any) -> None:
    """Write the full model as an HF directory at ``path`` (``from_pretrained`` loads it).

    Collective: every rank sends its pieces to rank 0, which alone assembles and writes;
    everyone returns once the directory is written. ``save_pretrained_kwargs`` go to
    ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    path = os.fspath(path)
    rank = dist.get_rank()
    owned = dmodel._owned(grads=False)
    if dmodel.has_attention and dmodel._writes_attention():
        for name, t, ids, _ in dmodel.named_local_tensors():  # persistent buffers (e.g. DeepSeek's bias)
            if ids is None and name not in owned:
                owned[name] = (None, t.detach().cpu())
    pieces: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(owned, pieces, dst=0, group=_group(dmodel))
    problem = None
    if rank == 0:
        try:
            full = _assemble(dmodel, pieces)
            dmodel._model.save_pretrained(path, state_dict=full, **save_pretrained_kwargs)
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            problem = f"fxdisag.export_hf({path!r}) failed on rank 0: {e!r}"
        del pieces
    _raise_everywhere(problem, rank, _group(dmodel))


def _assemble(dmodel, pieces: Iterable[dict]) -> dict[str, torch.Tensor]:
    shapes = {n: p.shape for n, p in dmodel._model.named_parameters()}
    full: dict[str, torch.Tensor] = {}
    for owned in pieces:
        for name, (ids, t) in owned.items():
            if ids is None:
                full[name] = t
                continue
            if name not in full:
                full[name] = torch.zeros(shapes[name], dtype=t.dtype)
            full[name][list(ids)] = t
    missing = [n for n in shapes if n not in full]
    if missing:
        raise CheckpointError(f"no rank holds {missing[:3]}: the plan leaves parameters unowned")
    return full
