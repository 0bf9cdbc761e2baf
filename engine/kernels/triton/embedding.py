"""Token embedding on CUDA: the lookup stays PyTorch's, the weight gradient is the Triton pass of
``ops/embedding.py`` (sorted tokens, one write of the gradient in the weight's dtype, no atomics)."""

from __future__ import annotations

import torch
from torch import nn

from engine.kernels.kinds import KernelType
from engine.kernels.kinds.embedding import plain_lookup
from engine.kernels.triton.base import TritonKernel


class TritonEmbeddingKernel(TritonKernel):
    type = KernelType.EMBEDDING
    device = "cuda"

    @classmethod
    def run(cls, module: nn.Module, options: object, ids: torch.Tensor) -> torch.Tensor:
        if not plain_lookup(module):  # a subclass met after planning: its own math
            return type(module).forward(module, ids)
        from engine.kernels.triton.ops.embedding import embedding

        return embedding(ids, module.weight, module.padding_idx)
