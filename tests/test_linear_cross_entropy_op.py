"""The chunked linear cross-entropy op against the full-logits math: every chunk loss (torch, Triton through the
interpreter or on a GPU, torch_npu's op through a stand-in), dtypes, softcapping, ignored targets, chunking."""

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.kinds.linear_cross_entropy import denominator, reference
from engine.kernels.portable.ops import linear_cross_entropy as lce_op
from engine.kernels.portable.ops.linear_cross_entropy import chunk_rows, linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def npu_cross_entropy_loss(input, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0,
                           lse_square_scale_for_zloss=0.0, return_zloss=False):  # fmt: skip
    """Stand-in of ``torch_npu.npu_cross_entropy_loss`` per its documentation (Ascend Extension for PyTorch API
    reference): input [N, C], target [N] int64 in [0, C), a negative ignore_index ignores nothing; returns
    (loss, log_prob, zloss, lse_for_zloss) with loss and log_prob in the input dtype."""
    assert weight is None and label_smoothing == 0.0 and not return_zloss
    assert input.dim() == 2 and target.shape == input.shape[:1] and target.dtype == torch.int64
    assert 0 < input.shape[0] <= 200_000 and bool(((target >= 0) & (target < input.shape[1])).all())
    log_prob = torch.log_softmax(input.float(), dim=-1)
    loss = -log_prob.gather(1, target[:, None]).squeeze(1)
    if ignore_index >= 0:
        loss = loss.masked_fill(target == ignore_index, 0.0)
    if reduction != "none":
        loss = loss.sum().reshape(1) / (1 if reduction == "sum" else loss.numel())
    empty = input.new_empty(0)
    return loss.to(input.dtype), log_prob.to(input.dtype), empty, empty


@pytest.fixture(params=["torch", "triton", "npu"])
def impl(request, monkeypatch):
    if request.param == "triton":
        import engine.kernels.triton.ops.linear_cross_entropy  # noqa: F401  (registers the chunk loss)
    if request.param == "npu":
        from engine.testing.torch_npu_standin import torch_npu_standin

        calls = []

        def counted(*args, **kwargs):
            calls.append(1)
            return npu_cross_entropy_loss(*args, **kwargs)

        with torch_npu_standin() as standin:
            monkeypatch.setattr(standin, "npu_cross_entropy_loss", counted, raising=False)
            yield "npu"
        assert calls, "the npu chunk loss never reached npu_cross_entropy_loss"
        return
    yield request.param


def _problem(n=37, h=16, v=200, dtype=torch.float32, ignored=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(DEVICE, dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored] = IGNORE
    return hidden, weight, targets.to(DEVICE)


def _grads(fn, hidden, weight):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize(("softcap", "num_items"), [(None, None), (3.0, 50)])
def test_fp32_matches_full_logits_math(impl, softcap, num_items):
    hidden, weight, targets = _problem(n=150)
    denom = denominator(targets, IGNORE, num_items)
    chunk = 64 * 200 * 4  # 64-row chunks (the floor) for every chunk loss: three, the last one ragged
    got = _grads(lambda h, w: linear_cross_entropy(h, w, targets, denom, IGNORE, softcap, impl=impl, chunk_bytes=chunk),
                 hidden, weight)  # fmt: skip
    want = _grads(lambda h, w: reference(h, w, targets, denom, IGNORE, softcap), hidden, weight)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert _rel(got[1], want[1]) < 1e-5 and _rel(got[2], want[2]) < 1e-5


def test_bf16_error_is_no_worse_than_transformers_bf16(impl):
    """Both against fp32 math: the fused bf16 loss and gradients within 1.5x the unfused bf16 error + 1e-3."""
    hidden, weight, targets = _problem(n=96, v=300, dtype=torch.bfloat16)
    denom = denominator(targets, IGNORE)
    chunk = 64 * 300 * 16
    got = _grads(lambda h, w: linear_cross_entropy(h, w, targets, denom, IGNORE, impl=impl, chunk_bytes=chunk),
                 hidden, weight)  # fmt: skip
    unfused = _grads(lambda h, w: reference(h, w, targets, denom), hidden, weight)
    exact = _grads(lambda h, w: reference(h, w, targets, denom), hidden.float(), weight.float())
    for ours, theirs, truth in zip(got, unfused, exact, strict=True):
        assert _rel(ours, truth) <= 1.5 * _rel(theirs, truth) + 1e-3


@pytest.mark.parametrize(("need_hidden", "need_weight"), [(True, False), (False, True)])
def test_only_the_gradients_asked_for(impl, need_hidden, need_weight):
    """A frozen head (LoRA training) or frozen hidden states: the other gradient alone, still exact."""
    hidden, weight, targets = _problem()
    h, w = hidden.clone().requires_grad_(need_hidden), weight.clone().requires_grad_(need_weight)
    denom = denominator(targets, IGNORE)
    loss = linear_cross_entropy(h, w, targets, denom, IGNORE, impl=impl)
    loss.backward()
    want = _grads(lambda a, b: reference(a, b, targets, denom), hidden, weight)
    torch.testing.assert_close(loss.detach(), want[0])
    assert (h.grad is not None) == need_hidden and (w.grad is not None) == need_weight
    got = h.grad if need_hidden else w.grad
    assert _rel(got, want[1] if need_hidden else want[2]) < 1e-5


def test_no_grad_and_all_targets_ignored(impl):
    hidden, weight, targets = _problem(ignored=1.0)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, denominator(targets, IGNORE), IGNORE, impl=impl)
    assert torch.isnan(loss)  # like transformers' mean over zero targets
    loss = linear_cross_entropy(hidden, weight, targets, denominator(targets, IGNORE, 8), IGNORE, impl=impl)
    assert loss.item() == 0.0


