"""fxdisag: attention/expert disaggregation (AF-Pipe) for MoE training, as an FX graph transformation.

The data path, each step one public function with a plain data object in and out::

    captured = fxdisag.capture(model, example_inputs)             # region-tagged FX graph
    prof     = fxdisag.profile(captured, batch_size, seq_len)      # FLOPs and bytes per region
    plan     = fxdisag.plan(prof, cluster, global_batch)           # ranks, placement, micro-batches
    dmodel   = fxdisag.disaggregate(model, example_inputs, plan)   # this rank's part, trainable

or, the same path from dynamo's graph: ``torch.compile(model, backend="fxdisag")``
(``fxdisag.backend``; ``fxdisag.disaggregated(model)`` is the part it built).
"""

from fxdisag.capture import CapturedModel, CaptureError, RegionTag, capture
from fxdisag.layout import LayoutError, ModelLayout, MoELayer, find_layout

__all__ = [
    "CapturedModel",
    "CaptureError",
    "CheckpointError",
    "ClusterSpec",
    "DisaggregatedModel",
    "ExpertBalancer",
    "LayoutError",
    "ModelLayout",
    "MoELayer",
    "Plan",
    "RegionTag",
    "capture",
    "disaggregate",
    "disaggregated",
    "export_hf",
    "find_layout",
    "init_weights",
    "load",
    "plan",
    "profile",
    "save",
]

_LAZY = {
    "disaggregate": ("fxdisag.api", "disaggregate"),
    "disaggregated": ("fxdisag.backend", "disaggregated"),
    "DisaggregatedModel": ("fxdisag.api", "DisaggregatedModel"),
    "Plan": ("fxdisag.planner.plan", "Plan"),
    "plan": ("fxdisag.planner.search", "plan"),
    "profile": ("fxdisag.planner.profile", "profile"),
    "ClusterSpec": ("fxdisag.planner.cluster", "ClusterSpec"),
    "save": ("fxdisag.checkpoint", "save"),
    "load": ("fxdisag.checkpoint", "load"),
    "export_hf": ("fxdisag.checkpoint", "export_hf"),
    "CheckpointError": ("fxdisag.checkpoint", "CheckpointError"),
    "init_weights": ("fxdisag.weights", "init_weights"),
    "ExpertBalancer": ("fxdisag.balance", "ExpertBalancer"),
}


def __getattr__(name: str):
    # The runtime and planner import torch.distributed and sympy: load them on first use.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'fxdisag' has no attribute {name!r}")
