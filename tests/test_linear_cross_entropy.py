"""The fused linear cross-entropy on tiny models: each piece of transformers' loss semantics against the unpatched
model (fwd+bwd, every parameter's gradient), the paths that keep the original forward, the targets it refuses,
and torch.compile. ``cpu`` runs the portable kernel, ``cuda`` the Triton one (interpreter without a GPU),
``npu`` the Ascend one on the torch_npu stand-in."""

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config, Qwen3Config
from transformers.modeling_outputs import CausalLMOutputWithPast

import engine
from engine.patching import patched_call_of
from engine.spec import KernelSpec
from engine.testing import tiny_models
from tests.test_linear_cross_entropy_op import npu_cross_entropy_loss

IGNORE = -100
FP32_LOSS_RTOL, FP32_GRAD_RTOL = 1e-6, 1e-5
DENSE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)  # fmt: skip


@pytest.fixture(params=["cpu", "cuda"])
def device(request, monkeypatch):
    """The kernel device; ``npu`` (stand-in) where a test asks for it with ``indirect`` parametrization."""
    if request.param == "npu":
        from engine.testing.torch_npu_standin import torch_npu_standin

        monkeypatch.setenv("ENGINE_DEVICE", "npu")
        with torch_npu_standin() as standin:
            monkeypatch.setattr(standin, "npu_cross_entropy_loss", npu_cross_entropy_loss, raising=False)
            yield "npu"
        return
    yield request.param


def place(device: str) -> str:
    """Where the model lives: a real GPU for the Triton kernel when there is one, else the CPU."""
    return "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"


def spec_for(model: nn.Module, **options) -> KernelSpec:
    entry = {"name": "linear_cross_entropy", "kernel": "linear_cross_entropy",
             "target": {"module_class": type(model).__name__}, "options": options}  # fmt: skip
    return KernelSpec.model_validate({"name": "lce", "model_types": [model.config.model_type], "entries": [entry]})


def fuse(model: nn.Module, device: str = "cpu", **options):
    handle = engine.apply(model, spec_for(model, **options), device=device, verbose=False)
    assert [p.entry for p in handle.report.patched] == ["linear_cross_entropy"], handle.report.summary()
    return handle


def fwd_bwd(model: nn.Module, **batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_parity(model: nn.Module, device: str, **batch):
    """Unpatched, then fused: same loss, same gradient for every parameter (lm_head and embeddings included)."""
    ref, ref_grads = fwd_bwd(model, **batch)
    with fuse(model, device):
        out, grads = fwd_bwd(model, **batch)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=FP32_LOSS_RTOL, atol=1e-7)
    assert ref_grads.keys() == grads.keys()
    for name, want in ref_grads.items():
        assert rel(grads[name], want) < FP32_GRAD_RTOL, name
    return ref, out


def batch_for(model: nn.Module, batch: int = 2, seq: int = 12, seed: int = 1, device: str = "cpu") -> dict:
    return {k: v.to(device) for k, v in tiny_models.sample_batch(model, batch, seq, seed).items()}


def qwen3(tied: bool = False, **config) -> nn.Module:
    torch.manual_seed(0)
    cfg = Qwen3Config(**DENSE, tie_word_embeddings=tied, **config)
    cfg._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(cfg).train()


@pytest.mark.parametrize("device", ["cpu", "cuda", "npu"], indirect=True)
def test_label_shift_matches_transformers(device):
    model = tiny_models.build("qwen3").to(place(device))
    assert_parity(model, device, **batch_for(model, device=place(device)))


def test_conditional_generation_model_matches_transformers():
    model = tiny_models.build("qwen2_vl")
    assert_parity(model, "cpu", **batch_for(model))


def test_shift_labels_kwarg(device):
    model = tiny_models.build("qwen3").to(place(device))
    batch = batch_for(model, device=place(device))
    shifted = torch.roll(batch["labels"], 3, dims=1)  # any pre-shifted targets (e.g. sequence parallelism)
    shifted[:, :2] = IGNORE
    assert_parity(model, device, **batch, shift_labels=shifted)


def test_ignored_labels_and_custom_ignore_index(device):
    model = tiny_models.build("qwen3").to(place(device))
    batch = batch_for(model, device=place(device))
    batch["labels"][0, :7] = IGNORE  # prompt masking
    batch["labels"][1, 3::2] = IGNORE
    assert_parity(model, device, **batch)
    batch = batch_for(model, device=place(device))
    assert_parity(model, device, **batch, ignore_index=int(batch["labels"][0, 4]))


def test_num_items_in_batch_sums_then_divides(device):
    model = tiny_models.build("qwen3").to(place(device))
    batch = batch_for(model, device=place(device))
    batch["labels"][0, :5] = IGNORE
    items = torch.tensor(37, device=place(device)) if device == "cpu" else 37  # e.g. over accumulated batches
    assert_parity(model, device, **batch, num_items_in_batch=items)