def test_upstream_gradient_scales_in_fp32(impl):
    """backward multiplies by the incoming gradient in fp32 (1/3 is not a bf16 number)."""
    hidden, weight, targets = _problem(dtype=torch.bfloat16)
    denom = denominator(targets, IGNORE)
    h = hidden.clone().requires_grad_()
    (linear_cross_entropy(h, weight, targets, denom, IGNORE, impl=impl) / 3).backward()
    h1 = hidden.clone().requires_grad_()
    linear_cross_entropy(h1, weight, targets, denom, IGNORE, impl=impl).backward()
    third = torch.ones((), device=DEVICE) / 3  # the upstream gradient autograd hands over, in fp32
    torch.testing.assert_close(h.grad, (h1.grad.float() * third).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("one_chunk", [True, False])
def test_one_chunk_defers_the_weight_gradient_to_backward(impl, one_chunk):
    """One chunk keeps the logits gradient [N, V] (not a [V, H] weight gradient) and forms the weight gradient in
    backward from hidden states scaled by the upstream gradient; several chunks keep the weight gradient."""
    hidden, weight, targets = _problem(n=150)
    denom = denominator(targets, IGNORE)
    chunk = (1 << 30) if one_chunk else 64 * 200 * 4  # else 64-row chunks (the floor) for every chunk loss
    assert lce_op.defers_weight_grad(hidden, weight, chunk, impl, True) == one_chunk
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(h, w, targets, denom, IGNORE, impl=impl, chunk_bytes=chunk)
    (loss * 0.37).backward()
    assert ((150, 200) in saved) == one_chunk and ((200, 16) in saved) != one_chunk
    want = _grads(lambda a, b: reference(a, b, targets, denom) * 0.37, hidden, weight)
    assert _rel(h.grad, want[1]) < 1e-5 and _rel(w.grad, want[2]) < 1e-5


def test_second_backward_through_it_is_refused():
    hidden, weight, targets = _problem()
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, targets, denominator(targets, IGNORE), IGNORE)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_triton_chunk_loss_over_several_vocabulary_blocks(softcap):
    from engine.kernels.triton.ops.linear_cross_entropy import triton_chunk_loss

    logits, _, targets = _problem(n=9, h=300, v=1)  # logits [9, 300]
    targets = torch.tensor([0, 299, 150, IGNORE, 64, 63, 128, 1, 255], device=DEVICE)
    denom = torch.tensor(7.0, device=DEVICE)
    want_rows = torch.empty(9, device=DEVICE)
    want = logits.clone()
    lce_op.torch_chunk_loss(want, targets, denom, want_rows, IGNORE, softcap, True)
    rows = torch.empty(9, device=DEVICE)
    got = logits.clone()
    triton_chunk_loss(got, targets, denom, rows, IGNORE, softcap, True, block=64)
    torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert rows[3] == 0 and not got[3].any()


def test_chunk_rows_stay_within_the_budget_and_balance():
    vocab, per_logit = 151936, 2
    for rows in (1, 63, 64, 1000, 8192, 32768, 100_003):
        for budget in (1, 64 << 20, 256 << 20, 1 << 30):
            r = chunk_rows(rows, vocab, per_logit, budget)
            assert 1 <= r <= rows
            fits = max(64, budget // (vocab * per_logit) // 64 * 64)
            assert r <= fits  # the buffer never exceeds the budget, except at the 64-row floor
            chunks = -(-rows // r)
            assert chunks == -(-rows // min(rows, fits))  # as few chunks as the budget allows
            assert r == rows or r % 64 == 0


def test_op_traces_without_graph_break():
    hidden, weight, targets = _problem()
    denom = denominator(targets, IGNORE)

    def step(h, w):
        return linear_cross_entropy(h, w, targets, denom, IGNORE, 2.0)

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(h, w)
    loss.backward()
    want = _grads(lambda a, b: reference(a, b, targets, denom, IGNORE, 2.0), hidden, weight)
    torch.testing.assert_close(loss.detach(), want[0])
    assert _rel(h.grad, want[1]) < 1e-5 and _rel(w.grad, want[2]) < 1e-5


def test_reference_is_transformers_loss():
    """The kind's declared math is transformers' ForCausalLMLoss on the same logits (mean and num_items)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    hidden, weight, _ = _problem(n=24)
    labels = torch.randint(0, 200, (2, 12), device=DEVICE)
    labels[0, :3] = IGNORE
    logits = F.linear(hidden, weight).view(2, 12, 200)
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    for items in (None, 17):
        want = ForCausalLMLoss(logits, labels, 200, num_items_in_batch=items)
        got = reference(hidden, weight, targets, denominator(targets, IGNORE, items))
        torch.testing.assert_close(got, want)
