"""``linear_cross_entropy``: a causal LM's output head and its loss, computed without materialising the logits.

Target: a ``*ForCausalLM`` / ``*ForConditionalGeneration`` module whose forward runs the decoder, applies the
output head (``get_output_embeddings()``, a plain bias-free ``nn.Linear``), optionally final-logit softcapping,
and transformers' ``ForCausalLMLoss``. The kind takes the raw call (``params=None``).

How a fused call runs (:func:`fused_forward`): the module's own class forward runs with ``labels=None`` while a
:class:`HeadCapture` is pushed on :data:`ACTIVE_CAPTURES`. The output head is patched too (a companion patch
installed with the entry, running :func:`handoff`): while its model's capture is active it hands the final hidden
states it receives to the capture instead of computing logits. Inside the head call (so hooks on the head, e.g.
FSDP2's unshard or accelerate's device moves, still run around it) the capture computes the loss from those
hidden states and the head weight, through the device kernel's chunked loss, and returns a zero-size placeholder
instead of logits. Pushing to a module-level list is a side effect Dynamo traces (no graph break, unlike
swapping a module's forward during the call). Afterwards the output object is rebuilt with ``.loss`` set (plus
the MoE router auxiliary loss where the model returns one) and ``.logits`` per the ``logits`` option.

Semantics kept from transformers: labels shifted left by one (or ``shift_labels`` as given), ``ignore_index``
(default -100), mean over non-ignored targets or ``sum / num_items_in_batch``, ``logits_to_keep`` (the head
sees whatever hidden states the forward passes it), ``config.final_logit_softcapping``, fp32 loss math.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from engine.kernels.kinds.base import KernelKind, KernelType, code_names, mismatch, probe_twin

IGNORE_INDEX = -100
DEFAULT_CHUNK_MIB = 1024  # H100, N=8192 V=151936 H=1024 fwd+bwd: 15.3 ms at 1024 MiB, 21.2 at 256 (bench_lce)
# (hidden [N, H], weight [V, H], targets [N], denominator (0-d fp32), ignore_index, softcap) -> loss (0-d fp32)
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, "float | None"], torch.Tensor]


class LinearCrossEntropyOptions(BaseModel):
    """How and when the fused loss replaces the head and loss of a causal LM.

    ``fuse``: ``training`` fuses calls with labels while the module is in training mode (eval loops keep their
    logits); ``always`` fuses every call with labels. A call can override it with ``skip_logits=True/False``.
    ``logits``: what ``outputs.logits`` holds on a fused call, ``none`` (``None``) or ``empty`` (a zero-size
    ``[..., 0]`` tensor, which keeps positions stable for code that indexes the output).
    ``chunk_mib``: memory budget of one chunk of logits (see ``engine.kernels.portable.ops.linear_cross_entropy``).
    ``grad_accumulation``: ``fp32`` accumulates the head-weight gradient over chunks in fp32 (one rounding to the
    weight dtype at the end, like transformers' single GEMM); ``param`` accumulates in the weight dtype (saves a
    ``V x H`` fp32 buffer, rounds once per chunk).
    """

    model_config = ConfigDict(extra="forbid")
    fuse: Literal["training", "always"] = "training"
    logits: Literal["none", "empty"] = "none"
    chunk_mib: int = Field(DEFAULT_CHUNK_MIB, ge=1, le=1 << 20)
    grad_accumulation: Literal["fp32", "param"] = "fp32"


def shift_targets(labels: torch.Tensor, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Next-token targets, flattened: ``labels[..., 1:]`` padded with ``ignore_index``, or ``shift_labels``."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def denominator(targets: torch.Tensor, ignore_index: int, num_items_in_batch: Any = None) -> torch.Tensor:
    """What the summed loss is divided by (0-d fp32): the non-ignored target count, or ``num_items_in_batch``."""
    if num_items_in_batch is None:
        return (targets != ignore_index).sum().to(torch.float32)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(device=targets.device, dtype=torch.float32).reshape(())
    return torch.full((), float(num_items_in_batch), dtype=torch.float32, device=targets.device)


def logits_loss(
    logits: torch.Tensor, targets: torch.Tensor, denom: torch.Tensor, ignore_index: int, softcap: float | None
) -> torch.Tensor:
    """Cross-entropy of full logits as transformers computes it: softcapped in their dtype (as the softcapping
    families do), upcast to fp32, summed over non-ignored targets, divided by ``denom``."""
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    flat = logits.float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, targets, ignore_index=ignore_index, reduction="sum") / denom


def reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    denom: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> torch.Tensor:
    """The declared math of head plus loss: ``logits_loss(hidden @ weight.T, ...)`` with the full logits."""
    return logits_loss(F.linear(hidden, weight), targets, denom, ignore_index, softcap)


def text_config_value(model: nn.Module, key: str) -> Any:
    """``key`` on the model's text config (multimodal models keep the LM fields there), else ``None``."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    return getattr(text, key, getattr(config, key, None))


