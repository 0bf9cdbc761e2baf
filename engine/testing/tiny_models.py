"""Tiny random-init transformers models (no hub access) for tests and the CLI's ``verify``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3Config,
    Qwen3MoeConfig,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

DENSE = dict(  # the shared shape of every tiny decoder
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


MOE = dict(  # the shared expert layout of the tiny MoE decoders: layer 0 sparse, layer 1 a dense MLP
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    decoder_sparse_step=1,
    mlp_only_layers=[1],
)


def _causal(config) -> nn.Module:
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config)


def llama() -> nn.Module:
    return _causal(LlamaConfig(**DENSE))


def mistral() -> nn.Module:
    return _causal(MistralConfig(**DENSE, sliding_window=None))


def qwen2() -> nn.Module:
    return _causal(Qwen2Config(**DENSE))


def qwen3() -> nn.Module:
    return _causal(Qwen3Config(**DENSE, head_dim=16))


def qwen3_moe() -> nn.Module:
    return _causal(Qwen3MoeConfig(**DENSE, **MOE, norm_topk_prob=True))


def qwen2_vl() -> nn.Module:
    text = dict(DENSE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(
        depth=1,
        embed_dim=32,
        hidden_size=64,
        num_heads=2,
        mlp_ratio=2,
        patch_size=2,
        temporal_patch_size=2,
        spatial_merge_size=1,
        in_channels=3,
    )
    config = Qwen2VLConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "sdpa"
    return Qwen2VLForConditionalGeneration(config)


def qwen3_vl_moe() -> nn.Module:
    text = dict(
        DENSE,
        **MOE,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=2,
        temporal_patch_size=2,
        spatial_merge_size=1,
        in_channels=3,
        out_hidden_size=64,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0],
    )
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "sdpa"
    return Qwen3VLMoeForConditionalGeneration(config)


TINY_MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "qwen3": qwen3,
    "qwen3_moe": qwen3_moe,
    "qwen2_vl": qwen2_vl,
    "qwen3_vl_moe": qwen3_vl_moe,
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny random-init model of the named family, with non-trivial norm weights and experts."""
    torch.manual_seed(seed)
    model = TINY_MODELS[name]().to(dtype)
    with torch.no_grad():
        for module_name, param in model.named_parameters():
            if module_name.endswith("norm.weight") or param.dim() == 3:
                param.copy_(torch.randn_like(param) * (0.02 if param.dim() == 3 else 0.1) + (param.dim() == 1))
    return model.train()


def sample_batch(model: nn.Module, batch: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids (text only) and labels for a loss."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}
