"""The Triton embedding gradient (``engine::embedding``) against PyTorch's, and the ``embedding`` kind's rules.

On CPU the kernels run under the Triton interpreter; on a GPU the same tests run the compiled kernels.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine.kernels.kinds import embedding as kind
from engine.kernels.triton.ops import embedding as ops
from engine.testing import tiny_models

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _table(vocab: int, hidden: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, hidden, generator=gen).to(DEVICE, dtype)


def _ids(vocab: int, shape, heavy: dict[int, int] | None = None, seed=1) -> torch.Tensor:
    """Random ids, then ``heavy[id]`` copies of each heavy id spread over the front."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, vocab, (int(torch.tensor(shape).prod()),), generator=gen)
    at = 0
    for token, count in (heavy or {}).items():
        flat[at : at + count] = token
        at += count
    return flat[torch.randperm(flat.numel(), generator=gen)].view(shape).to(DEVICE)


def _grads(ids, table, padding_idx, upstream, ours: bool):
    w = table.detach().clone().requires_grad_()
    out = ops.embedding(ids, w, padding_idx) if ours else F.embedding(ids, w, padding_idx)
    out.backward(upstream)
    return out.detach(), w.grad


CASES = {  # vocab, hidden, ids shape, heavy ids {id: count}, padding_idx
    "uniform": (50, 40, (3, 10), {}, None),
    "heavy_rows_and_padding": (37, 300, (4, 50), {3: 70, 11: 9, 20: 8}, 3),  # 9 > CAP, 8 == CAP
    "heavy_row_over_several_token_blocks": (12, 16, (200,), {5: 150}, None),
    "negative_padding_idx": (30, 8, (2, 7), {29: 12}, -1),
    "light_padding_row": (20, 12, (3, 5), {4: 3}, 4),
    "single_token": (9, 33, (1,), {}, None),
}


@pytest.mark.parametrize("case", CASES)
def test_fp32_gradient_matches_pytorch(case):
    vocab, hidden, shape, heavy, padding_idx = CASES[case]
    table, ids = _table(vocab, hidden), _ids(vocab, shape, heavy)
    upstream = torch.randn(*shape, hidden, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out, grad = _grads(ids, table, padding_idx, upstream, ours=True)
    want_out, want_grad = _grads(ids, table, padding_idx, upstream, ours=False)
    assert torch.equal(out, want_out)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-5)  # fp32 sums in another order
    if padding_idx is not None:
        assert not grad[padding_idx].any()
    unused = torch.ones(vocab, dtype=torch.bool, device=DEVICE)
    unused[ids.reshape(-1)] = False
    assert not grad[unused].any()  # rows no token uses are written as zeros


def test_bf16_gradient_is_the_fp32_sum_rounded_once():
    """Each row: the fp32 sum of its tokens' bf16 gradients, rounded once; PyTorch's bf16 result is no closer."""
    vocab, hidden, shape = 64, 48, (6, 40)
    table, ids = _table(vocab, hidden, torch.bfloat16), _ids(vocab, shape, {7: 100, 8: 20})
    upstream = torch.randn(*shape, hidden, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.bfloat16)
    _, grad = _grads(ids, table, None, upstream, ours=True)
    exact = torch.zeros(vocab, hidden, dtype=torch.float64, device=DEVICE)
    exact.index_add_(0, ids.reshape(-1), upstream.reshape(-1, hidden).double())
    ours = (grad.double() - exact).abs().max()
    _, theirs_grad = _grads(ids, table, None, upstream, ours=False)
    theirs = (theirs_grad.double() - exact).abs().max()
    assert ours <= theirs + 1e-12
    assert ours <= exact.abs().max() * 2**-8  # at most half a bf16 ulp above the largest row, plus fp32 sums


