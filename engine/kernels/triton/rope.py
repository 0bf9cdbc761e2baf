"""``apply_rotary_pos_emb`` on CUDA: q and k rotated in one Triton launch."""

from __future__ import annotations

from pydantic import BaseModel

from engine.kernels.kinds import KernelType
from engine.kernels.triton.base import TritonKernel


def _bshd_to_bhsd(q, k, unsqueeze_dim: int):  # noqa: ANN001, ANN202
    """transformers' ``unsqueeze_dim=2`` layout [B, S, H, D] seen as the kernel's [B, H, S, D] (a view)."""
    return (q.transpose(1, 2), k.transpose(1, 2)) if unsqueeze_dim == 2 else (q, k)


class TritonRoPEKernel(TritonKernel):
    type = KernelType.ROPE
    device = "cuda"
    under_compile = "original"  # Inductor generates this kernel too and fuses it with its neighbours

    @classmethod
    def supports(cls, options: BaseModel, q, k, cos, sin, unsqueeze_dim: int = 1) -> bool:  # noqa: ANN001
        from engine.kernels.triton.ops.rope import check_rope_args

        if unsqueeze_dim not in (1, 2):
            return False
        try:
            check_rope_args(*_bshd_to_bhsd(q, k, unsqueeze_dim), cos, sin)
        except ValueError:
            return False
        return True

    @classmethod
    def run(cls, fn: object, options: BaseModel, q, k, cos, sin, unsqueeze_dim: int = 1):  # noqa: ANN001
        from engine.kernels.triton.ops.rope import rope_checked  # supports() checked these arguments

        q_out, k_out = rope_checked(*_bshd_to_bhsd(q, k, unsqueeze_dim), cos, sin)
        return _bshd_to_bhsd(q_out, k_out, unsqueeze_dim)
