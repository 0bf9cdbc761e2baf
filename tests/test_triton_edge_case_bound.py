"""The bound of the GPU edge-case tests (tests/gpu/test_kernel_edge_cases.py) is itself tested here, on CPU:
rounding noise of transformers' size passes, a dropped or garbage row fails."""

import pytest
import torch

from tests.gpu.test_kernel_edge_cases import FLOOR, RATIO, Comparison, worst_row_error


def _rounded_twice(exact: torch.Tensor, seed: int) -> torch.Tensor:
    """Another bf16 result of the same math: a different last-bit rounding of each element."""
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (exact * (1 + noise * 2.0**-10)).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 7, 4096])
def test_rounding_noise_passes_and_a_lost_row_fails(rows):
    exact = torch.randn(rows, 64, dtype=torch.float64)
    theirs, ours = exact.to(torch.bfloat16), _rounded_twice(exact, 1)
    ok = Comparison("noise", torch.bfloat16)
    ok.add("y", ours, theirs, exact)
    ok.check()
    for damage in ("zero", "garbage", "nan"):
        broken = ours.clone()
        broken[rows // 2] = {"zero": 0.0, "garbage": 3.0, "nan": float("nan")}[damage]
        assert worst_row_error(broken, exact) > RATIO * worst_row_error(theirs, exact) + FLOOR, damage
        failing = Comparison("lost row", torch.bfloat16)
        failing.add("y", broken, theirs, exact)
        with pytest.raises(AssertionError, match="lost row"):
            failing.check()


def test_a_nearly_cancelled_row_is_judged_at_the_typical_row_size():
    exact = torch.randn(64, 2, dtype=torch.float64)
    exact[5] *= 1e-6  # a routing-weight gradient that cancels: relative error of that row alone is noise
    shifted = exact.clone()
    shifted[5] += 1e-9
    assert worst_row_error(shifted, exact) < 1e-6
    shifted[5] = 0.0  # dropping it is still a change at the scale of that row only (negligible)
    assert worst_row_error(shifted, exact) < 1e-5


def test_shape_or_non_finite_mismatch_is_infinite():
    exact = torch.randn(3, 4, dtype=torch.float64)
    assert worst_row_error(exact[:2], exact) == float("inf")
    assert worst_row_error(torch.full((3, 4), float("inf")), exact) == float("inf")