def test_logits_to_keep(device):
    model = tiny_models.build("qwen3").to(place(device))
    batch = batch_for(model, device=place(device))
    kept = {"input_ids": batch["input_ids"], "labels": batch["labels"][:, -5:], "logits_to_keep": 5}
    assert_parity(model, device, **kept)
    with fuse(model, device), pytest.raises(ValueError, match="logits_to_keep"):
        model(**batch, logits_to_keep=5)


def test_final_logit_softcapping(device):
    cfg = Gemma2Config(**DENSE, final_logit_softcapping=2.0, sliding_window=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).train().to(place(device))
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits of a few units, where tanh bends
    ref, _ = assert_parity(model, device, **batch_for(model, device=place(device)))
    model.config.final_logit_softcapping = None  # the cap matters: without it the loss differs
    assert not torch.allclose(model(**batch_for(model, device=place(device))).loss, ref.loss)


def test_tied_embeddings_accumulate_into_one_parameter(device):
    model = qwen3(tied=True).to(place(device))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_parity(model, device, **batch_for(model, device=place(device)))


def test_bf16_within_stated_tolerance():
    """Stated bf16 tolerance: against an fp32 copy, the fused loss and all gradients together are no worse than
    1.5x transformers' own bf16 error plus 1e-3 (the same bound ``engine verify`` uses)."""
    exact = tiny_models.build("qwen3")
    model = copy.deepcopy(exact).to(torch.bfloat16)
    batch = batch_for(model)
    truth, truth_grads = fwd_bwd(exact, **batch)
    ref, ref_grads = fwd_bwd(model, **batch)
    with fuse(model):
        out, grads = fwd_bwd(model, **batch)

    def global_rel(g):
        num = sum(float((g[n].double() - t.double()).norm() ** 2) for n, t in truth_grads.items())
        return (num / sum(float(t.double().norm() ** 2) for t in truth_grads.values())) ** 0.5

    assert rel(out.loss, truth.loss) <= 1.5 * rel(ref.loss, truth.loss) + 1e-3
    assert global_rel(grads) <= 1.5 * global_rel(ref_grads) + 1e-3


def test_moe_router_aux_loss_is_added():
    model = tiny_models.build("qwen3_moe")
    model.config.output_router_logits = True
    ref, out = assert_parity(model, "cpu", **batch_for(model))
    assert out.aux_loss is not None and torch.equal(out.aux_loss, ref.aux_loss)


def test_autocast_matches_transformers_under_autocast():
    model = tiny_models.build("qwen3")  # fp32 weights, bf16 compute: a Trainer with bf16=True
    batch = batch_for(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = fwd_bwd(model, **batch)
        with fuse(model):
            out, grads = fwd_bwd(model, **batch)
    assert out.logits is None
    assert rel(out.loss, ref.loss) < 1e-3
    assert all(grads[n].dtype == torch.float32 and rel(grads[n], g) < 2e-2 for n, g in ref_grads.items())


def test_no_labels_eval_and_generation_keep_the_original_forward():
    model = tiny_models.build("qwen3")
    batch = batch_for(model)
    ids = batch["input_ids"]
    with torch.no_grad():
        want_logits = model(input_ids=ids).logits
        model.eval()
        want_eval = model(**batch)
        want_tokens = model.generate(ids[:, :4], max_new_tokens=5, do_sample=False)
        model.train()
        with fuse(model):
            torch.testing.assert_close(model(input_ids=ids).logits, want_logits, rtol=0, atol=0)
            model.eval()
            got = model(**batch)
            torch.testing.assert_close(got.logits, want_eval.logits, rtol=0, atol=0)
            torch.testing.assert_close(got.loss, want_eval.loss, rtol=0, atol=0)
            assert torch.equal(model.generate(ids[:, :4], max_new_tokens=5, do_sample=False), want_tokens)
            model.train()
            assert torch.equal(model.generate(ids[:, :4], max_new_tokens=5, do_sample=False), want_tokens)


def test_skip_logits_and_options_choose_per_call():
    model = tiny_models.build("qwen3")
    batch = batch_for(model)
    ref = model(**batch)
    with fuse(model):
        kept = model(**batch, skip_logits=False)  # the caller asks for logits: original forward
        torch.testing.assert_close(kept.logits, ref.logits, rtol=0, atol=0)
        model.eval()
        assert model(**batch).logits is not None
        forced = model(**batch, skip_logits=True)
        assert forced.logits is None and torch.allclose(forced.loss, ref.loss)
        model.train()
    model.eval()
    with fuse(model, fuse="always", logits="empty"):
        out = model(**batch)
        assert out.logits.shape == (2, 12, 0) and torch.allclose(out.loss, ref.loss)
        assert out.to_tuple()[0] is out.loss and out.to_tuple()[1] is out.logits  # tuple positions kept


def test_no_grad_with_labels_gives_the_loss_without_gradients():
    model = tiny_models.build("qwen3")
    batch = batch_for(model)
    with torch.no_grad():
        ref = model(**batch).loss
        with fuse(model):
            got = model(**batch).loss
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, rtol=FP32_LOSS_RTOL, atol=1e-7)


