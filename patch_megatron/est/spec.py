"""The decoder spec with EST's layers: the project's local spec, four classes swapped.

Parameter names and shapes are those of the plain spec, so checkpoints move
freely between EST and non-EST runs. Transformer Engine's fused layers cannot
slice their weights per step, so EST always uses the local layers (with
torch SDPA, which accepts any number of heads).
"""

from __future__ import annotations

import copy

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)

from patch_megatron.est import modules
from patch_megatron.model.sdpa_attention import SDPAttention
from patch_megatron.model.spec import decoder_block_spec


def subnetwork_block_spec(config):
    """EST's layer specs for a megatron TransformerConfig (``build_model``'s ``layer_spec``)."""
    block = decoder_block_spec(config, use_transformer_engine=False)
    if isinstance(block, ModuleSpec):  # with apex the local spec is one layer spec
        block = TransformerBlockSubmodules(layer_specs=[block] * get_num_layers_to_build(config))
    else:
        block = copy.copy(block)
    block.layer_specs = [_subnetwork_layer(spec, SDPAttention, modules) for spec in block.layer_specs]
    return block


def _subnetwork_layer(layer, core_attention, modules):
    layer = copy.deepcopy(layer)
    layer.module = modules.SubnetTransformerLayer
    attention = layer.submodules.self_attention
    attention.module = modules.SubnetSelfAttention
    attention.submodules.linear_qkv = modules.SubnetColumnParallelLinear
    attention.submodules.linear_proj = modules.SubnetRowParallelLinear
    attention.submodules.core_attention = core_attention
    mlp = layer.submodules.mlp
    # stays megatron's MLP here so that the layer passes it the TP group; the layer adopts it
    # as SubnetMLP (same module, EST methods added).
    mlp.submodules.linear_fc1 = modules.SubnetColumnParallelLinear
    mlp.submodules.linear_fc2 = modules.SubnetRowParallelLinear
    return layer
