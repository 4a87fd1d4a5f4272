"""The patch-level GPT model on megatron-core."""

import importlib

# Imported on first use (PEP 562): patch_gpt pulls in megatron-core, which takes
# seconds and warns about its fallbacks, while the flag parser needs only spec's checks.
_HOMES = {
    "PatchGPTConfig": "config", "PatchGPTModel": "patch_gpt", "build_model": "patch_gpt",
    "vocab_parallel_patch_cross_entropy": "patch_loss",
}


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = ["PatchGPTConfig", "PatchGPTModel", "build_model", "vocab_parallel_patch_cross_entropy"]
