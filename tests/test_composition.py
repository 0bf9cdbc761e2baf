"""Patches compose with accelerate dispatch, PEFT LoRA (either order) and gradient checkpointing (CPU, stand-in)."""

from __future__ import annotations

import pytest
import torch

import engine
from engine.patching import patched_call_of
from engine.testing import tiny_models
from engine.testing.torch_npu_standin import calls
from tests.parity import assert_close_grads, loss_and_grads, snapshot

accelerate = pytest.importorskip("accelerate")
peft = pytest.importorskip("peft")


def _hooked_modules(model):
    return [m for m in model.modules() if "_hf_hook" in m.__dict__]


@pytest.mark.parametrize("order", ["patch_after_dispatch", "patch_before_dispatch"])
def test_cpu_offload_runs_kernels_inside_the_hook_and_revert_restores_it(npu_standin, order):
    model = tiny_models.build("qwen3")
    batch = tiny_models.sample_batch(model)
    ref = model(**batch).loss.detach()
    if order == "patch_before_dispatch":
        handle = engine.apply(model, spec="qwen3", verbose=False)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    hooked_forwards = {id(m): m.__dict__["forward"] for m in _hooked_modules(model)}
    assert model.model.norm.weight.is_meta  # offloaded: the hook brings the weight in for each call
    if order == "patch_after_dispatch":
        handle = engine.apply(model, spec="qwen3", verbose=False)
        assert "probed on random weights (meta parameters)" in handle.report.summary()
    assert isinstance(model.model.norm.__dict__["_old_forward"], type(patched_call_of(model.model.norm)))
    calls.clear()
    torch.testing.assert_close(model(**batch).loss, ref, rtol=1e-5, atol=1e-6)
    assert calls["npu_rms_norm"] and calls["npu_swiglu"] and calls["npu_rotary_mul"]
    handle.revert()
    assert {id(m): m.__dict__["forward"] for m in _hooked_modules(model)} == hooked_forwards
    assert all(patched_call_of(m) is None for m in model.modules())
    calls.clear()
    torch.testing.assert_close(model(**batch).loss, ref, rtol=1e-5, atol=1e-6)
    assert not calls


def test_empty_weights_then_dispatch_with_disk_offload(npu_standin, tmp_path):
    source = tiny_models.build("llama")
    batch = tiny_models.sample_batch(source)
    ref = source(**batch).loss.detach()
    source.save_pretrained(tmp_path / "ckpt")
    with accelerate.init_empty_weights():
        model = type(source)(source.config)
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk"}
    device_map |= {"model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = accelerate.load_checkpoint_and_dispatch(
        model, str(tmp_path / "ckpt"), device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    with engine.apply(model, spec="llama", verbose=False):
        calls.clear()
        torch.testing.assert_close(model(**batch).loss, ref, rtol=1e-5, atol=1e-6)
        assert calls["npu_rms_norm"] == 5  # the disk-offloaded final norm too
    torch.testing.assert_close(model(**batch).loss, ref, rtol=1e-5, atol=1e-6)


def _lora(model):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0
    )
    torch.manual_seed(3)
    lora_model = peft.get_peft_model(model, config)
    with torch.no_grad():  # LoRA B starts at zero; make the adapters matter
        for name, param in lora_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return lora_model


@pytest.mark.parametrize("order", ["lora_then_patch", "patch_then_lora"])
def test_lora_either_order_matches_unpatched_lora(npu_standin, order):
    ref_model = _lora(tiny_models.build("qwen3"))
    batch = tiny_models.sample_batch(ref_model)
    ref_loss, ref_grads = loss_and_grads(ref_model, batch)

    model = tiny_models.build("qwen3")
    if order == "patch_then_lora":
        engine.apply(model, spec="qwen3", verbose=False)
        model = _lora(model)
    else:
        model = _lora(model)
        engine.apply(model, spec="qwen3", verbose=False)
    patched = {p.entry for p in engine.kernel_report(model).patched}
    assert patched == {"rms_norm", "swiglu", "rope", "rope_table", "sdpa_is_causal", "linear_cross_entropy"}
    before = snapshot(model)
    calls.clear()
    loss, grads = loss_and_grads(model, batch)
    assert calls["npu_swiglu"] == 2
    assert any("lora_B" in n for n in grads)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, rtol=1e-4)
    assert all(torch.equal(t, snapshot(model)[n]) for n, t in before.items())
    engine.revert(model)
    assert all(patched_call_of(m) is None for m in model.modules())


@pytest.mark.parametrize(
    "reentrant, newer", [(False, {}), (True, {}), (False, {"every_n_layers": 2}), (False, {"offload": True})]
)
def test_gradient_checkpointing_matches(npu_standin, reentrant, newer):
    """Both checkpointing flavours, and the newer API's partial checkpointing and host offload where it exists."""
    if newer.get("offload") and not torch.accelerator.is_available():
        pytest.skip("transformers pins the offloaded activations' host memory, which needs an accelerator")
    model = tiny_models.build("qwen3_moe")
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **newer)
    elif newer:
        pytest.skip(f"this transformers has no activation_checkpointing_enable({', '.join(newer)}=...)")
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert model.model.gradient_checkpointing
    model.config.use_cache = False
    batch = tiny_models.sample_batch(model)
    ref_loss, ref_grads = loss_and_grads(model, batch)
    with engine.apply(model, spec="qwen3_moe", verbose=False):
        calls.clear()
        loss, grads = loss_and_grads(model, batch)
        assert calls["npu_grouped_matmul"] >= 2 * 2  # forward twice per MoE layer (recomputed) at least
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, rtol=1e-4)
