"""Full (TP=1, PP=1) tensors <-> this rank's pieces, in megatron-core's parameter layouts."""

import torch

# Parameters every TP rank holds whole: norms, learned positions, and the biases added after a
# row-parallel layer's reduction.
_REPLICATED = ("layernorm", "position_embeddings", "linear_proj.bias", "linear_fc2.bias")


def tp_slice(name, full, tp, rank, gated=True):
    """This TP rank's piece of a full tensor (``gated``: fc1 holds SwiGLU's [gate; up])."""
    if tp == 1 or any(part in name for part in _REPLICATED):
        return full
    if gated and name.endswith(("linear_fc1.weight", "linear_fc1.bias")):  # each half split
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):  # row-parallel: split inputs
        return full.chunk(tp, dim=1)[rank]
    return full.chunk(tp, dim=0)[rank]  # vocab-parallel embedding, output layer, QKV rows, fc1


def tp_concat(name, shards, gated=True):
    """The full tensor from the TP ranks' pieces, in rank order (inverse of tp_slice)."""
    if len(shards) == 1 or any(part in name for part in _REPLICATED):
        return shards[0]
    if gated and name.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        gates, ups = zip(*(s.chunk(2) for s in shards))
        return torch.cat([*gates, *ups])
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return torch.cat(shards, dim=1)
    return torch.cat(shards, dim=0)


def global_name(local_name, pp_rank, layers_per_stage):
    """A pipeline stage's local parameter name as the whole model names it."""
    return shifted_name(local_name, pp_rank * layers_per_stage)


def shifted_name(local_name, layer_offset):
    """A model chunk's local parameter name as the whole model names it, for a chunk whose
    first layer is the model's layer ``layer_offset``."""
    parts = local_name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + layer_offset)
    return ".".join(parts)
