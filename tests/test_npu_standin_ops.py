"""The torch_npu stand-in against the documented contracts it cites (doc examples, op-plugin test references).

Expected values come from the documents' formulas and examples, computed independently of the stand-in's
code where possible (loops, explicit tables), so a wrong belief in the stand-in shows up here.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from engine.testing.torch_npu_standin import build_module

npu = build_module()
BF16 = torch.bfloat16


# --------------------------------------------------------------------------------- permute / unpermute
def test_permute_doc_example():
    """_op_plugin_docs.py ``npu_moe_token_permute`` example; outputs from the documented two-argsort formula."""
    tokens = torch.tensor([[1, 1, 1], [2, 2, 2], [3, 3, 3], [0, 0, 0]]).to(BF16)
    indices = torch.tensor([[0, 4], [4, 3], [4, 2], [1, 1]])
    permuted, sorted_indices = npu.npu_moe_token_permute(tokens, indices, indices.numel())
    assert sorted_indices.dtype == torch.int32
    assert sorted_indices.tolist() == [0, 5, 6, 4, 7, 3, 1, 2]
    # the unpermute doc example's permuted_tokens input is exactly this
    assert permuted[:, 0].tolist() == [1, 0, 0, 3, 2, 1, 2, 3]
    for slot, row in enumerate(sorted_indices.tolist()):  # permuted[sorted_indices[i]] == tokens[i // topk]
        assert torch.equal(permuted[row], tokens[slot // 2])


def test_permute_issue_example_value():
    """The value quoted in issue 11, ``[0,4,5,1,2,6,7,3]``, is argsort(argsort(flat)) of these indices."""
    indices = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    _, sorted_indices = npu.npu_moe_token_permute(torch.randn(4, 8).to(BF16), indices)
    assert sorted_indices.tolist() == [0, 4, 5, 1, 2, 6, 7, 3]


def test_unpermute_doc_example_follows_the_formula():
    """_op_plugin_docs.py ``npu_moe_token_unpermute`` example. Its sorted_indices is argsort(flat), not what
    permute returns, so by the documented formula the result is not the tokens; with permute's own indices it
    is (the round trip of op-plugin's ``test_npu_npu_moe_token_permute_unpermute``)."""
    permuted = torch.tensor([[1] * 3, [0] * 3, [0] * 3, [3] * 3, [2] * 3, [1] * 3, [2] * 3, [3] * 3]).to(BF16)
    probs = torch.ones(4, 2).to(BF16) / 2
    doc_indices = torch.tensor([0, 6, 7, 5, 3, 1, 2, 4], dtype=torch.int32)
    out = npu.npu_moe_token_unpermute(permuted, doc_indices, probs=probs)
    assert out[:, 0].tolist() == [1.5, 2.0, 1.5, 1.0]
    fused = torch.tensor([0, 5, 6, 4, 7, 3, 1, 2], dtype=torch.int32)
    out = npu.npu_moe_token_unpermute(permuted, fused, probs=probs)
    assert out[:, 0].tolist() == [1, 2, 3, 0]


def test_permute_unpermute_round_trip_and_weighting():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 8, generator=gen).to(BF16)
    indices = torch.stack([torch.randperm(5, generator=gen)[:3] for _ in range(6)])
    permuted, rows = npu.npu_moe_token_permute(tokens, indices)
    assert torch.equal(npu.npu_moe_token_unpermute(permuted, rows, probs=torch.full((6, 3), 1 / 3).to(BF16)), tokens)
    probs = torch.rand(6, 3, generator=gen).to(BF16)
    want = torch.zeros(6, 8)
    for t in range(6):
        for k in range(3):
            want[t] += permuted[rows[t * 3 + k]].float() * probs[t, k].float()
    torch.testing.assert_close(npu.npu_moe_token_unpermute(permuted, rows, probs=probs), want.to(BF16))
    # without probs topK is 1: one output row per sorted index
    assert npu.npu_moe_token_unpermute(permuted, rows).shape == (18, 8)


def test_num_out_tokens_truncates_rows_not_indices():
    tokens = torch.randn(4, 8).to(BF16)
    indices = torch.tensor([[0, 4], [4, 3], [4, 2], [1, 1]])
    full, full_idx = npu.npu_moe_token_permute(tokens, indices)
    for num_out, rows in ((5, 5), (20, 8), (-3, 5), (0, 8), (None, 8)):
        permuted, sorted_indices = npu.npu_moe_token_permute(tokens, indices, num_out)
        assert permuted.shape == (rows, 8) and torch.equal(permuted, full[:rows])
        assert torch.equal(sorted_indices, full_idx)  # all T*k indices, never truncated
    truncated, idx = npu.npu_moe_token_permute(tokens, indices, 5)
    with pytest.raises(RuntimeError, match="outside"):  # undefined by the documents
        npu.npu_moe_token_unpermute(truncated, idx, probs=torch.ones(4, 2).to(BF16))


