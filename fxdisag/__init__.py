"""fxdisag: attention/expert disaggregation for MoE training, as an FX graph transformation."""
from fxdisag.capture import CapturedModel, CaptureError, RegionTag, capture
from fxdisag.layout import LayoutError, ModelLayout, MoELayer, find_layout

__all__ = ["CapturedModel", "CaptureError", "LayoutError", "ModelLayout", "MoELayer", "RegionTag", "capture", "find_layout"]
