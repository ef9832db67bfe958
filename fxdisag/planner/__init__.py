"""Profile -> plan stage of fxdisag: per-region costs, cluster specs, the roofline cost
model and the placement search. See each module's docstring for its contract."""

from fxdisag.planner.cluster import PRESETS, ClusterSpec
from fxdisag.planner.plan import Plan, contiguous_placement
from fxdisag.planner.profile import (
    ModelProfile,
    MoELayerProfile,
    ProfileError,
    RegionProfile,
    SeqCost,
    profile,
    synthetic_profile,
)
from fxdisag.planner.search import PlanError, plan

__all__ = [
    "ClusterSpec",
    "PRESETS",
    "ModelProfile",
    "MoELayerProfile",
    "RegionProfile",
    "SeqCost",
    "Plan",
    "PlanError",
    "ProfileError",
    "contiguous_placement",
    "plan",
    "profile",
    "synthetic_profile",
]
