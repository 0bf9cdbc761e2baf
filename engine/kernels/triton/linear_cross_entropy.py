"""Fused linear cross-entropy on CUDA: chunked cuBLAS GEMMs with the Triton chunk loss of
``ops/linear_cross_entropy.py`` (why this split: see that module)."""

from __future__ import annotations

from engine.kernels.kinds import KernelType
from engine.kernels.kinds.linear_cross_entropy import LinearCrossEntropyOptions, LossFn
from engine.kernels.portable.linear_cross_entropy import LinearCrossEntropyKernel
from engine.kernels.triton.base import TritonKernel


class TritonLinearCrossEntropyKernel(LinearCrossEntropyKernel, TritonKernel):
    type = KernelType.LINEAR_CROSS_ENTROPY
    device = "cuda"
    chunk_loss = "triton"

    @classmethod
    def loss_fn(cls, options: LinearCrossEntropyOptions) -> LossFn:
        import engine.kernels.triton.ops.linear_cross_entropy  # noqa: F401  (registers the "triton" chunk loss)

        return super().loss_fn(options)
