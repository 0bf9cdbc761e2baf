"""Fused linear cross-entropy on Ascend: the portable chunked GEMMs, with each chunk's loss and log-probabilities
from ``torch_npu.npu_cross_entropy_loss`` where the installed torch_npu has it (the plain torch chunk loss
otherwise).

``npu_cross_entropy_loss(input, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
lse_square_scale_for_zloss=0.0, return_zloss=False) -> (loss, log_prob, zloss, lse_for_zloss)`` (Ascend
Extension for PyTorch API reference, "torch_npu.npu_cross_entropy_loss", beta): ``input [N, C]`` fp16/bf16/fp32,
``target [N]`` int64 in ``[0, C)``, ``N <= 200000``; ``loss`` and ``log_prob = x - lse`` come back in the input
dtype, so the chunk is upcast to fp32 first. The documented ``ignore_index`` has to be below ``C`` and a negative
one means *no* ignored label, so ignored targets are mapped to class 0 and masked here rather than passed on.
"""

from __future__ import annotations

import torch

from engine.kernels.kinds import KernelType
from engine.kernels.npu.base import NpuKernel, torch_npu
from engine.kernels.npu.versions import Requirement
from engine.kernels.portable.linear_cross_entropy import LinearCrossEntropyKernel
from engine.kernels.portable.ops.linear_cross_entropy import register_chunk_loss, torch_chunk_loss

MAX_ROWS = 200_000  # documented limit of npu_cross_entropy_loss


def npu_chunk_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    denom: torch.Tensor,
    row_loss: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    with_grad: bool,
) -> None:
    """The chunk loss through ``npu_cross_entropy_loss`` (reduction none, fp32); the torch one if it is absent."""
    op = getattr(torch_npu(), "npu_cross_entropy_loss", None)
    if op is None or logits.shape[0] > MAX_ROWS or logits.shape[0] == 0:
        torch_chunk_loss(logits, targets, denom, row_loss, ignore_index, softcap, with_grad)
        return
    x = logits.float()
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(x / softcap)
        x = tanh * softcap
    valid = targets != ignore_index
    safe = targets.masked_fill(~valid, 0)
    loss, log_prob, _, _ = op(x, safe, reduction="none", ignore_index=-100)
    row_loss.copy_(torch.where(valid, loss.float(), 0.0))
    if not with_grad:
        return
    grad = log_prob.float().exp_()
    grad.scatter_add_(1, safe[:, None], -valid.to(grad.dtype)[:, None])
    grad.mul_(torch.where(valid, denom.reciprocal(), 0.0)[:, None])
    if tanh is not None:
        grad.mul_(tanh.mul_(tanh).neg_().add_(1.0))
    logits.copy_(grad)


register_chunk_loss("npu", npu_chunk_loss, temp_bytes_per_logit=12)


class NpuLinearCrossEntropyKernel(LinearCrossEntropyKernel, NpuKernel):
    type = KernelType.LINEAR_CROSS_ENTROPY
    device = "npu"
    chunk_loss = "npu"
    # Any build: without npu_cross_entropy_loss each chunk's loss falls back to plain torch ops.
    min_torch_npu = Requirement("5.0.0")
