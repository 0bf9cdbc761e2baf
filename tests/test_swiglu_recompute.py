"""The ``swiglu`` kind's ``recompute: projections`` option, model-level on both devices: same loss and gradients
as the unpatched model, and no ``[tokens, intermediate]`` tensor kept from forward to backward."""

import pytest
import torch

import engine
from engine.catalog import find_spec
from engine.errors import SpecError
from engine.testing import tiny_models
from tests.parity import assert_close_grads, loss_and_grads

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _spec(recompute: str):
    spec = find_spec("qwen3")
    entries = [
        e.model_copy(update={"options": {"recompute": recompute}}) if e.kernel == "swiglu" else e for e in spec.entries
    ]
    return spec.model_copy(update={"entries": entries})


def _saved_intermediates(model, batch) -> int:
    """Distinct storages of saved tensors as wide as the MLP's intermediate layer, parameters aside."""
    width = model.config.intermediate_size
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if t.dim() >= 2 and t.shape[-1] == width and ptr not in params:
            seen.add(ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return len(seen)


@pytest.mark.parametrize("device", ["cuda", "npu"])
def test_recompute_projections_keeps_no_intermediate_and_changes_no_gradient(device, request):
    if device == "npu":
        request.getfixturevalue("npu_standin")
    on = DEVICE if device == "cuda" else "cpu"
    model = tiny_models.build("qwen3").to(on)
    batch = {k: v.to(on) for k, v in tiny_models.sample_batch(model).items()}
    ref_loss, ref_grads = loss_and_grads(model, batch)
    with engine.apply(model, spec=_spec("activation"), device=device, verbose=False):
        kept_by_default = _saved_intermediates(model, batch)
    with engine.apply(model, spec=_spec("projections"), device=device, verbose=False) as handle:
        assert "swiglu" in {p.entry for p in handle.report.patched}
        kept = _saved_intermediates(model, batch)
        loss, grads = loss_and_grads(model, batch)
    assert kept_by_default >= model.config.num_hidden_layers  # gate and up at least, per layer
    assert kept == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_close_grads(ref_grads, grads, rtol=1e-4)


@pytest.mark.parametrize("given_as", ["copied entry", "dict"])
def test_unknown_recompute_value_is_a_one_line_error_naming_the_entry(given_as):
    """Also when the entry was copied with new options (``model_copy`` skips validation)."""
    model = tiny_models.build("qwen3")
    entry = {"name": "mlp", "kernel": "swiglu", "target": {"module_class": "Qwen3MLP"},
             "options": {"recompute": "everything"}}  # fmt: skip
    spec = (
        _spec("everything")
        if given_as == "copied entry"
        else {"name": "t", "model_types": ["qwen3"], "entries": [entry]}
    )
    with pytest.raises(SpecError) as info:
        engine.apply(model, spec=spec, device="cuda", verbose=False)
    message = str(info.value)
    assert "\n" not in message and "recompute" in message and "'projections'" in message  # what it may be
    assert ("'swiglu'" if given_as == "copied entry" else "'mlp'") in message
