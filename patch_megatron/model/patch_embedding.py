"""Patch embedding: the mean of K consecutive token embeddings (plus the patch's position)."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)


class PatchEmbedding(LanguageModelEmbedding):
    """megatron's word embedding followed by a mean over each patch of K tokens.

    The vocab-parallel lookup is fully reduced across tensor-parallel ranks
    first (the sequence-parallel reduce-scatter is switched off), then the K
    embeddings of a patch are averaged, and only then is the sequence scattered
    over sequence-parallel ranks: the scatter must split patches, not tokens.
    With learned absolute positions, patch i gets position embedding i (the
    positions are the T model positions, as RoPE's are). There are no new
    parameters, so state dicts are the same for every K.
    """

    def __init__(self, config, vocab_size, max_sequence_length, patch_size,
                 position_embedding_type="rope", tp_group=None):
        super().__init__(
            config=config,
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            position_embedding_type=position_embedding_type,
            scatter_to_sequence_parallel=False,
            tp_group=tp_group,
        )
        self.patch_size = patch_size

    def forward(self, input_ids, position_ids=None, tokentype_ids=None):
        batch, num_tokens = input_ids.shape
        if num_tokens % self.patch_size:
            raise ValueError(
                f"input holds {num_tokens} tokens per sample, not a multiple of the patch size "
                f"{self.patch_size}; samples must carry K*T tokens"
            )
        tokens = self.word_embeddings(input_ids)  # [b, K*T, h], reduced over TP
        # Averaging in fp32 keeps bf16 runs from losing the low bits of K summands.
        patches = tokens.view(batch, num_tokens // self.patch_size, self.patch_size, -1)
        embeddings = patches.float().mean(dim=2).to(tokens.dtype)
        if self.add_position_embedding:
            embeddings = embeddings + self.position_embeddings(position_ids)
        embeddings = embeddings.transpose(0, 1).contiguous()  # [T, b, h], megatron's layout
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(
                embeddings, group=self.tp_group
            )
            if self.config.clone_scatter_output_in_embedding:
                embeddings = embeddings.clone()
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding_dropout(embeddings)
        return self.embedding_dropout(embeddings)