def test_permute_unpermute_documented_dtypes_only():
    indices = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(RuntimeError, match="bfloat16"):
        npu.npu_moe_token_permute(torch.randn(2, 4), indices)
    permuted, rows = npu.npu_moe_token_permute(torch.randn(2, 4).to(BF16), indices)
    with pytest.raises(RuntimeError, match="int32"):
        npu.npu_moe_token_unpermute(permuted, rows.long())
    with pytest.raises(RuntimeError, match="bfloat16"):
        npu.npu_moe_token_unpermute(permuted, rows, probs=torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="padded_mode"):
        npu.npu_moe_token_permute(torch.randn(2, 4).to(BF16), indices, padded_mode=True)


# ------------------------------------------------------------------------------------ grouped matmul
def _gmm(x, w, group_list, group_type=0, group_list_type=1, split_item=2):
    return npu.npu_grouped_matmul(
        [x], [w], group_list=group_list, split_item=split_item, group_type=group_type, group_list_type=group_list_type
    )


def test_grouped_matmul_m_split_op_plugin_test_1():
    """test_npu_grouped_matmul_1 (smaller): x [M, K], weight [2, K, N], cumulative group_list, split_item 3."""
    x, w = torch.randn(40, 16), torch.randn(2, 16, 8)
    (y,) = _gmm(x, w, torch.tensor([12, 40]), group_list_type=0, split_item=3)
    torch.testing.assert_close(y, torch.cat((x[:12] @ w[0], x[12:] @ w[1])))
    (y2,) = _gmm(x, w, torch.tensor([12, 28]))  # the same groups as sizes
    torch.testing.assert_close(y2, y)
    (y3,) = _gmm(x, w.transpose(1, 2).contiguous().transpose(1, 2), torch.tensor([12, 28]))  # transposed weight
    torch.testing.assert_close(y3, y)


def test_grouped_matmul_k_split_op_plugin_test_6():
    """test_npu_grouped_matmul_6 (smaller): x = x1.T transposed, weight [K, N], group_type 2 -> [E, M, N]."""
    x1, w = torch.randn(30, 12), torch.randn(30, 5)
    sizes = [6, 0, 10, 14]
    (y,) = _gmm(x1.t(), w, torch.tensor(sizes), group_type=2, split_item=3)
    assert y.shape == (4, 12, 5)
    start = 0
    for e, size in enumerate(sizes):
        torch.testing.assert_close(y[e], x1[start : start + size].t() @ w[start : start + size])
        start += size
    assert torch.count_nonzero(y[1]) == 0  # an empty group contributes zeros
    with pytest.raises(RuntimeError, match="x must be transposed"):
        _gmm(x1.t().contiguous(), w, torch.tensor(sizes), group_type=2, split_item=3)


def test_grouped_matmul_group_list_must_cover_exactly_m():
    x, w = torch.randn(10, 4), torch.randn(3, 4, 2)
    for sizes in ([3, 3, 3], [3, 3, 5]):
        with pytest.raises(RuntimeError, match="sum to"):
            _gmm(x, w, torch.tensor(sizes))
    with pytest.raises(RuntimeError, match="must equal the grouped dim"):
        _gmm(x, w, torch.tensor([3, 6, 9]), group_list_type=0)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        _gmm(x, w, torch.tensor([3, 2, 10]), group_list_type=0)


def test_grouped_matmul_group_limits():
    x = torch.randn(1024, 2)
    (y,) = _gmm(x, torch.randn(1024, 2, 2), torch.ones(1024, dtype=torch.int64))  # 1024 groups, one 3-D weight
    assert y.shape == (1024, 2)
    with pytest.raises(RuntimeError, match="at most 1024"):
        _gmm(torch.randn(1025, 2), torch.randn(1025, 2, 2), torch.ones(1025, dtype=torch.int64))
    weights = [torch.randn(2, 2) for _ in range(129)]
    with pytest.raises(RuntimeError, match="1 to 128"):
        npu.npu_grouped_matmul(
            [torch.randn(129, 2)], weights, group_list=torch.ones(129, dtype=torch.int64), split_item=2, group_type=0
        )