def softcap_of(model: nn.Module) -> float | None:
    value = text_config_value(model, "final_logit_softcapping")
    return None if value is None else float(value)


class HeadCapture:
    """Stands in for the output head's forward during one fused call: computes the loss, returns a placeholder.

    When the head weight is not a plain tensor at call time (a tensor-parallel ``DTensor``), the real head runs
    and the loss is computed from its full logits the transformers way, so such a call is correct, just unfused.
    """

    def __init__(
        self,
        head: nn.Module,
        loss_fn: LossFn,
        labels: torch.Tensor,
        shift_labels: torch.Tensor | None,
        num_items_in_batch: Any,
        ignore_index: int,
        softcap: float | None,
    ) -> None:
        self.head = head
        self.loss_fn = loss_fn
        self.labels = labels
        self.shift_labels = shift_labels
        self.num_items_in_batch = num_items_in_batch
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.loss: torch.Tensor | None = None
        self.kept_logits = False

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.loss is not None:
            raise RuntimeError("the output head ran twice in one forward; the fused loss cannot tell which one counts")
        weight = self.head.weight
        targets = shift_targets(self.labels, self.shift_labels, self.ignore_index).to(hidden.device, torch.long)
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] != targets.shape[0]:
            raise ValueError(
                f"fused linear cross-entropy: the head received {rows.shape[0]} positions but the labels give "
                f"{targets.shape[0]} targets (labels must match the positions kept by logits_to_keep)"
            )
        denom = denominator(targets, self.ignore_index, self.num_items_in_batch)
        if type(weight) not in (torch.Tensor, nn.Parameter):
            logits = F.linear(hidden, weight)
            self.loss = logits_loss(logits, targets, denom, self.ignore_index, self.softcap)
            self.kept_logits = True
            return logits
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
            rows, weight = rows.to(dtype), weight.to(dtype)
        if rows.dtype != weight.dtype:
            raise RuntimeError(
                f"fused linear cross-entropy: hidden states are {rows.dtype} but the head weight is {weight.dtype}"
            )
        self.loss = self.loss_fn(rows, weight, targets, denom, self.ignore_index, self.softcap)
        return hidden.new_empty((*hidden.shape[:-1], 0))


ACTIVE_CAPTURES: list[HeadCapture] = []  # the fused calls in progress, innermost last


