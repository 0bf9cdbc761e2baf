"""Which accelerator this process runs on: ``ENGINE_DEVICE``, then ``torch.accelerator``, then per-backend probes."""

from __future__ import annotations

import enum
import importlib.util
import os
import sys

import torch


class ValueEnum(str, enum.Enum):
    """A string enum that prints as its value (``f"{DeviceType.NPU}"`` is ``npu``, as the seed's docs show)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


class DeviceType(ValueEnum):
    """Device kinds a kernel can target (values are ``torch.device.type`` strings)."""

    NPU = "npu"
    CUDA = "cuda"
    XPU = "xpu"
    MPS = "mps"
    CPU = "cpu"


# what a plain-PyTorch (portable) kernel serves: tensors on any device type
ALL_DEVICE_TYPES = frozenset(d.value for d in DeviceType)

DEVICE_ENV = "ENGINE_DEVICE"


def torch_npu_installed() -> bool:
    """True when ``torch_npu`` can be imported (the real package, or a stand-in registered in ``sys.modules``)."""
    if sys.modules.get("torch_npu") is not None:
        return True
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        return False


def npu_available() -> bool:
    """torch_npu imports and reports an Ascend device (the hardware tests' gate too)."""
    if not torch_npu_installed():
        return False
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except Exception:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def _backend_available(name: str) -> bool:
    backend = getattr(torch, name, None)
    return bool(backend is not None and backend.is_available())


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _from_torch_accelerator() -> DeviceType | None:
    """The device ``torch.accelerator`` reports as present and usable (PyTorch >= 2.6), if one it knows."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None:
        return None
    try:
        found = accelerator.current_accelerator(check_available=True)
    except Exception:
        return None
    if found is None:
        return None
    try:
        return DeviceType(found.type)
    except ValueError:
        return None


def detect_device() -> DeviceType:
    """The device kernels are chosen for: ``ENGINE_DEVICE`` if set, else ``torch.accelerator``, else probes."""
    forced = os.environ.get(DEVICE_ENV)
    if forced:
        return validate_device(forced, source=DEVICE_ENV)
    found = _from_torch_accelerator()
    if found is not None:
        return found
    if npu_available():
        return DeviceType.NPU
    if torch.cuda.is_available():
        return DeviceType.CUDA
    if _backend_available("xpu"):
        return DeviceType.XPU
    if _mps_available():
        return DeviceType.MPS
    return DeviceType.CPU


def validate_device(name: str | DeviceType | torch.device, source: str = "device") -> DeviceType:
    """Normalise ``"cuda:0"`` / ``torch.device`` to a :class:`DeviceType`, or raise a one-line ``ValueError``."""
    base = str(name.type if isinstance(name, torch.device) else name).split(":", 1)[0].strip().lower()
    try:
        return DeviceType(base)
    except ValueError:
        known = ", ".join(d.value for d in DeviceType)
        raise ValueError(f"{source}: unsupported device {str(name)!r}; expected one of {known}") from None
