"""transformers>=5 experts (Qwen3-MoE, Qwen3-VL-MoE) on CUDA: grouped GEMMs with fused SwiGLU, no host sync.

bf16 experts on Hopper run their GEMMs through ``torch._grouped_mm`` (``ops/moe_grouped.py``), others through
the Triton GEMMs; the report names which (``plan_note``).

Tiles are chosen per dtype within the device's shared memory (``moe_tiles.py``); where none fits, the plan
skips the module with the reason, and a call that reaches the kernel anyway runs the original forward.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.triton import moe_tiles, runtime
from engine.kernels.triton.base import TritonKernel


def _plan_device(weight: torch.Tensor) -> torch.device | None:
    """Where the experts will run: their own GPU (or CPU under the interpreter), else the current GPU if any."""
    if weight.is_cuda or (weight.device.type == "cpu" and runtime.interpreting()):
        return weight.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return None


class TritonFusedMoEKernel(TritonKernel):
    type = KernelType.MOE
    device = "cuda"

    @classmethod
    def incompatibility(cls, module: nn.Module, options: BaseModel) -> str | None:
        weight = module.gate_up_proj
        device = _plan_device(weight)
        return None if device is None else moe_tiles.unfit_reason(weight.dtype, device)

    @classmethod
    def plan_note(cls, module: nn.Module, options: BaseModel) -> str | None:
        weight = module.gate_up_proj
        device = _plan_device(weight)
        if device is None or type(weight) not in (torch.Tensor, nn.Parameter) or weight.is_meta:
            return None  # sharded or not yet materialised: decided per call
        from engine.kernels.triton.ops import moe_grouped

        cutlass = moe_grouped.weights_fit(weight, module.down_proj, device)
        return f"expert GEMMs: {'torch._grouped_mm (CUTLASS)' if cutlass else 'Triton'}"

    @classmethod
    def run(
        cls,
        module: nn.Module,
        options: BaseModel,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
    ) -> torch.Tensor:
        from engine.kernels.triton.ops.moe import fused_moe

        gate_up, down = module.gate_up_proj, module.down_proj
        rows, experts = top_k_index.numel(), gate_up.shape[0]
        if not hidden_states.dtype == gate_up.dtype == down.dtype or not cls._tiles_fit(hidden_states, rows, experts):
            return type(module).forward(module, hidden_states, top_k_index, top_k_weights)
        return fused_moe(hidden_states, gate_up, down, top_k_index, top_k_weights)

    @staticmethod
    def _tiles_fit(hidden_states: torch.Tensor, rows: int, experts: int) -> bool:
        """Eager calls re-check the tiling (weights may have changed dtype since the plan); traced calls
        rely on the plan-time check, keeping device queries out of the graph."""
        if torch.compiler.is_compiling():
            return True
        return moe_tiles.plan_tiles(rows, experts, hidden_states.dtype, hidden_states.device) is not None
