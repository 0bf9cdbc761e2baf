import pytest
import torch

import engine
from engine.device import DeviceType, detect_device, validate_device
from engine.errors import UnknownKernelError
from engine.kernels.base import MetaKernel
from engine.kernels.npu.linear_cross_entropy import NpuLinearCrossEntropyKernel
from engine.kernels.portable.linear_cross_entropy import (
    CpuLinearCrossEntropyKernel,
    MpsLinearCrossEntropyKernel,
    XpuLinearCrossEntropyKernel,
)
from engine.kernels.portable.rope_table import (
    CpuRopeTableKernel,
    CudaRopeTableKernel,
    MpsRopeTableKernel,
    NpuRopeTableKernel,
    XpuRopeTableKernel,
)
from engine.kernels.portable.sdpa_is_causal import (
    CpuSdpaIsCausalKernel,
    CudaSdpaIsCausalKernel,
    MpsSdpaIsCausalKernel,
    NpuSdpaIsCausalKernel,
    XpuSdpaIsCausalKernel,
)
from engine.kernels.registry import REGISTRY
from engine.kernels.triton.linear_cross_entropy import TritonLinearCrossEntropyKernel

SDPA_IS_CAUSAL = (
    CudaSdpaIsCausalKernel,
    NpuSdpaIsCausalKernel,
    CpuSdpaIsCausalKernel,
    XpuSdpaIsCausalKernel,
    MpsSdpaIsCausalKernel,
)
ROPE_TABLE = (CudaRopeTableKernel, NpuRopeTableKernel, CpuRopeTableKernel, XpuRopeTableKernel, MpsRopeTableKernel)
SHIPPED = [
    (engine.NpuRMSNormKernel, "rmsnorm", "rms_norm", "npu"),
    (engine.NpuSwiGluKernel, "swiglu", "swiglu", "npu"),
    (engine.NpuRoPEKernel, "rope", "rope", "npu"),
    (engine.NpuQwen2VLRoPEKernel, "rope", "vision_rope", "npu"),
    (engine.NpuMoEFusedMoEKernel, "moe", "fused_moe", "npu"),
    (engine.TritonRMSNormKernel, "rmsnorm", "rms_norm", "cuda"),
    (engine.TritonSwiGLUKernel, "swiglu", "swiglu", "cuda"),
    (engine.TritonRoPEKernel, "rope", "rope", "cuda"),
    (engine.TritonVisionRoPEKernel, "rope", "vision_rope", "cuda"),
    (engine.TritonMRoPEKernel, "rope", "mrope", "cuda"),
    (engine.TritonFusedMoEKernel, "moe", "fused_moe", "cuda"),
    (engine.TritonEmbeddingKernel, "embedding", "embedding", "cuda"),
    (TritonLinearCrossEntropyKernel, "linear_cross_entropy", "linear_cross_entropy", "cuda"),
    (NpuLinearCrossEntropyKernel, "linear_cross_entropy", "linear_cross_entropy", "npu"),
    (CpuLinearCrossEntropyKernel, "linear_cross_entropy", "linear_cross_entropy", "cpu"),
    (MpsLinearCrossEntropyKernel, "linear_cross_entropy", "linear_cross_entropy", "mps"),
    (XpuLinearCrossEntropyKernel, "linear_cross_entropy", "linear_cross_entropy", "xpu"),
    *((cls, "attention", "sdpa_is_causal", cls.device.value) for cls in SDPA_IS_CAUSAL),
    *((cls, "rope", "rope_table", cls.device.value) for cls in ROPE_TABLE),
]


def test_the_table_below_covers_every_shipped_kernel_class():
    shipped = {k for k in REGISTRY.all() if k.__module__.startswith("engine.")}
    assert shipped == {row[0] for row in SHIPPED}


@pytest.mark.parametrize("cls, kernel_type, kind, device", SHIPPED)
def test_shipped_kernels_declare_seed_types_and_register(cls, kernel_type, kind, device):
    assert issubclass(cls, MetaKernel)
    assert (cls.type, cls.kind, cls.device) == (kernel_type, kind, device)
    assert isinstance(cls.type, engine.KernelType) and isinstance(cls.device, DeviceType)
    assert REGISTRY.get(kind, device) is cls
    assert (cls in REGISTRY.registered(device)) is cls.auto_register


