"""The patch-level GPT model on megatron-core."""

from patch_megatron.lazy_exports import exports

# Imported on first use (PEP 562): patch_gpt pulls in megatron-core, which takes
# seconds and warns about its fallbacks, while the flag parser needs only spec's checks.
_HOMES = {
    "PatchGPTConfig": "config", "PatchGPTModel": "patch_gpt", "build_model": "patch_gpt",
    "vocab_parallel_patch_cross_entropy": "patch_loss",
}

__getattr__ = exports(__name__, _HOMES)

__all__ = ["PatchGPTConfig", "PatchGPTModel", "build_model", "vocab_parallel_patch_cross_entropy"]
