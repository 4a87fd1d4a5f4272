"""Hugging Face ``config.json`` / ``generation_config.json`` of a Llama model, both ways.

Field names and meanings are those of transformers' ``LlamaConfig``.
"""

from __future__ import annotations

import json
import os

import torch

from patch_megatron.conversion.errors import ConversionError
from patch_megatron.conversion.model_description import DTYPES, ModelDescription
from patch_megatron.model.shape import LLAMA_SHAPE_ARCHITECTURE

_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def llama_config(d: ModelDescription, vocab_size: int, dtype: torch.dtype,
                 bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": d.hidden_size,
        "intermediate_size": d.ffn_hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_attention_heads,
        "num_key_value_heads": d.num_query_groups,
        "head_dim": d.kv_channels,
        "hidden_act": "silu",
        "max_position_embeddings": d.max_position_embeddings,
        "rms_norm_eps": d.norm_epsilon,
        # transformers 4.x reads rope_theta, 5.x rope_parameters; each ignores the other's key.
        "rope_theta": float(d.rotary_base),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(d.rotary_base)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": not d.untie_embeddings_and_output_weights,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],  # 4.x's name
        "dtype": _DTYPE_NAMES[dtype],  # 5.x's name
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }


def generation_config(bos_token_id, eos_token_id, pad_token_id) -> dict:
    config = {"_from_model_config": True}
    for key, value in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                       ("pad_token_id", pad_token_id)):
        if value is not None:
            config[key] = value
    return config


def write_json(path: str, value: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def read_llama_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory} has no config.json: give a Hugging Face model directory")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    return config


def description_from_llama_config(config: dict, directory: str) -> ModelDescription:
    """Our description of a Hugging Face Llama model; refuses what our model cannot express."""
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" and "LlamaForCausalLM" not in architectures:
        raise ConversionError(f"{directory} holds a {config.get('model_type')!r} model "
                              f"({architectures}); only Llama (LlamaForCausalLM) converts")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (SwiGLU needs silu)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("biases in attention or MLP (the model has none)")
    for key in ("rope_scaling", "rope_parameters"):  # 4.x's name, 5.x's name
        rope = config.get(key) or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"{key} {rope} (plain RoPE only)")
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden size {hidden}")
    if problems:
        raise ConversionError(f"{directory}: cannot be expressed by this project's model: "
                              + "; ".join(problems))
    dtype_name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return ModelDescription(
        num_layers=config["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_key_value_heads") or heads,
        vocab_size=config["vocab_size"],
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        rotary_base=rope_theta(config),
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        untie_embeddings_and_output_weights=not config.get("tie_word_embeddings", False),
        patch_size=1,
        dtype=DTYPES.get(dtype_name, torch.float32),
        tokenizer_vocab_size=config["vocab_size"],
        **LLAMA_SHAPE_ARCHITECTURE,
    )


def rope_theta(config: dict) -> float:
    """The RoPE base: 5.x writes it inside ``rope_parameters``, 4.x as ``rope_theta``."""
    theta = (config.get("rope_parameters") or {}).get("rope_theta", config.get("rope_theta"))
    return float(theta) if theta is not None else 10000.0
