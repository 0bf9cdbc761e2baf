"""Triton availability, interpreter detection and launch helpers shared by the CUDA kernels."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """``TRITON_INTERPRET=1`` runs kernels on CPU tensors (used by CI on small shapes)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason() -> str | None:
    if not triton_installed():
        return "triton is not installed (pip install 'engine[cuda]')"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU for testing)"
    return None


def runs_on(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or (tensor.device.type == "cpu" and interpreting())


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def program_count(device: torch.device, per_sm: int = 4) -> int:
    """Programs for a persistent grid: a few per SM on a GPU, a handful under the interpreter."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * per_sm


@functools.lru_cache(maxsize=8)
def _shared_memory_optin(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if limit is None:  # older torch: ask triton's driver
        import triton

        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


def shared_memory_limit(device: torch.device) -> int | None:
    """Bytes of shared memory one program may use on ``device`` (opt-in maximum); ``None``: no limit (CPU)."""
    if device.type != "cuda":
        return None
    return _shared_memory_optin(device.index if device.index is not None else torch.cuda.current_device())


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function: microseconds a call there)."""
    return -(-int(a) // int(b))