def test_grouped_matmul_arguments_and_dtypes():
    x, w = torch.randn(4, 4), torch.randn(2, 4, 3)
    counts = torch.tensor([1, 3])
    with pytest.raises(RuntimeError, match="group_type"):  # required since release 7.1.0
        npu.npu_grouped_matmul([x], [w], group_list=counts, split_item=2, group_list_type=1)
    with pytest.raises(RuntimeError, match="split_item"):
        _gmm(x, w, counts, split_item=4)
    with pytest.raises(RuntimeError, match="dtypes"):
        _gmm(x.to(BF16), w, counts)
    with pytest.raises(RuntimeError, match="not be transposed"):
        _gmm(torch.randn(4, 4).t(), w, counts)
    with pytest.raises(RuntimeError, match="not supported"):
        _gmm(x, w, counts, group_type=1)
    outs = npu.npu_grouped_matmul(
        [torch.randn(2, 4).half(), torch.randn(3, 4).half()],
        [torch.randn(4, 5).half(), torch.randn(4, 6).half()],
        split_item=0,
        group_type=-1,
    )
    assert [tuple(o.shape) for o in outs] == [(2, 5), (3, 6)]
    with pytest.raises(RuntimeError, match="dtypes"):  # fp32 only with single x / weight / y
        npu.npu_grouped_matmul([torch.randn(2, 4)], [torch.randn(4, 5)], split_item=0, group_type=-1)


