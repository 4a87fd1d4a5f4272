"""A one-process megatron world on CPU, for loading and saving whole models without training."""

from __future__ import annotations

import os

from patch_megatron.conversion.errors import ConversionError


def ensure_world_of_one() -> None:
    """Initialise megatron's parallel state for a single CPU process (gloo), if not already."""
    import torch
    from megatron.core import parallel_state

    from patch_megatron import parallel

    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size())
        if sizes != (1, 1) or torch.distributed.get_world_size() != 1:
            raise ConversionError("conversion runs in one process with TP=1, PP=1: run the tools "
                                  "with plain python, not torchrun")
        return
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise ConversionError("conversion runs in one process: run the tools with plain python, "
                              "not torchrun")
    parallel.initialize_world_of_one(seed=0)
