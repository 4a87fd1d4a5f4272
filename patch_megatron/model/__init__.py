"""The patch-level GPT model on megatron-core."""

from patch_megatron.model.config import PatchGPTConfig
from patch_megatron.model.patch_gpt import PatchGPTModel, build_model
from patch_megatron.model.patch_loss import vocab_parallel_patch_cross_entropy

__all__ = ["PatchGPTConfig", "PatchGPTModel", "build_model", "vocab_parallel_patch_cross_entropy"]
