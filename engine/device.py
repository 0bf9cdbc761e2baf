"""Accelerator detection: npu > cuda > xpu > mps > cpu."""

from __future__ import annotations

import importlib.util
import os
from typing import Literal, get_args

import torch

DeviceType = Literal["npu", "cuda", "xpu", "mps", "cpu"]
DEVICE_TYPES: tuple[str, ...] = get_args(DeviceType)


def torch_npu_installed() -> bool:
    """True when the ``torch_npu`` package can be imported (real or a registered stand-in)."""
    import sys

    return "torch_npu" in sys.modules or importlib.util.find_spec("torch_npu") is not None


def _npu_available() -> bool:
    if not torch_npu_installed():
        return False
    try:
        import torch_npu  # noqa: F401
    except Exception:
        return False
    npu = getattr(torch, "npu", None)
    return bool(npu is not None and npu.is_available())


def _xpu_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def detect_device() -> DeviceType:
    """Return the best accelerator on this machine; ``ENGINE_DEVICE`` overrides detection."""
    forced = os.environ.get("ENGINE_DEVICE")
    if forced:
        return validate_device(forced)
    if _npu_available():
        return "npu"
    if torch.cuda.is_available():
        return "cuda"
    if _xpu_available():
        return "xpu"
    if _mps_available():
        return "mps"
    return "cpu"


def validate_device(name: str) -> DeviceType:
    """Normalise a device name (``"cuda:0"`` -> ``"cuda"``) or raise a clear ``ValueError``."""
    base = str(name).split(":", 1)[0].strip().lower()
    if base not in DEVICE_TYPES:
        raise ValueError(f"unsupported device {name!r}; expected one of {', '.join(DEVICE_TYPES)}")
    return base  # type: ignore[return-value]
