"""The pipeline hop: what the attention side hands from one attention group to the next.

Contract:

* ``hop_values(program)[s]`` -- for every cut s (between attention stages s and s+1), the
  names of the values produced by stages <= s and read by a stage > s, in a fixed order.
  Program inputs and constants are not among them (every rank of the same slot holds the
  same batch shard and the same constants); nor is the expert output ``ys`` of a boundary
  (it comes from the expert group, on channel C). When cut s is a hop (stages s and s+1
  on different groups) these values are the H message of cut s, so the residual stream,
  the mask, the rotary tables, the combine's inverse permutation and anything else the
  model keeps live cross it explicitly, by name;
* ``encode(values) -> (payload, grad_layout)`` and ``decode(payload) -> (values,
  grad_layout)``: one flat ``uint8`` message holding a pickled descriptor (names, pytree
  structure, shapes, dtypes, ``requires_grad`` and non-tensor leaves) and the tensors. A
  tensor that needs a gradient must be a value of its own: a container (tuple, list,
  dict) holding one is refused, naming the value, because its gradient could not come
  back on GH;
* ``grad_layout``: the (name, shape, dtype) of every value that needs a gradient, in
  order: the GH message of the cut carries exactly these gradients, packed in this order
  (a value whose gradient never arrived goes as zeros).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping

import torch
from torch.utils import _pytree as pytree

from fxdisag.codegen.split_stages import StagedProgram
from fxdisag.runtime.mailbox import pack_bytes, unpack_bytes

__all__ = ["GradLayout", "decode", "encode", "hop_values"]

GradLayout = list[tuple[str, tuple[int, ...], torch.dtype]]


def hop_values(program: StagedProgram) -> list[list[str]]:
    """Per cut s = 0..J-1: the values live across it (see the module docstring)."""
    produced_at: dict[str, int] = {}
    for stage in program.stages:
        for name in stage.outputs:
            produced_at.setdefault(name, stage.index)
    from_experts = {b.ys for b in program.boundaries}
    out: list[list[str]] = []
    for s in range(len(program.stages) - 1):
        names: list[str] = []
        for later in program.stages[s + 1:]:
            for name in later.inputs:
                if name in from_experts or name in names:
                    continue
                if produced_at.get(name, s + 1) <= s:
                    names.append(name)
        out.append(names)
    return out


def encode(values: Mapping[str, object]) -> tuple[torch.Tensor, GradLayout]:
    """Pack ``values`` (name -> value) into one message."""
    entries, tensors, grad_layout = [], [], []
    for name, value in values.items():
        leaves, spec = pytree.tree_flatten(value)
        info = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if leaf.requires_grad and not isinstance(value, torch.Tensor):
                    raise NotImplementedError(
                        f"value {name!r} crosses a pipeline hop as a {type(value).__name__} holding a tensor that "
                        "needs a gradient; fxdisag sends gradients back only for values that are tensors themselves. "
                        "Use pipeline_depth=1 for this model, or a layer assignment that keeps the producer and its "
                        "readers on one attention group")
                info.append(("t", tuple(leaf.shape), leaf.dtype, leaf.requires_grad))
                tensors.append(leaf)
                if leaf.requires_grad:
                    grad_layout.append((name, tuple(leaf.shape), leaf.dtype))
            else:
                info.append(("v", leaf))
        entries.append((name, pytree.treespec_dumps(spec), info))
    descriptor = pickle.dumps(entries)
    head = torch.tensor([len(descriptor)], dtype=torch.int64)
    body = torch.frombuffer(bytearray(descriptor), dtype=torch.uint8) if descriptor else torch.empty(0, dtype=torch.uint8)
    device = tensors[0].device if tensors else torch.device("cpu")  # one buffer, on the tensors' device
    return pack_bytes([head.to(device), body.to(device)] + tensors), grad_layout


def decode(payload: torch.Tensor) -> tuple[dict[str, object], GradLayout]:
    """Unpack a message made by :func:`encode`; tensors that needed a gradient need one again."""
    n = int(payload[:8].view(torch.int64).item())
    body = -(-n // 8) * 8
    entries = pickle.loads(payload[8:8 + n].cpu().numpy().tobytes())
    layout = [(i[1], i[2]) for _, _, info in entries for i in info if i[0] == "t"]
    tensors = iter(unpack_bytes(payload[8 + body:], layout))
    values: dict[str, object] = {}
    grad_layout: GradLayout = []
    for name, spec, info in entries:
        leaves = []
        for item in info:
            if item[0] == "v":
                leaves.append(item[1])
                continue
            t = next(tensors).clone()
            if item[3]:
                t.requires_grad_(True)
                grad_layout.append((name, item[1], item[2]))
            leaves.append(t)
        values[name] = pytree.tree_unflatten(leaves, pytree.treespec_loads(spec))
    return values, grad_layout
