"""RMSNorm on Ascend through ``torch_npu.npu_rms_norm``.

The op returns ``(x_f32 * rstd * gamma_f32).to(x.dtype)``. Where that is the module's own output it is used:

- llama casting (``w * normed.to(x.dtype)``) with x and weight in one dtype: same value up to one rounding of
  the product (the op rounds once, transformers twice), same dtype.
- gemma casting (``(normed_f32 * (offset + w_f32)).to(x.dtype)``), any weight dtype: gamma is passed as the fp32
  ``offset + w`` (the documented fp16/bf16 x with fp32 gamma pairs), which is exactly transformers' math.

Declined, so the original runs: llama casting with a weight dtype other than x's (bf16 x, fp32 weight).
transformers returns ``w_f32 * normed.to(bf16)`` there, an fp32 tensor; the op would return bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.kinds.rms_norm import RMSNormOptions, epsilon
from engine.kernels.npu.base import NpuKernel, torch_npu
from engine.kernels.npu.versions import Requirement

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


class NpuRMSNormKernel(NpuKernel):
    type = KernelType.RMSNORM
    device = "npu"
    min_torch_npu = Requirement("5.0.0")
    ops = ("npu_rms_norm",)
    # (x, gamma) on Atlas A2/A3 (OP docs/.../torch_npu-npu_rms_norm.md; older chips: same-dtype pairs only)
    op_dtypes = {"npu_rms_norm": frozenset({(FP16, FP32), (BF16, FP32), (FP16, FP16), (BF16, BF16), (FP32, FP32)})}

    @classmethod
    def supports(cls, options: RMSNormOptions, x: torch.Tensor) -> bool:
        return 2 <= x.dim() <= 8

    @classmethod
    def run(cls, module: nn.Module, options: RMSNormOptions, x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if options.casting == "gemma":
            gamma = weight.float() + options.weight_offset if options.weight_offset else weight.float()
        elif weight.dtype == x.dtype:
            gamma = weight + options.weight_offset if options.weight_offset else weight
        else:  # llama casting, mixed dtypes: transformers' output is fp32, the op's would be x's dtype
            return type(module).forward(module, x)
        if not cls.accepts("npu_rms_norm", x, gamma):
            return type(module).forward(module, x)
        return torch_npu().npu_rms_norm(x, gamma, epsilon=epsilon(module))[0]
