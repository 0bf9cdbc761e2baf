"""Test setup: Triton kernels run through the interpreter on CPU unless a GPU is present."""

import gc
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton.jit decoration

import pytest  # noqa: E402

import engine  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leftover_patches():
    """Every test must leave no process-wide patch behind once its models are gone."""
    from engine import patching

    yield
    if patching.FUNCTION_PATCHES:  # a full collection costs ~0.1-0.3 s: only when a patch is still held
        gc.collect()  # models a test dropped without revert release their shares when collected
    leftover = list(patching.FUNCTION_PATCHES)
    for state in list(patching.FUNCTION_PATCHES.values()):
        state.users = 1
        patching.release_function_patch(state)
    assert not leftover, f"test left process-wide patches: {leftover}"


@pytest.fixture()
def npu_standin(monkeypatch):
    """torch_npu's CPU stand-in, with the device set to npu the way ENGINE_DEVICE overrides detection."""
    from engine.testing.torch_npu_standin import torch_npu_standin

    monkeypatch.setenv("ENGINE_DEVICE", "npu")
    with torch_npu_standin() as module:
        yield module


def pytest_report_header(config):
    kernels = ", ".join(engine.REGISTRY.names())
    return f"engine kernels: {kernels}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
