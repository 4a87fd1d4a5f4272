"""What a converter needs to know about a model, whatever format it comes from.

Built from a megatron checkpoint's record (``patch_megatron.training.checkpoint_record``:
ours or Megatron-LM's) or from a Hugging Face ``config.json``; turned into the model config that
builds a TP=1/PP=1 model to load or save the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from patch_megatron.conversion.errors import ConversionError
from patch_megatron.training.checkpoint_record import ARCHITECTURE_KEYS, LLAMA_ARCHITECTURE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelDescription:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    padded_vocab_size: int  # rows of the embedding / output layer as stored
    max_position_embeddings: int
    rotary_base: float
    norm_epsilon: float
    untie_embeddings_and_output_weights: bool
    patch_size: int
    dtype: torch.dtype
    vocab_size: int | None = None  # the tokenizer's, when known; <= padded_vocab_size
    # checkpoint_record.ARCHITECTURE_KEYS; a Hugging Face Llama is LLaMA_ARCHITECTURE's.
    architecture: dict = field(default_factory=lambda: dict(LLAMA_ARCHITECTURE))

    @property
    def kv_channels(self) -> int:
        return self.architecture.get("kv_channels") or self.hidden_size // self.num_attention_heads

    def llama_differences(self) -> list[str]:
        """How this model differs from a Llama (empty: it is one)."""
        return [f"{k} {self.architecture.get(k)!r} (Llama: {v!r})"
                for k, v in LLAMA_ARCHITECTURE.items() if self.architecture.get(k) != v]

    def with_vocab(self, padded_vocab_size: int, vocab_size: int | None = None) -> "ModelDescription":
        return replace(self, padded_vocab_size=padded_vocab_size,
                       vocab_size=self.vocab_size if vocab_size is None else vocab_size)

    def model_config(self, patch_size: int | None = None):
        """The PatchGPTConfig of a TP=1/PP=1 model holding these weights."""
        from patch_megatron.model import PatchGPTConfig

        # The builder wants an int base; a float one (e.g. 500000.0 from HF) is the same number.
        base = int(self.rotary_base) if float(self.rotary_base).is_integer() else self.rotary_base
        return PatchGPTConfig(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            vocab_size=self.padded_vocab_size,
            seq_length=self.max_position_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            patch_size=self.patch_size if patch_size is None else patch_size,
            rotary_base=base,
            norm_epsilon=self.norm_epsilon,
            untie_embeddings_and_output_weights=self.untie_embeddings_and_output_weights,
            params_dtype=self.dtype,
            kv_channels=self.kv_channels,
            **{k: v for k, v in self.architecture.items() if k != "kv_channels"},
        )


def from_record(record, path: str) -> ModelDescription:
    """The description of a checkpoint from its ``CheckpointRecord``."""
    shape = record.model_shape
    if record.max_position_embeddings is None:
        raise ConversionError(f"{path} records neither --max-position-embeddings nor --seq-length: "
                              "its position count is unknown")
    return ModelDescription(
        num_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"],
        ffn_hidden_size=shape["ffn_hidden_size"],
        num_attention_heads=shape["num_attention_heads"],
        num_query_groups=shape.get("num_query_groups") or shape["num_attention_heads"],
        padded_vocab_size=shape["vocab_size"],
        max_position_embeddings=record.max_position_embeddings,
        rotary_base=record.rotary_base,
        norm_epsilon=record.norm_epsilon,
        untie_embeddings_and_output_weights=shape["untie_embeddings_and_output_weights"],
        patch_size=record.patch_size,
        dtype=record.params_dtype,
        architecture={k: shape[k] for k in ARCHITECTURE_KEYS},
    )
