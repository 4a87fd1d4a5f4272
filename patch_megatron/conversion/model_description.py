"""What a converter needs to know about a model, whatever format it comes from.

Built from a megatron checkpoint's record (``patch_megatron.training.checkpoint_record``:
ours or Megatron-LM's) or from a Hugging Face ``config.json``; turned into the model config that
builds a TP=1/PP=1 model to load or save the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from patch_megatron.conversion.errors import ConversionError
from patch_megatron.model.shape import ModelShape
from patch_megatron.training.checkpoint_record import LLAMA_ARCHITECTURE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class ModelDescription(ModelShape):
    """A model's shape (``vocab_size``: the embedding rows as stored) and what a converter
    needs besides. A Hugging Face Llama's architecture fields are LLaMA's."""

    rotary_base: float
    norm_epsilon: float
    patch_size: int
    dtype: torch.dtype
    tokenizer_vocab_size: int | None = None  # the tokenizer's, when known; <= vocab_size

    @property
    def padded_vocab_size(self) -> int:
        return self.vocab_size

    def llama_differences(self) -> list[str]:
        """How this model differs from a Llama (empty: it is one)."""
        return [f"{k} {getattr(self, k)!r} (Llama: {v!r})"
                for k, v in LLAMA_ARCHITECTURE.items() if getattr(self, k) != v]

    def with_vocab(self, padded_vocab_size: int, tokenizer_vocab_size: int | None = None) -> "ModelDescription":
        return replace(self, vocab_size=padded_vocab_size,
                       tokenizer_vocab_size=tokenizer_vocab_size or self.tokenizer_vocab_size)

    def model_config(self, patch_size: int | None = None):
        """The PatchGPTConfig of a TP=1/PP=1 model holding these weights."""
        from patch_megatron.model.config import PatchGPTConfig

        # The builder wants an int base; a float one (e.g. 500000.0 from HF) is the same number.
        base = int(self.rotary_base) if float(self.rotary_base).is_integer() else self.rotary_base
        return PatchGPTConfig(
            **self.shape_fields(),
            seq_length=self.max_position_embeddings,
            patch_size=self.patch_size if patch_size is None else patch_size,
            rotary_base=base,
            norm_epsilon=self.norm_epsilon,
            params_dtype=self.dtype,
        )


def from_record(record, path: str) -> ModelDescription:
    """The description of a checkpoint from its ``CheckpointRecord``."""
    if record.max_position_embeddings is None:
        raise ConversionError(f"{path} records neither --max-position-embeddings nor --seq-length: "
                              "its position count is unknown")
    return ModelDescription(
        **{**record.model_shape.shape_fields(),
           "max_position_embeddings": record.max_position_embeddings},
        rotary_base=record.rotary_base,
        norm_epsilon=record.norm_epsilon,
        patch_size=record.patch_size,
        dtype=record.params_dtype,
    )
