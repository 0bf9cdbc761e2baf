"""Exceptions raised by the engine; each message says what to fix."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for all engine errors."""


class SpecError(EngineError):
    """A spec file or entry is malformed; the message names file, entry and field."""


class UnknownKernelError(EngineError):
    """A spec or call names a kernel type that no registered kernel implements."""


class KernelUnavailableError(EngineError):
    """A kernel was requested explicitly but cannot run here (missing torch_npu/triton, wrong device)."""


class PatchConflictError(EngineError):
    """Someone else replaced a patched function or forward; reverting would clobber their change."""
