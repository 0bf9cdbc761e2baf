"""``sdpa_is_causal`` kernel classes: one decision in plain Python, the same on every device (see the kind)."""

from __future__ import annotations

from typing import Any

import torch

from engine.kernels.base import MetaKernel
from engine.kernels.kinds import KernelType
from engine.kernels.kinds.sdpa_is_causal import bind, guarded_trace, reference
from engine.kernels.npu.base import NeedsTorchNpu


class SdpaIsCausalKernel(MetaKernel):
    """Answers transformers' "is the causal mask redundant?" by :func:`reference` in a ``torch.compile`` trace of
    a call without a padding mask; every other call (eager, padded, static cache, export) asks transformers."""

    @classmethod
    def supports(cls, options: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        call = bind(args, kwargs)
        return (
            call is not None
            and call["padding_mask"] is None
            and not isinstance(call["q_offset"], torch.Tensor)
            and guarded_trace()
        )

    @classmethod
    def run(cls, fn: Any, options: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:  # type: ignore[override]
        call = bind(args, kwargs)
        assert call is not None  # supports() bound it
        return reference(call["q_length"], call["kv_length"], call["q_offset"], call["local_attention_size"])


class CudaSdpaIsCausalKernel(SdpaIsCausalKernel):
    type = KernelType.ATTENTION
    device = "cuda"


class NpuSdpaIsCausalKernel(NeedsTorchNpu, SdpaIsCausalKernel):
    type = KernelType.ATTENTION
    device = "npu"


class CpuSdpaIsCausalKernel(SdpaIsCausalKernel):
    type = KernelType.ATTENTION
    device = "cpu"


class XpuSdpaIsCausalKernel(SdpaIsCausalKernel):
    type = KernelType.ATTENTION
    device = "xpu"


class MpsSdpaIsCausalKernel(SdpaIsCausalKernel):
    type = KernelType.ATTENTION
    device = "mps"