def test_compiled_fullgraph_matches_eager_transformers():
    model = tiny_models.build("qwen3")
    batch = batch_for(model)
    ref, ref_grads = fwd_bwd(model, **batch)
    torch._dynamo.reset()
    with fuse(model):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out, grads = fwd_bwd(compiled, **batch)
        out, grads = fwd_bwd(compiled, **batch)  # a second step reuses the graph
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=FP32_LOSS_RTOL, atol=1e-7)
    for name, want in ref_grads.items():
        assert rel(grads[f"_orig_mod.{name}"], want) < FP32_GRAD_RTOL


def test_revert_restores_model_and_head_and_deepcopy_carries_the_patch():
    model = tiny_models.build("qwen3")
    batch = batch_for(model)
    keys = set(model.state_dict())
    handle = fuse(model)
    twin = copy.deepcopy(model)
    assert twin(**batch).logits is None
    assert patched_call_of(model.lm_head) is not None  # the head's companion patch, installed with the entry
    assert patched_call_of(twin.lm_head).target is twin.lm_head
    with torch.no_grad():  # outside a fused call the patched head computes logits as before
        hidden = torch.randn(2, model.config.hidden_size)
        torch.testing.assert_close(model.lm_head(hidden), torch.nn.functional.linear(hidden, model.lm_head.weight))
    handle.revert()
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert model(**batch).logits is not None
    assert set(model.state_dict()) == keys


def test_head_under_an_accelerate_hook_runs_inside_the_hook():
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    model = tiny_models.build("qwen3")
    batch = batch_for(model)
    ref, ref_grads = fwd_bwd(model, **batch)
    add_hook_to_module(model.lm_head, Counting())
    hooked = model.lm_head.__dict__["_old_forward"]
    with fuse(model):
        out, grads = fwd_bwd(model, **batch)
    assert out.logits is None and Counting.calls == 1  # the fused call (the probe's twin has no hooks)
    assert model.lm_head.__dict__["_old_forward"] is hooked
    torch.testing.assert_close(out.loss, ref.loss, rtol=FP32_LOSS_RTOL, atol=1e-7)
    assert rel(grads["lm_head.weight"], ref_grads["lm_head.weight"]) < FP32_GRAD_RTOL


class ScaledHeadQwen3(type(qwen3())):
    """A forward that scales logits before its loss, which the kind does not declare: the probe must refuse it."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
        logits = self.lm_head(hidden) * 0.5
        loss = None if labels is None else self.loss_function(logits, labels, self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class LoraLikeHead(nn.Linear):
    def forward(self, x):
        return super().forward(x) + 0.0


@pytest.mark.parametrize(
    ("breaks", "reason"),
    [
        ("lora", "not a plain nn.Linear"),
        ("bias", "has a bias"),
        ("loss", "not transformers' ForCausalLMLoss"),
        ("softcap", "never applies it"),
        ("scale", "disagree"),
    ],
)
def test_targets_that_would_change_the_result_are_refused(breaks, reason):
    model = qwen3()
    if breaks == "lora":
        model.lm_head = LoraLikeHead(64, 128, bias=False)
    elif breaks == "bias":
        model.lm_head = nn.Linear(64, 128)
    elif breaks == "loss":
        model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    elif breaks == "softcap":
        model.config.final_logit_softcapping = 30.0
    else:
        model = ScaledHeadQwen3(model.config).train()
    plan = engine.plan(model, spec_for(model), device="cpu")
    assert not plan.patches
    assert reason in plan.skipped[0].reason, plan.skipped[0].reason


@pytest.mark.parametrize("order", ["patch_then_shard", "shard_then_patch"])
def test_fsdp2_sharded_head_is_unsharded_inside_the_fused_call(order):
    """FSDP2 on one gloo rank: decoder layers, the lm_head (its own unit, resharded after forward) and the root
    sharded; the fused loss runs inside the head's call, where FSDP2 has gathered the weight."""
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = tiny_models.build("qwen3")
        batch = batch_for(model)
        ref, ref_grads = fwd_bwd(model, **batch)
        handle = fuse(model) if order == "patch_then_shard" else None
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh)
        handle = handle or fuse(model)
        for _ in range(2):
            out, grads = fwd_bwd(model, **batch)
            assert out.logits is None
            torch.testing.assert_close(out.loss, ref.loss, rtol=FP32_LOSS_RTOL, atol=1e-7)
            for name, want in ref_grads.items():
                assert rel(grads[name].full_tensor(), want) < FP32_GRAD_RTOL, name
        handle.revert()
    finally:
        dist.destroy_process_group()
