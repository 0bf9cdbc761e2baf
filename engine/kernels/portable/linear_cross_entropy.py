"""Fused linear cross-entropy kernel classes: the per-call decision shared by every device, and the portable
(plain PyTorch, chunked) classes for CPU, XPU and MPS. CUDA and NPU subclass :class:`LinearCrossEntropyKernel`
with their own chunk loss."""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from torch import nn

from engine.device import ALL_DEVICE_TYPES
from engine.kernels.base import MetaKernel
from engine.kernels.kinds import KernelType
from engine.kernels.kinds.linear_cross_entropy import (
    ACTIVE_CAPTURES,
    LinearCrossEntropyOptions,
    LossFn,
    fused_forward,
    handoff,
)
from engine.kernels.portable.ops.linear_cross_entropy import linear_cross_entropy

# Keyword that lets one call choose (Liger-Kernel's name): True fuses a call with labels even in eval mode,
# False runs the original forward with full logits.
SKIP_LOGITS = "skip_logits"


class OutputHeadKernel(MetaKernel):
    """The companion patch of a fused loss's output head (no type/device: never registered or planned alone).

    It acts only while a fused call of its model is in progress, handing the head's input to that call's
    capture; every other call runs the head unchanged.
    """

    @classmethod
    def tensor_devices(cls) -> frozenset[str]:
        return ALL_DEVICE_TYPES

    @classmethod
    def supports(cls, options: Any, hidden: Any) -> bool:
        return len(ACTIVE_CAPTURES) > 0

    @classmethod
    def run(cls, head: nn.Module, options: Any, hidden: Any) -> Any:  # type: ignore[override]
        return handoff(head, hidden)


class LinearCrossEntropyKernel(MetaKernel):
    """Base of the fused linear cross-entropy kernels (declares no type/device, so it does not register).

    A call is fused when it passes ``labels`` by keyword (at most ``input_ids`` positionally), the module is in
    training mode (or ``fuse: always``, or ``skip_logits=True``), it asks for a ModelOutput (not
    ``return_dict=False``), the model still uses transformers' ``ForCausalLMLoss`` and the head weight is on a
    device this kernel serves. Anything else runs the module's class forward unchanged (``skip_logits`` removed).
    """

    chunk_loss: ClassVar[str] = "torch"

    @classmethod
    def supports(cls, options: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        return "labels" in kwargs or SKIP_LOGITS in kwargs

    @classmethod
    def companions(cls, model: nn.Module, options: Any) -> list[tuple[nn.Module, type[MetaKernel]]]:
        return [(model.get_output_embeddings(), OutputHeadKernel)]

    @classmethod
    def loss_fn(cls, options: LinearCrossEntropyOptions) -> LossFn:
        return functools.partial(
            linear_cross_entropy,
            impl=cls.chunk_loss,
            chunk_bytes=options.chunk_mib << 20,
            fp32_accumulate=options.grad_accumulation == "fp32",
        )

    @classmethod
    def fuses(
        cls, model: nn.Module, options: LinearCrossEntropyOptions, args: tuple, kwargs: dict, wanted: bool | None
    ) -> bool:
        """Whether this call takes the fused path (``wanted``: the call's ``skip_logits``, if it gave one)."""
        from transformers.loss.loss_utils import ForCausalLMLoss

        if kwargs.get("labels") is None or len(args) > 1 or kwargs.get("return_dict", True) is False:
            return False
        if wanted is None and not (model.training or options.fuse == "always"):
            return False
        if wanted is False or getattr(model.config, "return_dict", True) is False:
            return False
        if model.loss_function is not ForCausalLMLoss:
            return False
        return model.get_output_embeddings().weight.device.type in cls.tensor_devices()

    @classmethod
    def run(cls, model: nn.Module, options: LinearCrossEntropyOptions, args: tuple, kwargs: dict) -> Any:  # type: ignore[override]
        kwargs = dict(kwargs)
        wanted = kwargs.pop(SKIP_LOGITS, None)
        if cls.fuses(model, options, args, kwargs, wanted):
            return fused_forward(model, options, args, kwargs, cls.loss_fn(options))
        return type(model).forward(model, *args, **kwargs)


class CpuLinearCrossEntropyKernel(LinearCrossEntropyKernel):
    type = KernelType.LINEAR_CROSS_ENTROPY
    device = "cpu"


class XpuLinearCrossEntropyKernel(LinearCrossEntropyKernel):
    type = KernelType.LINEAR_CROSS_ENTROPY
    device = "xpu"


class MpsLinearCrossEntropyKernel(LinearCrossEntropyKernel):
    type = KernelType.LINEAR_CROSS_ENTROPY
    device = "mps"
