"""Profiles of deep models from a few of their layers: decoder layers repeat, so profile a
prefix and three periods of them and repeat the middle period.

Contract
--------
* ``layer_pattern(model) -> (prefix, period)``: the smallest dense-or-odd prefix P and
  period q such that decoder layer l >= P is built exactly like layer P + (l - P) mod q
  (same submodule types, parameter shapes, attention kind from ``config.layer_types``
  and sliding window), minimising P + 3q.
* ``extend_profile(short, num_layers, prefix, period) -> ModelProfile``: ``short``
  profiles a model of P + 3q layers (the prefix, a first, a middle and a last period);
  the result is the profile of the same model with ``num_layers`` layers: prefix and
  first period as measured, the middle period repeated, the last period last (the last
  layers differ: nothing after them reads the rotary tables, so their hop carries less).
  Regions, MoE layers, ``stage_params`` and ``hop_bytes`` are renumbered.
* ``profile_repeating(build, num_layers, ...)``: ``build(n)`` makes the model with its
  first n layers; profiles ``build(P + 3q)`` and extends it when that is shorter, else
  profiles ``build(num_layers)``.

Exactness: the extended profile equals the profile of the full model field by field
(tested on registry models with dense prefixes and with alternating attention). It holds
as long as what a layer costs depends only on its own construction, which the pattern
checks.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable

from torch import nn

__all__ = ["extend_profile", "layer_pattern", "profile_repeating"]


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layer list at model.layers; cannot find its pattern")
    return layers


def _signature(model: nn.Module, index: int, layer: nn.Module) -> tuple:
    parts = []
    for name, mod in layer.named_modules():
        shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in mod.named_parameters(recurse=False))
        parts.append((name, type(mod).__name__, shapes, getattr(mod, "sliding_window", None)))
    types = getattr(getattr(model, "config", None), "layer_types", None)
    return tuple(parts), (types[index] if types and index < len(types) else None)


def layer_pattern(model: nn.Module, max_period: int = 4) -> tuple[int, int]:
    """(prefix, period) of the decoder layers (module docstring)."""
    layers = _decoder_layers(model)
    sig = [_signature(model, i, layer) for i, layer in enumerate(layers)]
    N = len(sig)
    best = (N, 1)
    for P in range(N + 1):
        for q in range(1, max_period + 1):
            if P + 3 * q >= best[0] + 3 * best[1]:
                break
            if (N - P) % q == 0 and all(sig[l] == sig[P + (l - P) % q] for l in range(P, N)):
                best = (P, q)
                break
    return best


def _source(layer: int, num_layers: int, prefix: int, period: int) -> int:
    """The layer of the short model that layer ``layer`` of the long one is built like."""
    short = prefix + 3 * period
    if layer < prefix + period:
        return layer
    if layer >= num_layers - period:
        return layer - (num_layers - short)
    return prefix + period + (layer - prefix) % period


def extend_profile(short, num_layers: int, prefix: int, period: int):
    """The profile of ``num_layers`` layers from one of ``prefix + 3 period`` (module docstring)."""
    n_short = prefix + 3 * period
    if short.num_layers != n_short:
        raise ValueError(f"extend_profile: the short profile has {short.num_layers} layers; prefix {prefix} and "
                         f"period {period} need {n_short}")
    if num_layers < n_short or (num_layers - prefix) % period:
        raise ValueError(f"extend_profile: {num_layers} layers are not prefix {prefix} + whole periods of {period} "
                         f"(at least {n_short} layers)")
    by_layer: dict[int, list] = {}
    before, after = [], []
    for r in short.regions:
        if r.layer is None:
            (after if by_layer else before).append(r)
        else:
            by_layer.setdefault(r.layer, []).append(r)
    regions = list(before)
    for layer in range(num_layers):
        src = _source(layer, num_layers, prefix, period)
        regions += [dataclasses.replace(r, layer=layer, modules=[_renamed(m, src, layer) for m in r.modules])
                    for r in by_layer.get(src, [])]
    regions += after
    moe_of = {m.layer: j for j, m in enumerate(short.moe)}
    sources = [moe_of[src] for src in (_source(l, num_layers, prefix, period) for l in range(num_layers))
               if src in moe_of]  # per MoE layer of the long model: its MoE layer in the short one
    moe_layers = [l for l in range(num_layers) if _source(l, num_layers, prefix, period) in moe_of]
    moe = [dataclasses.replace(short.moe[j], layer=l, shared_module=_renamed(short.moe[j].shared_module,
                                                                             short.moe[j].layer, l)
                               if short.moe[j].shared_module else "") for j, l in zip(sources, moe_layers)]
    hops = [short.hop_bytes[j] for j in sources] if short.hop_bytes else []
    stages = []
    if short.stage_params:  # stage 0 (embedding, prefix) and the last (head) as measured; stage j >= 1 like its source
        stages = [short.stage_params[0]] + [short.stage_params[j] for j in sources[1:]] + [short.stage_params[-1]]
    return dataclasses.replace(short, num_layers=num_layers, regions=regions, moe=moe, hop_bytes=hops,
                               stage_params=stages)


def _renamed(module: str, src: int, layer: int) -> str:
    return re.sub(rf"(^|\.)layers\.{src}(\.|$)", rf"\g<1>layers.{layer}\g<2>", module)


def profile_repeating(build: Callable[[int], nn.Module], num_layers: int, profile_fn: Callable, *,
                      log: Callable[[str], None] | None = None):
    """Profile ``build(num_layers)`` from its shortest repeating form (module docstring).

    ``profile_fn(model) -> ModelProfile`` captures and profiles one model."""
    full = build(num_layers)
    prefix, period = layer_pattern(full)
    short_layers = prefix + 3 * period
    if short_layers >= num_layers:
        return profile_fn(full)
    start = time.perf_counter()
    short = profile_fn(build(short_layers))
    out = extend_profile(short, num_layers, prefix, period)
    if log:
        log(f"profiled {short_layers} of {num_layers} layers (prefix {prefix}, period {period}) in "
            f"{time.perf_counter() - start:.1f} s; the other layers repeat the middle period")
    return out
