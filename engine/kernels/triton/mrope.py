"""Qwen2-VL / Qwen3-VL text rotary embedding on CUDA: multimodal cos/sin in one Triton launch."""

from __future__ import annotations

import weakref
from typing import ClassVar

import torch
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.kinds.mrope import MRopeOptions, axis_table
from engine.kernels.triton.base import TritonKernel


class TritonMRoPEKernel(TritonKernel):
    type = KernelType.ROPE
    kind = "mrope"
    device = "cuda"
    # Kept under compile: Inductor would inline the table into every layer's rotary and recompute cos/sin per
    # element of each head; as this operator's output it is computed once (H200, 4 layers of the Qwen2-VL-2B text
    # shape, B4 x T2048, compiled fwd+bwd: 38.14 ms against 38.80 with the table left to Inductor)
    under_compile = "kernel"
    _tables: ClassVar[weakref.WeakKeyDictionary[nn.Module, torch.Tensor]] = weakref.WeakKeyDictionary()

    @classmethod
    def _axis_table(cls, module: nn.Module, options: MRopeOptions, device: torch.device) -> torch.Tensor:
        """Which position axis drives each frequency; cached per module in eager, a graph constant when traced."""
        if torch.compiler.is_compiling():
            return axis_table(module.inv_freq.shape[0], list(module.mrope_section), options.layout).to(device)
        table = cls._tables.get(module)
        if table is None or table.device != device:
            table = axis_table(module.inv_freq.shape[0], list(module.mrope_section), options.layout).to(device)
            cls._tables[module] = table
        return table

    @classmethod
    def supports(cls, options: MRopeOptions, x: torch.Tensor, position_ids: torch.Tensor) -> bool:
        return position_ids.dim() == 2 or (position_ids.dim() == 3 and position_ids.shape[0] in (1, 3))

    @classmethod
    def run(
        cls, module: nn.Module, options: MRopeOptions, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from engine.kernels.triton.ops.mrope import mrope_cos_sin

        inv_freq = module.inv_freq.to(device=x.device, dtype=torch.float32)
        table = cls._axis_table(module, options, x.device)
        return mrope_cos_sin(position_ids, inv_freq, table, module.attention_scaling, x.dtype)
