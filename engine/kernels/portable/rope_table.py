"""``rope_table`` kernel classes: one operator of plain PyTorch, the same on every device (see the kind)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.device import ALL_DEVICE_TYPES
from engine.kernels.base import MetaKernel
from engine.kernels.kinds.rope_table import fits, scaling_of
from engine.kernels.npu.base import NeedsTorchNpu


class RopeTableKernel(MetaKernel):
    """Inside ``torch.compile``: the table from ``engine::rope_table``. Eager calls, a table someone differentiates
    through and a module whose ``attention_scaling`` is no longer a number run the module's own forward. Plain
    PyTorch: it serves tensors on any device."""

    @classmethod
    def tensor_devices(cls) -> frozenset[str]:
        return ALL_DEVICE_TYPES

    @classmethod
    def supports(cls, options: Any, x: Any, position_ids: Any) -> bool:
        return torch.compiler.is_compiling() and fits(x, position_ids)

    @classmethod
    def plan_note(cls, target: Any, options: Any) -> str | None:
        return "one operator under torch.compile; eager calls run the module's forward"

    @classmethod
    def run(cls, module: nn.Module, options: Any, x: torch.Tensor, position_ids: torch.Tensor) -> Any:
        scaling = scaling_of(module)
        if module.inv_freq.requires_grad or scaling is None:
            return type(module).forward(module, x, position_ids)
        from engine.kernels.portable.ops.rope_table import rope_table

        return rope_table(module.inv_freq.to(x.device), position_ids, scaling, x.dtype)


class CudaRopeTableKernel(RopeTableKernel):
    type = "rope_table"
    device = "cuda"


class NpuRopeTableKernel(NeedsTorchNpu, RopeTableKernel):
    type = "rope_table"
    device = "npu"


class CpuRopeTableKernel(RopeTableKernel):
    type = "rope_table"
    device = "cpu"


class XpuRopeTableKernel(RopeTableKernel):
    type = "rope_table"
    device = "xpu"


class MpsRopeTableKernel(RopeTableKernel):
    type = "rope_table"
    device = "mps"
