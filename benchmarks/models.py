"""Random-init model builders shared by the training benchmarks (shapes of public checkpoints, no hub access).

``bench_train.build`` holds Qwen3-0.6B and the 4-layer Qwen3-MoE; this module adds the Qwen2.5-0.5B shape and one
``build`` over all of them, with the engine spec each family uses.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_train  # noqa: E402

SPECS = {"qwen3_0.6b": "qwen3", "qwen2.5_0.5b": "qwen2", "qwen3_moe_4l": "qwen3_moe"}


def qwen25_05b() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_parameters=bench_train.ROPE,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.train()


def build(name: str) -> torch.nn.Module:
    """A bf16 random-init model on the GPU, in training mode: ``qwen3_0.6b``, ``qwen2.5_0.5b`` or ``qwen3_moe_4l``."""
    return qwen25_05b() if name == "qwen2.5_0.5b" else bench_train.build(name)
