import pytest
import torch

import engine
from engine.device import detect_device, validate_device
from engine.errors import UnknownKernelError
from engine.kernels.base import Kernel
from engine.registry import REGISTRY


def test_kernel_classes_register_with_type_and_device():
    for cls, kind, device in [
        (engine.NpuRMSNormKernel, "rms_norm", "npu"),
        (engine.NpuSwiGluKernel, "swiglu", "npu"),
        (engine.NpuRoPEKernel, "rope", "npu"),
        (engine.NpuQwen2VLRoPEKernel, "vision_rope", "npu"),
        (engine.NpuMoEFusedMoEKernel, "fused_moe", "npu"),
        (engine.TritonRMSNormKernel, "rms_norm", "cuda"),
    ]:
        assert (cls.type, cls.device) == (kind, device)
        assert REGISTRY.get(kind, device) is cls
    assert engine.NpuQwen2VLRoPEKernel.auto_register is False
    assert engine.NpuQwen2VLRoPEKernel not in REGISTRY.for_device("npu")
    assert engine.NpuQwen2VLRoPEKernel in REGISTRY.for_device("npu", include_manual=True)


def test_metakernel_registers_subclasses_and_rejects_unknown_types():
    class MyXpuNorm(Kernel):
        type = "rms_norm"
        device = "xpu"

    try:
        assert REGISTRY.get("rms_norm", "xpu") is MyXpuNorm
    finally:
        REGISTRY.unregister(MyXpuNorm)
    assert REGISTRY.get("rms_norm", "xpu") is None

    class Helper(Kernel):  # no type/device: not registered
        pass

    assert "Helper" not in REGISTRY.names()
    with pytest.raises(UnknownKernelError, match="unknown kernel 'warp_drive'"):

        class Bad(Kernel):
            type = "warp_drive"
            device = "cuda"


def test_device_detection_order(monkeypatch):
    import engine.device as device

    monkeypatch.delenv("ENGINE_DEVICE", raising=False)
    flags = {"npu": False, "cuda": False, "xpu": False, "mps": False}
    monkeypatch.setattr(device, "_npu_available", lambda: flags["npu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: flags["cuda"])
    monkeypatch.setattr(device, "_xpu_available", lambda: flags["xpu"])
    monkeypatch.setattr(device, "_mps_available", lambda: flags["mps"])
    assert detect_device() == "cpu"
    for name in ("mps", "xpu", "cuda", "npu"):
        flags[name] = True
        assert detect_device() == name
    monkeypatch.setenv("ENGINE_DEVICE", "xpu")
    assert detect_device() == "xpu"


def test_validate_device():
    assert validate_device("cuda:1") == "cuda"
    with pytest.raises(ValueError, match="unsupported device 'tpu'"):
        validate_device("tpu")


def test_npu_is_not_detected_without_torch_npu(monkeypatch):
    import engine.device as device

    monkeypatch.setattr(device, "torch_npu_installed", lambda: False)
    assert device._npu_available() is False
