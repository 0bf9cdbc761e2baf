"""Random-init models of real shapes for the GPU benchmarks (no hub access): configs, builders, specs."""

from __future__ import annotations

from typing import Any

import torch

ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (transformers config class, config kwargs)
    "qwen3_0.6b": (
        "Qwen3Config",
        dict(
            vocab_size=151936,
            hidden_size=1024,
            intermediate_size=3072,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            max_position_embeddings=40960,
            rope_parameters=ROPE,
        ),
    ),
    "qwen2.5_0.5b": (
        "Qwen2Config",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            max_position_embeddings=32768,
            rope_parameters=ROPE,
        ),
    ),
    "qwen3_moe_4l": (  # four layers of the Qwen3-30B-A3B shape
        "Qwen3MoeConfig",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=4,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            moe_intermediate_size=768,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            max_position_embeddings=40960,
            rope_parameters=ROPE,
        ),
    ),
}
SPECS = {"qwen3_0.6b": "qwen3", "qwen2.5_0.5b": "qwen2", "qwen3_moe_4l": "qwen3_moe"}


def spec_of(name: str) -> str:
    return SPECS[name]


def vocab_of(name: str) -> int:
    return int(CONFIGS[name][1]["vocab_size"])


def build_model(name: str, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The named model, random-init in ``dtype`` on ``device``, SDPA attention, in training mode."""
    import transformers

    if name not in CONFIGS:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join(CONFIGS)}")
    class_name, kwargs = CONFIGS[name]
    config = getattr(transformers, class_name)(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.train()
