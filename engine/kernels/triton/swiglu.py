"""SwiGLU MLP on CUDA: the projections stay cuBLAS GEMMs, ``silu(gate) * up`` is one Triton pass each way.

When the down projection is a plain ``nn.Linear`` that nothing hooks, it runs inside ``engine::swiglu_linear``,
which recomputes the activation in backward instead of keeping it (one ``[tokens, intermediate]`` tensor less
per layer). Anything else in that place (LoRA, a quantised or hooked layer, autocast) gets the activation and
calls the module as it is.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.triton.base import TritonKernel


class TritonSwiGLUKernel(TritonKernel):
    type = KernelType.SWIGLU
    device = "cuda"
    under_compile = "original"  # Inductor generates this kernel too and fuses it with its neighbours

    @classmethod
    def run(cls, module: nn.Module, options: BaseModel, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.triton.ops.swiglu import swiglu, swiglu_linear

        gate, up = module.gate_proj(x), module.up_proj(x)
        if gate.shape != up.shape or gate.dtype != up.dtype:
            return module.down_proj(module.act_fn(gate) * up)
        down = module.down_proj
        if _is_bare_linear(down, gate):
            return swiglu_linear(gate, up, down.weight, down.bias)
        return down(swiglu(gate, up))


def _is_bare_linear(layer: nn.Module, activation: torch.Tensor) -> bool:
    """Whether calling ``layer`` is exactly ``F.linear(activation, weight, bias)``: a plain ``nn.Linear`` of the
    activation's dtype and width, with no hook of its own or global one and no replaced forward, outside autocast."""
    from torch.nn.modules import module as nn_module

    if type(layer) is not nn.Linear or "forward" in vars(layer):
        return False
    if layer._forward_hooks or layer._forward_pre_hooks or layer._backward_hooks or layer._backward_pre_hooks:
        return False
    if (
        nn_module._global_forward_hooks
        or nn_module._global_forward_pre_hooks
        or nn_module._global_backward_hooks
        or nn_module._global_backward_pre_hooks
    ):
        return False
    if torch.is_autocast_enabled(activation.device.type):
        return False
    weight = layer.weight
    return (
        type(weight) in (torch.Tensor, nn.Parameter)
        and weight.dtype == activation.dtype
        and (weight.shape[1] == activation.shape[-1])
    )


TritonSwiGluKernel = TritonSwiGLUKernel  # the name earlier engine releases used