def test_gradient_is_deterministic_and_writes_every_row(monkeypatch):
    vocab, hidden, shape = 40, 20, (5, 30)
    ids = _ids(vocab, shape, {1: 60})
    upstream = torch.randn(*shape, hidden, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    first = ops.EMBEDDING_BACKWARD(upstream, ids, vocab, -1)
    real_new_empty = torch.Tensor.new_empty

    def poisoned(self, *size, **kwargs):  # every buffer the op allocates starts as NaN, not zeros
        out = real_new_empty(self, *size, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)
    second = ops.EMBEDDING_BACKWARD(upstream, ids, vocab, -1)
    assert torch.equal(first, second)


def test_strided_upstream_gradient_and_int32_ids():
    vocab, hidden = 25, 16
    ids = _ids(vocab, (3, 9), {4: 10}).to(torch.int32)
    wide = torch.randn(3, 9, hidden * 2, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    upstream = wide[..., ::2]  # non-unit column stride
    got = ops.EMBEDDING_BACKWARD(upstream, ids, vocab, -1)
    want = torch.ops.aten.embedding_dense_backward(upstream, ids.long(), vocab, -1, False)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_empty_ids_give_a_zero_gradient():
    no_ids = torch.zeros(0, dtype=torch.long, device=DEVICE)
    got = ops.EMBEDDING_BACKWARD(torch.zeros(0, 8, device=DEVICE), no_ids, 10, -1)
    assert got.shape == (10, 8) and not got.any()


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="must be 2-D"):
        ops.embedding(torch.zeros(3, dtype=torch.long), torch.zeros(4))
    with pytest.raises(ValueError, match="int32/int64"):
        ops.embedding(torch.zeros(3), torch.zeros(4, 2))


class ScaledEmbedding(nn.Embedding):
    def forward(self, input):
        return super().forward(input) * 2.0


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (nn.Embedding(10, 4, max_norm=1.0), "max_norm renormalises"),
        (nn.Embedding(10, 4, sparse=True), "sparse gradients"),
        (nn.Embedding(10, 4, scale_grad_by_freq=True), "scale_grad_by_freq"),
        (ScaledEmbedding(10, 4), "overrides nn.Embedding.forward"),
        (nn.Linear(4, 4), "is not an nn.Embedding"),
    ],
)
def test_check_refuses_what_the_kernel_would_change(module, reason):
    assert reason in kind.check(module, None)


def test_check_and_probe_accept_a_plain_table():
    module = nn.Embedding(10, 4, padding_idx=0)
    assert kind.check(module, None) is None and kind.probe(module, None) is None
    assert kind.fits(torch.zeros(2, dtype=torch.long)) and not kind.fits(torch.zeros(2))


def test_a_subclass_met_after_planning_keeps_its_own_forward():
    module = ScaledEmbedding(10, 4).to(DEVICE)
    ids = torch.tensor([1, 2, 2], device=DEVICE)
    got = engine.TritonEmbeddingKernel.run(module, None, ids)
    torch.testing.assert_close(got, module.weight[ids] * 2.0)


def test_model_with_tied_head_gets_both_gradients_and_reverts():
    """With the output head tied to the table (Qwen3-0.6B's tie_word_embeddings), the weight gradient is the sum
    of both uses."""
    model = tiny_models.build("qwen3").to(DEVICE)
    model.lm_head.weight = model.model.embed_tokens.weight
    ids = _ids(model.config.vocab_size, (2, 12), {3: 10})
    model(input_ids=ids, labels=ids).loss.backward()
    want = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    spec = engine.find_spec("qwen3")
    only = spec.model_copy(update={"entries": [e for e in spec.entries if e.kernel == "embedding"]})
    with engine.apply(model, spec=only, device="cuda", verbose=False) as handle:
        assert [p.entry for p in handle.report.patched] == ["embedding"]
        assert "model.embed_tokens" in handle.report.patched[0].modules
        model(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, want, rtol=1e-5, atol=1e-6)
    assert "forward" not in vars(model.model.embed_tokens)
