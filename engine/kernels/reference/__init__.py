"""Pure-torch reference math for every kernel type: the oracle for probes, tests and the torch_npu stand-in."""

from engine.kernels.reference.moe import moe_experts_reference
from engine.kernels.reference.norms import rms_norm_reference
from engine.kernels.reference.rope import (
    mrope_axis_table,
    mrope_cos_sin_reference,
    rope_reference,
    rotate_half,
    vision_rope_reference,
)
from engine.kernels.reference.swiglu import swiglu_reference

__all__ = [
    "moe_experts_reference",
    "mrope_axis_table",
    "mrope_cos_sin_reference",
    "rms_norm_reference",
    "rope_reference",
    "rotate_half",
    "swiglu_reference",
    "vision_rope_reference",
]
