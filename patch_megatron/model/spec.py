"""Which layer implementation runs: Transformer Engine when present, megatron's local one otherwise."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

logger = logging.getLogger(__name__)


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def have_apex() -> bool:
    # The PyPI package called "apex" is unrelated; NVIDIA Apex has apex.normalization.
    if importlib.util.find_spec("apex") is None:
        return False
    try:
        return importlib.util.find_spec("apex.normalization") is not None
    except ModuleNotFoundError:
        return False


def adam_name() -> str:
    """The Adam megatron-core's optimizer builds on, by its own order of preference."""
    if have_transformer_engine():
        return "Transformer Engine FusedAdam"
    if have_apex():
        return "apex FusedAdam"
    return "torch AdamW"


def silence_fallback_warnings() -> None:
    """Drop megatron-core's import-time warnings about each torch fallback it takes.

    Without TE or apex it warns once per module (six times per process, and again
    in each worker process it starts, hence the environment too); the run's log
    names the implementation in use once instead.
    """
    warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed",
                            category=UserWarning)
    children = ["ignore:Transformer Engine and Apex are not installed",
                "ignore:Apex is not installed"]
    inherited = [entry for entry in os.environ.get("PYTHONWARNINGS", "").split(",") if entry]
    os.environ["PYTHONWARNINGS"] = ",".join(inherited + [c for c in children if c not in inherited])


def implementation_name(use_transformer_engine: bool | None = None) -> str:
    if use_transformer_engine is None:
        use_transformer_engine = have_transformer_engine()
    if use_transformer_engine:
        return "Transformer Engine layers"
    norms = "apex fused norms" if have_apex() else "torch norms"
    return f"megatron-core local layers ({norms}, torch scaled_dot_product_attention)"


def decoder_block_spec(config, use_transformer_engine: bool | None = None,
                       vp_stage: int | None = None):
    """The decoder spec for this pipeline rank's layers (of its model chunk ``vp_stage`` in the
    interleaved schedule) and final norm; logs the implementation."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from patch_megatron.model.sdpa_attention import SDPAttention
    from patch_megatron.model.torch_norm import TorchNorm

    if use_transformer_engine is None:
        use_transformer_engine = have_transformer_engine()
    logger.info("model: %s", implementation_name(use_transformer_engine))
    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=config.qk_layernorm)
    layer = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm,
                                                     normalization=config.normalization)
    # megatron's local attention materialises the s x s scores; torch's fused kernels do not.
    layer.submodules.self_attention.submodules.core_attention = SDPAttention
    if have_apex():
        return layer
    # megatron's torch norm fallback cannot run under sequence parallelism nor with a
    # zero-centred gamma: use ours everywhere.
    layer.submodules.input_layernorm = TorchNorm
    layer.submodules.pre_mlp_layernorm = TorchNorm
    if config.qk_layernorm:  # one norm per head: over kv_channels, weights shared by the heads
        attention = layer.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = TorchNorm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
        layer_norm=TorchNorm
    )