def test_manual_kernels_are_known_but_not_registered():
    assert engine.NpuQwen2VLRoPEKernel.auto_register is False
    assert engine.NpuQwen2VLRoPEKernel not in REGISTRY.registered("npu")
    assert engine.NpuQwen2VLRoPEKernel in REGISTRY.all()


def test_metakernel_subclass_registers_and_bad_types_are_refused():
    class MyXpuNorm(MetaKernel):
        type = engine.KernelType.RMSNORM
        device = "xpu"

    try:
        assert REGISTRY.get("rms_norm", "xpu") is MyXpuNorm
        assert MyXpuNorm.device is DeviceType.XPU and MyXpuNorm.kind == "rms_norm"
    finally:
        REGISTRY.remove(MyXpuNorm)
    assert REGISTRY.get("rms_norm", "xpu") is None

    class Helper(MetaKernel):  # no type/device: not registered
        pass

    assert "Helper" not in REGISTRY.names()
    with pytest.raises(UnknownKernelError, match="unknown kernel type 'warp_drive'"):

        class Bad(MetaKernel):
            type = "warp_drive"
            device = "cuda"

    with pytest.raises(UnknownKernelError, match="kind 'rms_norm' is a rmsnorm kernel"):

        class Mismatch(MetaKernel):
            type = engine.KernelType.ROPE
            kind = "rms_norm"
            device = "cuda"


def test_device_detection_order(monkeypatch):
    import engine.device as device

    monkeypatch.delenv("ENGINE_DEVICE", raising=False)
    accelerator = {"value": None}
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: accelerator["value"])
    flags = {"npu": False, "cuda": False, "xpu": False, "mps": False}
    monkeypatch.setattr(device, "npu_available", lambda: flags["npu"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: flags["cuda"])
    monkeypatch.setattr(device, "_backend_available", lambda name: flags[name])
    monkeypatch.setattr(device, "_mps_available", lambda: flags["mps"])
    assert detect_device() == "cpu"
    for name in ("mps", "xpu", "cuda", "npu"):
        flags[name] = True
        assert detect_device() == name
    accelerator["value"] = torch.device("xpu")  # torch.accelerator is asked first
    assert detect_device() == "xpu"
    monkeypatch.setenv("ENGINE_DEVICE", "mps")  # and ENGINE_DEVICE overrides everything
    assert detect_device() == "mps"


def test_validate_device():
    assert validate_device("cuda:1") == "cuda"
    assert validate_device(torch.device("cpu")) is DeviceType.CPU
    with pytest.raises(ValueError, match="unsupported device 'tpu'"):
        validate_device("tpu")


def test_npu_is_not_detected_without_torch_npu(monkeypatch):
    import engine.device as device

    monkeypatch.setattr(device, "torch_npu_installed", lambda: False)
    assert device.npu_available() is False


@pytest.mark.parametrize(
    "class_auto, entry_auto, automatic",
    [(True, None, True), (False, None, False), (True, False, False), (False, True, True), (True, True, True)],
)
def test_one_manual_rule_entry_overrides_class_default(class_auto, entry_auto, automatic, npu_standin):
    """A spec entry's auto_register decides when set; otherwise the kernel class's attribute does."""
    from engine.planner import is_automatic
    from engine.spec import KernelSpec
    from engine.testing import tiny_models

    class Norm(MetaKernel):
        type = engine.KernelType.RMSNORM
        device = "xpu"
        auto_register = class_auto

        @classmethod
        def tensor_devices(cls) -> frozenset[str]:
            return frozenset({"cpu"})

        @classmethod
        def run(cls, module, options, x):
            return type(module).forward(module, x)

    entry = {"name": "norm", "kernel": "rms_norm", "target": {"module_class": "LlamaRMSNorm"}}
    if entry_auto is not None:
        entry["auto_register"] = entry_auto
    spec = KernelSpec.model_validate({"name": "s", "model_types": ["llama"], "entries": [entry]})
    try:
        assert is_automatic(spec.entries[0], Norm) is automatic
        model = tiny_models.build("llama")
        automatic_plan = engine.plan(model, spec, device="xpu", include_manual=False)
        assert bool(automatic_plan.patches) is automatic
        if not automatic:
            assert "manual" in automatic_plan.skipped[0].reason
        assert engine.plan(model, spec, device="xpu").patches  # an explicit spec applies manual entries too
    finally:
        REGISTRY.remove(Norm)
