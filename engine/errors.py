"""Exceptions raised by the engine; each message is one line that says what to fix."""

from __future__ import annotations


class EngineError(Exception):
    """Base class for all engine errors."""


class SpecError(EngineError):
    """A spec file or entry is malformed; the message names file, spec, entry and field."""


class UnknownKernelError(EngineError):
    """A spec or a kernel class names a kernel type the engine does not know."""


class KernelUnavailableError(EngineError):
    """A kernel was requested explicitly but its runtime (torch_npu, triton) cannot run here."""


class DeviceMismatchError(EngineError, ValueError):
    """A kernel was requested explicitly for a device other than the one this process runs on."""


class NoSpecError(EngineError):
    """No spec declares the model's type, so there is nothing to patch it with."""


class PatchConflictError(EngineError):
    """Someone else replaced a patched function or forward; reverting would clobber their change."""
