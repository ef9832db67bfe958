"""Build only your own part: a rank materializes the tensors it computes with, nothing else.

Contract
--------
``disaggregate`` accepts a model built on the meta device (every parameter on meta)::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    dmodel = fxdisag.disaggregate(model, batch, plan, weights="path/to/hf_dir")  # or seed=0

After the plan binds the rank's stages and experts, each rank gives real storage to its
own tensors only -- the parameters and buffers of its attention stages, the rows of its
experts in the 3-D expert tensors -- *in place* (``torch.utils.swap_tensors``: every
object holding the tensor, the stage programs included, sees the new storage). Everything
else stays on meta, so a rank's resident weight bytes are its share, never the model.

Where the values come from (:class:`WeightSource`):

* :class:`HFCheckpoint` -- an HF directory written by ``save_pretrained`` (one
  ``model.safetensors`` or shards with ``model.safetensors.index.json``). Each tensor is
  read with safetensors' ``safe_open(...).get_slice``: an expert rank reads only its
  experts' rows. transformers 5 writes routed experts one tensor per expert
  (``...experts.3.gate_proj.weight``) and fuses them on load; the fusion rules are
  transformers' own (``conversion_mapping.get_checkpoint_conversion_mapping``: renamings
  plus ``MergeModulelist(dim=0)`` and ``Concatenate``), applied here per expert row.
  Before anything is read the whole checkpoint is checked against the model: a missing,
  unexpected or mis-shaped tensor is an error naming the tensor and its file. Values are
  cast to the model's dtype. Non-persistent buffers (rotary ``inv_freq``) are computed by
  the model's own ``_init_weights``.
* :class:`SeededInit` -- no checkpoint: each module is initialised by the model's own
  ``_init_weights`` under ``torch.manual_seed(module_seed(seed, fqn))``; a routed experts
  module is initialised whole, one layer at a time, and the rank keeps its rows. The
  result depends on ``seed`` and the module's name only, not on the layout or the global
  RNG: :func:`init_weights` applied to an eager model gives the same values, tensor for
  tensor (what the tests compare against).

Pseudo-code::

    source = HFCheckpoint(path, model) if weights else SeededInit(model, seed)
    source.check()                                    # whole checkpoint vs model, names + shapes
    materialize(model, stage_tensors, source)         # attention side: in place
    source.fill_experts(fqn, local_module, expert_ids) # expert side: the rank's rows
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = ["HFCheckpoint", "SeededInit", "WeightSource", "init_weights", "is_meta_model", "materialize",
           "module_seed"]

log = logging.getLogger("fxdisag")


def is_meta_model(model: nn.Module) -> bool:
    """True when every parameter is on meta; a model partly on meta is an error."""
    params = list(model.named_parameters())
    meta = [n for n, p in params if p.is_meta]
    if meta and len(meta) != len(params):
        real = next(n for n, p in params if not p.is_meta)
        raise ValueError(
            f"the model is partly on the meta device ({meta[0]!r} is meta, {real!r} is not). Build it wholly "
            "on meta (`with torch.device('meta'): AutoModelForCausalLM.from_config(cfg)`) to let each rank "
            "materialize its own part, or wholly on a real device")
    return bool(meta)


def module_seed(seed: int, fqn: str) -> int:
    """The RNG seed of the module named ``fqn``: a function of the two only."""
    return (int(seed) * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63)


def _owners(model: nn.Module) -> dict[int, tuple[str, str, bool]]:
    """id(tensor) -> (owning module's FQN, attribute, is_parameter), first owner wins."""
    out: dict[int, tuple[str, str, bool]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod._parameters.items():
            if p is not None:
                out.setdefault(id(p), (mname, attr, True))
        for attr, b in mod._buffers.items():
            if b is not None:
                out.setdefault(id(b), (mname, attr, False))
    return out


def _qualify(module: str, attr: str) -> str:
    return f"{module}.{attr}" if module else attr


def _swap_in(t: torch.Tensor, value: torch.Tensor) -> None:
    """Give ``t`` (a meta tensor) ``value``'s storage, keeping the Python object."""
    if isinstance(t, nn.Parameter):
        value = nn.Parameter(value, requires_grad=t.requires_grad)
    try:
        torch.utils.swap_tensors(t, value)
    except RuntimeError as exc:
        if "weakref" not in str(exc):
            raise
        raise RuntimeError(
            "cannot give a meta tensor of the model storage in place: something holds a weak reference to it "
            "(a FakeTensorMode's memo, e.g. from a torch.compile or a profile run on this model before "
            "disaggregate). Build the meta model fresh and pass it to fxdisag.disaggregate directly") from exc


# --------------------------------------------------------------------------- sources

class WeightSource:
    """Where a rank's tensors get their values (see the module docstring)."""

    def check(self) -> None:  # pragma: no cover - interface
        ...

    def fill_module(self, fqn: str, module: nn.Module, tensors: Sequence[str]) -> None:  # pragma: no cover
        """Give values to ``module``'s direct tensors named in ``tensors`` (already real, empty)."""
        raise NotImplementedError

    def fill_experts(self, fqn: str, full: nn.Module, local: nn.Module, expert_ids: Sequence[int]) -> None:  # pragma: no cover
        """Give values to the rank's experts module ``local`` (rows ``expert_ids`` of ``full``)."""
        raise NotImplementedError


class SeededInit(WeightSource):
    """The model's own ``_init_weights``, module by module, under a per-module seed."""

    def __init__(self, model: nn.Module, seed: int = 0):
        if not hasattr(model, "_init_weights"):
            raise TypeError(
                f"{type(model).__name__} has no _init_weights (not a transformers PreTrainedModel): a model built "
                "on the meta device needs weights='path/to/hf_dir' to get its values")
        self.model = model
        self.seed = int(seed)

    def check(self) -> None:
        pass

    def _init(self, fqn: str, module: nn.Module) -> None:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(module_seed(self.seed, fqn))
            self.model._init_weights(module)

    def fill_module(self, fqn: str, module: nn.Module, tensors: Sequence[str]) -> None:
        self._init(fqn, module)

    def fill_experts(self, fqn: str, full: nn.Module, local: nn.Module, expert_ids: Sequence[int]) -> None:
        # Initialised whole (one layer's experts at a time): values must not depend on which
        # rank holds which rows.
        whole = _real_copy(full)
        self._init(fqn, whole)
        _copy_rows(whole, local, expert_ids)


def _real_copy(experts: nn.Module) -> nn.Module:
    whole = copy.deepcopy(experts)  # meta: no storage copied
    return whole.to_empty(device="cpu")


def _copy_rows(whole: nn.Module, local: nn.Module, expert_ids: Sequence[int]) -> None:
    ids = torch.tensor(list(expert_ids), dtype=torch.long)
    with torch.no_grad():
        for name, p in local.named_parameters(recurse=False):
            p.copy_(getattr(whole, name)[ids])
        for name, b in local.named_buffers(recurse=False):
            src = getattr(whole, name)
            b.copy_(src if src.shape == b.shape else src[ids])


@dataclass
class _Whole:
    file: str
    key: str


@dataclass
class _PerExpert:
    """An expert tensor stored one tensor per expert: rows[e] = cat(parts[k][e], dim)."""

    parts: list[dict[int, tuple[str, str]]] = field(default_factory=list)  # k -> expert -> (file, key)
    dim: int = 0  # concatenation dim of the parts, per expert row


class HFCheckpoint(WeightSource):
    """Values from an HF ``save_pretrained`` directory of safetensors shards."""

    def __init__(self, path: str | os.PathLike, model: nn.Module):
        self.path = Path(path)
        self.model = model
        self.files = self._files()
        self.index, self._source_of = self._build_index()
        self.persistent = _persistent_tensors(model)
        self._init = SeededInit(model, 0) if hasattr(model, "_init_weights") else None

    # ---- index
    def _files(self) -> dict[str, str]:
        """checkpoint key -> file name (relative to the directory)."""
        from safetensors import safe_open

        if not self.path.is_dir():
            raise FileNotFoundError(f"weights={str(self.path)!r} is not a directory; pass the directory that "
                                    "save_pretrained wrote (with model.safetensors or model.safetensors.index.json)")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            for f in sorted(set(weight_map.values())):
                if not (self.path / f).exists():
                    raise FileNotFoundError(f"{index} names shard {f!r}, which is not in {self.path}")
            return dict(weight_map)
        shards = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors in {self.path}: fxdisag reads the safetensors shards "
                                    "save_pretrained writes (save with safe_serialization=True)")
        out: dict[str, str] = {}
        for f in shards:
            with safe_open(self.path / f, "pt") as h:
                for k in h.keys():
                    out[k] = f
        return out

    def _build_index(self):
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        rules = (get_checkpoint_conversion_mapping(model_type) or []) if model_type else []
        renames, converters = [], []
        for rule in rules:
            kind = type(rule).__name__
            if kind == "WeightRenaming":
                renames += list(zip(rule.source_patterns, rule.target_patterns))
            elif kind == "WeightConverter":
                converters.append(_converter(rule))
            else:
                raise NotImplementedError(f"checkpoint conversion rule {kind} of model type {model_type!r}")
        index: dict[str, _Whole | _PerExpert] = {}
        source_of: dict[str, str] = {}  # checkpoint key -> model key it feeds
        for key, file in self.files.items():
            name = key
            for src, dst in renames:
                name = re.sub(src, dst, name)
            for conv in converters:
                hit = conv.match(name)
                if hit is None:
                    continue
                target, part, expert = hit
                entry = index.setdefault(target, _PerExpert([{} for _ in conv.sources], conv.dim))
                if not isinstance(entry, _PerExpert):
                    raise ValueError(f"{target!r} is in {self.path} both whole and per expert ({key!r} in {file})")
                entry.parts[part][expert] = (file, key)
                source_of[key] = target
                break
            else:
                if name in index:
                    raise ValueError(f"two checkpoint tensors map to {name!r}: {key!r} ({file}) and another")
                index[name] = _Whole(file, key)
                source_of[key] = name
        return index, source_of

    # ---- checks
    def _shape(self, file: str, key: str) -> list[int]:
        from safetensors import safe_open

        with safe_open(self.path / file, "pt") as h:
            return list(h.get_slice(key).get_shape())

    def check(self) -> None:
        """Every persistent tensor of the model is in the checkpoint with its shape, and
        every checkpoint tensor feeds one (errors name the tensor and the file)."""
        want = self.persistent
        missing = sorted(set(want) - set(self.index))
        if missing:
            raise KeyError(f"{len(missing)} tensor(s) of the model are not in the checkpoint {self.path}: "
                           f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (files: {sorted(set(self.files.values()))})."
                           " Was it saved from another model or config?")
        extra = sorted(k for k, target in self._source_of.items() if target not in want)
        if extra:
            raise KeyError(f"{len(extra)} tensor(s) in the checkpoint {self.path} are not in the model: "
                           + ", ".join(f"{k!r} ({self.files[k]})" for k in extra[:5])
                           + (" ..." if len(extra) > 5 else "") + ". Was it saved from another model or config?")
        for name, entry in self.index.items():
            shape = list(want[name])
            if isinstance(entry, _Whole):
                got = self._shape(entry.file, entry.key)
                if got != shape:
                    raise ValueError(f"checkpoint tensor {entry.key!r} ({entry.file}) has shape {got}; the model's "
                                     f"{name!r} has {shape}")
                continue
            E = shape[0]
            row = [0] * (len(shape) - 1)
            for k, part in enumerate(entry.parts):
                absent = sorted(set(range(E)) - set(part))
                if absent or len(part) != E:
                    raise KeyError(f"the checkpoint {self.path} has {len(part)} of the {E} experts of {name!r} "
                                   f"(part {k}); missing expert(s) {absent[:5]}")
                file, key = part[0]
                got = self._shape(file, key)
                last_file, last_key = part[E - 1]  # the last expert too: a truncated save shows there
                last = self._shape(last_file, last_key)
                if last != got:
                    raise ValueError(f"checkpoint tensor {last_key!r} ({last_file}) has shape {last}, "
                                     f"expert 0's {key!r} has {got}")
                if len(got) != len(row):
                    raise ValueError(f"checkpoint tensor {key!r} ({file}) has shape {got}; one expert's row of "
                                     f"{name!r} has {shape[1:]}")
                for d, n in enumerate(got):
                    row[d] = row[d] + n if d == entry.dim else n
            if row != shape[1:]:
                raise ValueError(f"the checkpoint tensors of {name!r} ({entry.parts[0][0][1]!r}, ... in "
                                 f"{entry.parts[0][0][0]}) give experts of shape {row}; the model has {shape[1:]}")

    # ---- reads
    def read(self, name: str, rows: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The model tensor ``name`` (only ``rows`` of dim 0 for an expert tensor)."""
        from safetensors import safe_open

        entry = self.index.get(name)
        if entry is None:
            raise KeyError(f"{name!r} is not in the checkpoint {self.path}")
        if isinstance(entry, _Whole):
            with safe_open(self.path / entry.file, "pt") as h:
                sl = h.get_slice(entry.key)
                if rows is None:
                    t = sl[:]
                else:
                    t = torch.cat([sl[a:b] for a, b in _runs(rows)]) if rows else sl[0:0]
        else:
            if rows is None:
                rows = range(len(entry.parts[0]))
            out = []
            for e in rows:
                pieces = []
                for part in entry.parts:
                    file, key = part[e]
                    with safe_open(self.path / file, "pt") as h:
                        pieces.append(h.get_tensor(key))
                out.append(torch.cat(pieces, dim=entry.dim))
            t = torch.stack(out)
        return t.to(dtype) if dtype is not None else t

    def fill_module(self, fqn: str, module: nn.Module, tensors: Sequence[str]) -> None:
        computed = [a for a in tensors if _qualify(fqn, a) not in self.persistent]
        if computed:  # non-persistent buffers (rotary inv_freq): the model's own init computes them
            if self._init is None:
                raise ValueError(f"{_qualify(fqn, computed[0])!r} is not in the checkpoint and "
                                 f"{type(self.model).__name__} has no _init_weights to compute it")
            self._init.fill_module(fqn, module, tensors)
        with torch.no_grad():
            for attr in tensors:
                name = _qualify(fqn, attr)
                if name in self.persistent:
                    t = getattr(module, attr)
                    t.copy_(self.read(name, dtype=t.dtype))

    def fill_experts(self, fqn: str, full: nn.Module, local: nn.Module, expert_ids: Sequence[int]) -> None:
        with torch.no_grad():
            for attr, p in local.named_parameters(recurse=False):
                p.copy_(self.read(_qualify(fqn, attr), rows=expert_ids, dtype=p.dtype))
            for attr, b in local.named_buffers(recurse=False):
                name = _qualify(fqn, attr)
                if name not in self.persistent:
                    raise NotImplementedError(f"experts buffer {name!r} is not persistent: fxdisag cannot compute "
                                              "a slice of it without the whole module")
                b.copy_(self.read(name, rows=expert_ids if b.shape != getattr(full, attr).shape else None,
                                  dtype=b.dtype))


@dataclass
class _Converter:
    sources: list[re.Pattern]
    target: str
    dim: int

    def match(self, name: str) -> tuple[str, int, int] | None:
        for k, pattern in enumerate(self.sources):
            m = pattern.search(name)
            if m:
                return name[:m.start()] + self.target + name[m.end():], k, int(m.group(1))
        return None


def _converter(rule) -> _Converter:
    ops = [(type(o).__name__, getattr(o, "dim", None)) for o in rule.operations]
    sources = list(rule.source_patterns)
    targets = list(rule.target_patterns)
    dim = 0
    if ops and ops[0] == ("MergeModulelist", 0) and len(targets) == 1:
        if len(ops) == 1 and len(sources) == 1:
            dim = 0
        elif len(ops) == 2 and ops[1][0] == "Concatenate" and ops[1][1] >= 1:
            dim = ops[1][1] - 1  # concatenated after stacking: one dim less per expert row
        else:
            ops = None
    else:
        ops = None
    if ops is None or any(s.count("*") != 1 for s in sources):
        raise NotImplementedError(
            f"checkpoint conversion {sources} -> {targets} with operations "
            f"{[type(o).__name__ for o in rule.operations]}: fxdisag reads per-expert slices for "
            "MergeModulelist(dim=0) [+ Concatenate] only; save the checkpoint with fused expert tensors instead")
    patterns = [re.compile(re.escape(s).replace(r"\*", r"(\d+)")) for s in sources]
    return _Converter(patterns, targets[0], dim)


def _runs(rows: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous [a, b) runs of ``rows``, in order (get_slice takes ranges, not lists)."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        r = int(r)
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def _persistent_tensors(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """What ``model.state_dict()`` holds, name -> shape, without touching storage (tied
    tensors once, under their first name, as save_pretrained writes them)."""
    out: dict[str, tuple[int, ...]] = {}
    seen: set[int] = set()
    for mname, mod in model.named_modules():
        for attr, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out[_qualify(mname, attr)] = tuple(p.shape)
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set and id(b) not in seen:
                seen.add(id(b))
                out[_qualify(mname, attr)] = tuple(b.shape)
    return out


# --------------------------------------------------------------------------- materialize

def materialize(model: nn.Module, tensors: Iterable[torch.Tensor], source: WeightSource,
                device: torch.device | str = "cpu") -> int:
    """Give real storage on ``device`` and values from ``source`` to ``tensors`` (meta
    tensors of ``model``: parameters or buffers), in place. Returns the bytes materialized."""
    owners = _owners(model)
    by_module: dict[str, list[str]] = {}
    for t in tensors:
        if not t.is_meta:
            continue
        if id(t) not in owners:
            raise ValueError("a tensor to materialize is not a parameter or buffer of the model")
        mname, attr, _ = owners[id(t)]
        names = by_module.setdefault(mname, [])
        if attr not in names:
            names.append(attr)
    total = 0
    for mname, attrs in by_module.items():
        module = model.get_submodule(mname)
        for attr in attrs:
            t = getattr(module, attr)
            if t.is_meta:
                _swap_in(t, torch.empty(t.shape, dtype=t.dtype, device=device))
                total += t.numel() * t.element_size()
        source.fill_module(mname, module, attrs)
    return total


def materialize_experts(model: nn.Module, fqn: str, local: nn.Module, source: WeightSource,
                        device: torch.device | str = "cpu") -> int:
    """Give the rank's experts module ``local`` (meta slices of the experts module ``fqn``)
    real storage and its rows' values."""
    total = 0
    for t in list(local.parameters(recurse=False)) + list(local.buffers(recurse=False)):
        if t.is_meta:
            _swap_in(t, torch.empty(t.shape, dtype=t.dtype, device=device))
            total += t.numel() * t.element_size()
    source.fill_experts(fqn, model.get_submodule(fqn), local, local.fxdisag_expert_ids)
    return total


def init_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Materialize a whole model (on meta or not) as :class:`SeededInit` does, in place:
    the eager twin of a disaggregated model built on meta with ``seed``."""
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    for t in tensors:  # a real model is re-initialised too
        if not t.is_meta:
            _swap_in(t, torch.empty(t.shape, dtype=t.dtype, device="meta"))
    materialize(model, tensors, SeededInit(model, seed))
    return model
