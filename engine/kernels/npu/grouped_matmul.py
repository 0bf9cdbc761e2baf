"""Expert matmuls through ``torch_npu.npu_grouped_matmul``, with the backward torch_npu does not have.

``npu_grouped_matmul`` has no derivative in torch_npu (never in op-plugin's ``derivatives.yaml``): called under
autograd it silently yields no gradient. :class:`GroupedLinear` supplies one, the way MindSpeed's
``ops/gmm.py`` and LLaMA-Factory's ``GmmFunction`` do, for transformers' expert layout ``weight[e]: [out, in]``
(``y_e = x_e @ weight[e].T``). Every call passes the parameter itself or a transposed *view* of it (the op
accepts transposed weights), so no weight is copied or transposed in memory, and the per-expert row counts
stay a device tensor (``group_list_type=1``), so nothing waits for the host.

- forward, M split (``group_type=0``): ``y = gmm(x, weight.transpose(1, 2))``  -> [M, out]
- dgrad, M split: ``dx = gmm(dy, weight)``, the transposed view of the forward operand  -> [M, in]
- wgrad, K split (``group_type=2``, release 7.2.0+) over the token dim: ``dW = gmm(dy.T, x)`` -> [E, out, in],
  already the parameter's layout (the op wants a transposed x and a row-major weight there).
"""

from __future__ import annotations

from typing import Any

import torch

from engine.kernels.npu.base import torch_npu

GROUP_ON_M = 0  # group_type: split x's rows (tokens) into groups
GROUP_ON_K = 2  # group_type: split the contraction dim (tokens, in the weight gradient) into groups
SIZES = 1  # group_list_type: group_list holds group sizes, not cumulative ends
ONE_TENSOR = 2  # split_item: x and y are single tensors (M split output [M, N])
ONE_TENSOR_K = 3  # split_item used for the K split (output [E, M, N]), as in the op-plugin test


def expert_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert as an int64 device tensor of fixed length (``bincount`` would read the max on the host)."""
    flat = top_k_index.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _gmm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, group_type: int) -> torch.Tensor:
    split_item = ONE_TENSOR if group_type == GROUP_ON_M else ONE_TENSOR_K
    return torch_npu().npu_grouped_matmul(
        [x], [weight], group_list=counts, split_item=split_item, group_type=group_type, group_list_type=SIZES
    )[0]


class GroupedLinear(torch.autograd.Function):
    """``y[rows of expert e] = x[rows of expert e] @ weight[e].T`` for rows sorted by expert, ``counts[e]`` each."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # the op takes no transposed x on the M split
        ctx.save_for_backward(x, weight, counts)
        return _gmm(x, weight.transpose(1, 2), counts, GROUP_ON_M)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, counts = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _gmm(dy, weight, counts, GROUP_ON_M)  # the forward operand transposed back: the parameter
        if ctx.needs_input_grad[1]:
            dw = _gmm(dy.t(), x, counts, GROUP_ON_K)
        return dx, dw, None


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = GroupedLinear.apply(x, weight, counts)
    return out
