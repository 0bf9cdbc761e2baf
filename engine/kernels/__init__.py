"""Kernel implementations. Importing this package registers every built-in kernel class."""

from engine.kernels import npu as npu  # noqa: F401  (registers NPU kernels)
from engine.kernels import portable as portable  # noqa: F401  (registers the portable kernels: cpu, xpu, mps)
from engine.kernels import triton as triton  # noqa: F401  (registers CUDA kernels)