# ------------------------------------------------------------------------------ rms_norm / swiglu / rotary
def test_rms_norm_mixed_dtype_like_op_plugin_test():
    """test_rms_norm_mix_dtype (smaller): fp16 x in [0, 100), fp32 gamma; reference in fp32, cast to fp16."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(16, 96, generator=gen) * 100).half()
    gamma = torch.randn(96, generator=gen)
    y, rstd = npu.npu_rms_norm(x, gamma)
    x32 = x.float()
    want_rstd = 1 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert y.dtype == torch.float16 and rstd.dtype == torch.float32 and rstd.shape == (16, 1)
    torch.testing.assert_close(rstd, want_rstd)
    torch.testing.assert_close(y, (x32 * want_rstd * gamma).half())
    assert npu.npu_rms_norm(torch.randn(24, 1, 128), torch.randn(128))[1].shape == (24, 1, 1)
    with pytest.raises(RuntimeError, match="dtypes"):
        npu.npu_rms_norm(x, gamma.to(BF16))


def test_swiglu_activates_first_half():
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(npu.npu_swiglu(x, dim=-1), F.silu(x[..., :4]) * x[..., 4:])
    assert npu.npu_swiglu(torch.randn(2, 32, 6, 6), dim=-1).shape == (2, 32, 6, 3)  # the doc example
    with pytest.raises(RuntimeError, match="non-contiguous"):
        npu.npu_swiglu(torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match="even"):
        npu.npu_swiglu(torch.randn(3, 5))


def test_rotary_half_and_interleave():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2, 5, 8, generator=gen)
    angles = torch.randn(1, 2, 1, 8, generator=gen)
    r1, r2 = angles.cos(), angles.sin()
    half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    torch.testing.assert_close(npu.npu_rotary_mul(x, r1, r2), x * r1 + half * r2)
    inter = torch.empty_like(x)  # rot[2i] = -x[2i+1], rot[2i+1] = x[2i]
    inter[..., 0::2], inter[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    seq_angles = torch.randn(1, 1, 5, 8, generator=gen)  # interleave takes an 11SD broadcast for BNSD x
    r1i, r2i = seq_angles.cos(), seq_angles.sin()
    torch.testing.assert_close(npu.npu_rotary_mul(x, r1i, r2i, "interleave"), x * r1i + inter * r2i)
    # op-plugin's interleave test shape: x [2, 2, 5, D] with r [1, 2, 1, D] (a 1S1D broadcast of BSND)
    assert npu.npu_rotary_mul(x, r1, r2, "interleave").shape == x.shape
    per_batch = torch.rand(2, 1, 5, 8)  # B1SD: allowed in half mode, not in interleave (11SD / 1S1D / S11D)
    assert npu.npu_rotary_mul(x, per_batch, per_batch).shape == x.shape
    with pytest.raises(RuntimeError, match="allowed broadcast"):
        npu.npu_rotary_mul(x, per_batch, per_batch, "interleave")


def test_rotary_constraints_and_mixed_dtypes():
    x = torch.randn(2, 4, 5, 16).to(BF16)
    angles = torch.randn(2, 1, 5, 16)
    r1, r2 = angles.cos(), angles.sin()
    out = npu.npu_rotary_mul(x, r1, r2)  # fp32 r1/r2 are cast to x's dtype first
    assert out.dtype == BF16
    torch.testing.assert_close(out, npu.npu_rotary_mul(x, r1.to(BF16), r2.to(BF16)), rtol=0, atol=0)
    for bad_x, bad_r, match in (
        (torch.randn(4, 5, 16), torch.randn(1, 5, 16).clamp(-1, 1), "4-D"),
        (torch.randn(1, 1, 5, 15), torch.rand(1, 1, 5, 15), "even"),
        (torch.randn(1, 1, 2, 896), torch.rand(1, 1, 2, 896), "below 896"),
        (torch.randn(2, 4, 5, 16), torch.rand(1, 4, 5, 16), "allowed broadcast"),
        (torch.randn(2, 4, 5, 16), torch.rand(1, 1, 5, 16) + 1.5, r"\[-1, 1\]"),
    ):
        with pytest.raises(RuntimeError, match=match):
            npu.npu_rotary_mul(bad_x, bad_r, bad_r)


# ------------------------------------------------------------------------------------------- autograd
def _with_grads(op, *inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = op(*leaves)
    out = out[0] if isinstance(out, tuple | list) else out
    out.pow(2).sum().backward()
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize(
    ("op", "reference", "inputs"),
    [
        (
            lambda x, g: npu.npu_rms_norm(x, g, epsilon=1e-5)[0],
            lambda x, g: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * g,
            (torch.randn(3, 4, 16), torch.randn(16)),
        ),
        (
            lambda x: npu.npu_swiglu(x, dim=-1),
            lambda x: F.silu(x[..., :6]) * x[..., 6:],
            (torch.randn(5, 12),),
        ),
        (
            lambda x, c, s: npu.npu_rotary_mul(x, c, s),
            lambda x, c, s: x * c + torch.cat((-x[..., 4:], x[..., :4]), -1) * s,
            (torch.randn(2, 3, 4, 8), torch.rand(2, 1, 4, 8), torch.rand(2, 1, 4, 8)),
        ),
    ],
    ids=["rms_norm", "swiglu", "rotary_mul"],
)
def test_ops_with_derivatives_match_autograd_of_their_formula(op, reference, inputs):
    got, got_grads = _with_grads(op, *inputs)
    want, want_grads = _with_grads(reference, *inputs)
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_ops_without_derivatives_give_no_gradient():
    """npu_grouped_matmul (never), permute/unpermute (before 7.2.0): backward warns and drops the gradient."""
    x = torch.randn(6, 4, requires_grad=True)
    w = torch.randn(2, 4, 3, requires_grad=True)
    tokens = torch.randn(3, 4).to(BF16).requires_grad_()
    indices = torch.tensor([[0, 1], [1, 0], [1, 1]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _gmm(x, w, torch.tensor([2, 4]))[0].sum().backward()
        permuted, rows = npu.npu_moe_token_permute(tokens, indices)
        npu.npu_moe_token_unpermute(permuted, rows, probs=torch.ones(3, 2).to(BF16)).float().sum().backward()
    assert x.grad is None and w.grad is None and tokens.grad is None
    assert any("autograd kernel was not registered" in str(c.message) for c in caught)


def _fake(mode: FakeTensorMode, value):
    if isinstance(value, list):
        return [_fake(mode, v) for v in value]
    return mode.from_tensor(value) if torch.is_tensor(value) else value


def test_fake_implementations_match_real_shapes():
    """Every op has a meta kernel (what torch.compile traces), agreeing with the CPU kernel on shapes/dtypes."""
    indices = torch.tensor([[0, 1], [1, 0], [1, 1]])
    permuted, rows = npu.npu_moe_token_permute(torch.randn(3, 4).to(BF16), indices)
    m_split = {"group_list": torch.tensor([2, 4]), "split_item": 2, "group_type": 0, "group_list_type": 1}
    k_split = {"group_list": torch.tensor([10, 20]), "split_item": 3, "group_type": 2, "group_list_type": 1}
    cases = [
        (npu.npu_rms_norm, (torch.randn(2, 3, 8).to(BF16), torch.randn(8)), {}),
        (npu.npu_swiglu, (torch.randn(4, 6),), {"dim": -1}),
        (npu.npu_rotary_mul, (torch.randn(2, 3, 4, 8), torch.rand(2, 1, 4, 8), torch.rand(2, 1, 4, 8)), {}),
        (npu.npu_grouped_matmul, ([torch.randn(6, 3)], [torch.randn(2, 4, 3).transpose(1, 2)]), m_split),
        (npu.npu_grouped_matmul, ([torch.randn(30, 12).t()], [torch.randn(30, 5)]), k_split),
        (npu.npu_moe_token_permute, (torch.randn(3, 4).to(BF16), indices, 4), {}),
        (npu.npu_moe_token_unpermute, (permuted, rows), {"probs": torch.ones(3, 2).to(BF16)}),
    ]
    for op, args, kwargs in cases:
        real = op(*args, **kwargs)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*_fake(mode, list(args)), **{k: _fake(mode, v) for k, v in kwargs.items()})
        reals = real if isinstance(real, tuple | list) else [real]
        fakes = fake if isinstance(fake, tuple | list) else [fake]
        assert [(t.shape, t.dtype) for t in fakes] == [(t.shape, t.dtype) for t in reals], op
