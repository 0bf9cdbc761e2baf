"""``sdpa_is_causal``: transformers' decision that a causal mask is redundant for SDPA, kept under torch.compile.

Target: ``transformers.masking_utils._ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset,
kv_offset, local_attention_size=None)``. When it answers ``True``, the mask is never built and SDPA runs with
``is_causal=True``, which lets its flash/cuDNN kernels skip the blocks above the diagonal. transformers
(5.x with torch < 2.14) answers ``False`` whenever Dynamo traces, because a traced answer must not depend on
tensor values; so ``torch.compile(model)`` builds a ``[B, 1, T, T]`` mask and attention computes every block
and reads the mask (measured: attention fwd+bwd 2.9x slower on an H200 for Qwen3-0.6B at B4 x T2048).

Without a padding mask the answer reads no tensor values: it depends only on the lengths, which Dynamo guards
on, and on whether a sliding window applies. So a compiled call without ``padding_mask`` can take the same
answer as an eager call (:func:`reference`). Calls with a padding mask, a tensor ``q_offset`` (static caches),
``torch.export`` (whose graph is reused without guards), ``torch.jit.trace`` and plain eager calls run
transformers' own code. The probe checks, out of tracing, that transformers' answers equal :func:`reference`
for every length combination it covers, so a transformers release that changes the rule is refused.

Not covered: compiled calls where transformers never asks. Without a cache (``use_cache=False``, as under
gradient checkpointing) a decoder checks its position ids for packed sequences first; while tracing it cannot
read them, so it builds a packed-sequence mask even for the positions it generated itself (README, known limits).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from engine.kernels.kinds.base import KernelKind, KernelType, NoOptions, methods_read

PARAMS = ("padding_mask", "q_length", "kv_length", "q_offset", "kv_offset", "local_attention_size")
# transformers' callers of the target: a model whose code references none of them never asks the question
MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_masks_for_generate")


def reference(q_length: int, kv_length: int, q_offset: Any, local_attention_size: int | None = None) -> bool:
    """Whether SDPA's ``is_causal`` (or no mask, for one query) equals the causal mask when nothing is padded."""
    if local_attention_size is not None and kv_length >= local_attention_size:
        return False  # a sliding window needs its band in the mask
    # one query sees every key; equal lengths align top-left (SDPA) and bottom-right (a cache) alike;
    # an empty cache (offset 0) only adds keys after the queries, which is_causal hides
    return q_length == 1 or kv_length == q_length or q_offset == 0


def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The call's arguments by parameter name (``None`` if it passes anything the kind does not know)."""
    if len(args) > len(PARAMS) or any(name not in PARAMS for name in kwargs):
        return None
    call = dict(zip(PARAMS, args, strict=False)) | kwargs
    call.setdefault("local_attention_size", None)
    return call if all(name in call for name in PARAMS) else None


@torch._dynamo.assume_constant_result
def exporting() -> bool:
    """``torch.export`` in progress. Dynamo runs this at trace time and keeps the answer as a constant, because
    before torch 2.14 it folds a traced ``torch.compiler.is_exporting()`` to ``True`` under plain compile too."""
    return bool(torch.compiler.is_exporting())


def guarded_trace() -> bool:
    """Tracing by Dynamo for ``torch.compile``: lengths become guards, so a length-only answer stays valid."""
    return torch.compiler.is_compiling() and not torch.jit.is_tracing() and not exporting()


def check(fn: Any, options: NoOptions) -> str | None:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return "target is not a Python function with an inspectable signature"
    if params != list(PARAMS):
        return f"signature is ({', '.join(params)}), expected ({', '.join(PARAMS)})"
    return None


def probe(fn: Any, options: NoOptions) -> str | None:
    """transformers' eager answers without a padding mask, against :func:`reference`, over lengths, offsets and
    windows that reach every branch; plus one padded call, which must keep the mask."""
    for q_length, kv_length, q_offset in ((1, 1, 0), (1, 9, 8), (6, 6, 0), (6, 6, 3), (4, 9, 0), (4, 9, 5)):
        for window in (None, 5, 16):
            want = reference(q_length, kv_length, q_offset, window)
            got = fn(None, q_length, kv_length, q_offset, 0, window)
            if bool(got) != want:
                return (
                    f"transformers answers {got} for q_length={q_length} kv_length={kv_length} q_offset={q_offset} "
                    f"window={window} without padding, the declared rule {want}"
                )
    padded = torch.ones(2, 6, dtype=torch.bool)
    padded[0, 0] = False
    if fn(padded, 6, 6, 0, 0, None):
        return "transformers skips the mask of a padded batch; the kind's rule does not describe this function"
    return None


def attention_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    return getattr(text, "_attn_implementation", None)


def used_by(model: nn.Module, owner: str, attr: str) -> str | None:
    """Why the model never asks the question: not SDPA attention, or no code of it builds transformers' masks."""
    attention = attention_of(model)
    if attention != "sdpa":
        return f"model attention is {attention!r}, not 'sdpa': {attr} is never asked"
    classes = {c for m in model.modules() for c in type(m).__mro__ if c.__module__.startswith("transformers.")}
    if methods_read(classes, MASK_BUILDERS):
        return None
    return f"no class of the model builds masks with {' / '.join(MASK_BUILDERS)}"


KIND = KernelKind("sdpa_is_causal", KernelType.ATTENTION, "function", None, check, probe, used_by=used_by)