def handoff(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The patched output head's forward: feed the active capture of this head, else compute logits as usual."""
    if len(ACTIVE_CAPTURES) > 0 and ACTIVE_CAPTURES[-1].head is head:
        return ACTIVE_CAPTURES[-1](hidden)
    return type(head).forward(head, hidden)


def router_aux_coefficient(model: nn.Module) -> float:
    value = getattr(model, "router_aux_loss_coef", None)
    return float(value if value is not None else text_config_value(model, "router_aux_loss_coef") or 0.0)


def fused_forward(
    model: nn.Module, options: LinearCrossEntropyOptions, args: tuple[Any, ...], kwargs: dict[str, Any], loss_fn: LossFn
) -> Any:
    """Run ``model``'s class forward with the head captured; return its output with the fused loss set."""
    kwargs = dict(kwargs)
    labels = kwargs.pop("labels")
    head = model.get_output_embeddings()
    capture = HeadCapture(
        head,
        loss_fn,
        labels,
        kwargs.get("shift_labels"),
        kwargs.get("num_items_in_batch"),
        kwargs.get("ignore_index", IGNORE_INDEX),
        softcap_of(model),
    )
    ACTIVE_CAPTURES.append(capture)
    try:
        output = type(model).forward(model, *args, **kwargs)
    finally:
        ACTIVE_CAPTURES.pop()
    loss = capture.loss
    if loss is None:
        raise RuntimeError(f"{type(model).__name__}.forward never called its output head; nothing to fuse")
    aux = output.get("aux_loss")
    if aux is not None:
        loss = loss + router_aux_coefficient(model) * aux.to(loss.device)
    fields = {k: v for k, v in output.items() if k not in ("loss", "logits")}
    if capture.kept_logits or options.logits == "empty":
        fields["logits"] = output["logits"]
    return type(output)(loss=loss, **fields)


def check(model: Any, options: LinearCrossEntropyOptions) -> str | None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return "model has no output head (get_output_embeddings() gives none)"
    if type(head).forward is not nn.Linear.forward:
        return (
            f"output head is a {type(head).__module__}.{type(head).__qualname__}, not a plain nn.Linear: "
            "fusing would bypass its forward (e.g. a LoRA adapter on lm_head)"
        )
    if head.bias is not None:
        return "output head has a bias; the fused loss covers bias-free heads"
    if "forward" in head.__dict__ and "_hf_hook" not in head.__dict__:
        return "output head's forward is replaced on the instance (by other code, or an engine patch); not fused"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "model.loss_function is not transformers' ForCausalLMLoss (a custom loss is kept)"
    vocab = text_config_value(model, "vocab_size")
    if vocab is not None and int(vocab) != head.weight.shape[0]:
        return f"config vocab_size {vocab} differs from the head's {head.weight.shape[0]} rows"
    names = code_names(type(model).forward)
    if "loss_function" not in names:
        return f"{type(model).__name__}.forward does not compute transformers' loss_function"
    if softcap_of(model) is not None and "final_logit_softcapping" not in names:
        return "config sets final_logit_softcapping but the forward never applies it"
    return None


def probe(model: Any, options: LinearCrossEntropyOptions) -> str | None:
    """The module's own forward with labels against :func:`fused_forward` with the :func:`reference` math.

    Catches forwards that do more between the head and the loss than the kind declares (a logit scale, another
    loss), on a tiny token batch, in eval mode, without the MoE router loss, on a twin (hooks, instance forwards
    and the real modules' state untouched; meta or sharded weights simulated as for every probe).
    """
    twin = probe_twin(model)
    if twin is None:
        return None
    twin.train(False)
    weight = twin.get_output_embeddings().weight
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(int(weight.shape[0]), 64), (2, 6), generator=gen).to(weight.device)
    labels = ids.clone()
    labels[0, 2] = IGNORE_INDEX
    call = {"input_ids": ids, "labels": labels}
    if "output_router_logits" in inspect.signature(type(model).forward).parameters:
        # router logits are recorded by transformers' output hooks, which a twin does not carry
        call["output_router_logits"] = False
    with torch.no_grad():
        want = type(twin).forward(twin, **call).loss
        head = twin.get_output_embeddings()
        head.__dict__["forward"] = functools.partial(handoff, head)  # the twin's head, as the companion patch
        got = fused_forward(twin, options, (), call, reference).loss
    return mismatch(got, want)


KIND = KernelKind(
    "linear_cross_entropy",
    KernelType.LINEAR_CROSS_ENTROPY,
    "module",
    None,
    check,
    probe,
    LinearCrossEntropyOptions,
)
