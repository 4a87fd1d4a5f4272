"""Which layer implementation runs: Transformer Engine when present, megatron's local one otherwise."""

from __future__ import annotations

import importlib.util
import logging

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


def layer_spec(use_transformer_engine: bool | None = None):
    """The decoder layer spec; logs which implementation is in use."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine is None:
        use_transformer_engine = have_transformer_engine()
    if use_transformer_engine:
        logger.info("layers: Transformer Engine")
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    norms = "apex fused RMSNorm" if have_apex() else "torch RMSNorm"
    logger.info("layers: megatron-core local spec (%s, unfused attention)", norms)
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
