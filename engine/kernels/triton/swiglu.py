"""SwiGLU MLP on CUDA: the projections stay cuBLAS GEMMs, ``silu(gate) * up`` is one Triton pass each way.

When the down projection is a plain ``nn.Linear`` that nothing hooks, it runs inside ``engine::swiglu_linear``,
which recomputes the activation in backward instead of keeping it (one ``[tokens, intermediate]`` tensor less
per layer). Anything else in that place (LoRA, a quantised or hooked layer, autocast) gets the activation and
calls the module as it is. With ``recompute: projections`` three plain linears run as ``engine::swiglu_mlp``
(gate and up recomputed in backward); other layers are checkpointed as a whole MLP instead.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.kinds.swiglu import SwiGLUOptions, recomputed
from engine.kernels.triton.base import TritonKernel


class TritonSwiGLUKernel(TritonKernel):
    type = KernelType.SWIGLU
    device = "cuda"
    under_compile = "original"  # Inductor generates this kernel too and fuses it with its neighbours

    @classmethod
    def run(cls, module: nn.Module, options: SwiGLUOptions, x: torch.Tensor) -> torch.Tensor:
        if options.recompute == "projections":
            if _plain_projections(module, x):
                from engine.kernels.triton.ops.swiglu import SWIGLU_MLP  # checked: _plain_projections

                gate, up, down = module.gate_proj, module.up_proj, module.down_proj
                return SWIGLU_MLP(x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias)
            return recomputed(lambda h: cls._activation_path(module, h), x)
        return cls._activation_path(module, x)

    @staticmethod
    def _activation_path(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from engine.kernels.triton.ops.swiglu import SWIGLU_LINEAR, swiglu

        gate, up = module.gate_proj(x), module.up_proj(x)
        if gate.shape != up.shape or gate.dtype != up.dtype:
            return module.down_proj(module.act_fn(gate) * up)
        down = module.down_proj
        if _is_bare_linear(down, gate, gate.shape[-1]):  # with the line above: what swiglu_linear checks
            return SWIGLU_LINEAR(gate, up, down.weight, down.bias)
        return down(swiglu(gate, up))


def _plain_projections(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether gate, up and down are bare linears of x's dtype with matching widths (what swiglu_mlp checks)."""
    gate, up, down = module.gate_proj, module.up_proj, module.down_proj
    if not (_is_bare_linear(gate, x, x.shape[-1]) and _is_bare_linear(up, x, x.shape[-1])):
        return False
    inter = gate.weight.shape[0]
    return up.weight.shape[0] == inter and _is_bare_linear(down, x, inter)


def _is_bare_linear(layer: nn.Module, like: torch.Tensor, width: int) -> bool:
    """Whether calling ``layer`` on ``width``-wide inputs of ``like``'s dtype is exactly ``F.linear(input, weight,
    bias)``: a plain ``nn.Linear``, with no hook of its own or global one and no replaced forward, outside autocast."""
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
    if torch.is_autocast_enabled(like.device.type):
        return False
    weight, bias = layer.weight, layer.bias
    return (
        type(weight) in (torch.Tensor, nn.Parameter)
        and weight.dtype == like.dtype
        and weight.shape[1] == width
        and (bias is None or (type(bias) in (torch.Tensor, nn.Parameter) and bias.dtype == like.dtype))
    )


TritonSwiGluKernel = TritonSwiGLUKernel  # the name earlier engine releases used
