"""Megatron's full (TP=1) weights <-> Hugging Face ``LlamaForCausalLM`` tensors.

Facts used:

* megatron's fused QKV weight stacks its rows per query group: the group's
  heads/groups query heads, then its key head, then its value head, each
  ``kv_channels`` rows. Hugging Face keeps ``q_proj`` [heads*d, h], ``k_proj``
  and ``v_proj`` [groups*d, h]; its grouped-query attention gives query head i
  the key/value head i // (heads/groups), the same grouping.
* SwiGLU's fused ``linear_fc1`` is [gate; up]; Hugging Face has ``gate_proj``
  and ``up_proj`` and computes ``down_proj(silu(gate) * up)``, as megatron does.
* Both use non-interleaved RoPE (rotate-half on the two halves of a head), so
  query and key rows need no permutation.
* RMSNorm weights map one to one; a tied model has no ``output_layer`` /
  ``lm_head`` tensor.
"""

from __future__ import annotations

import torch

from patch_megatron.conversion.errors import ConversionError
from patch_megatron.conversion.model_description import ModelDescription

# Per-layer tensors that map one to one (megatron suffix, Hugging Face suffix).
_LAYER_SAME = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attention.linear_proj.weight", "self_attn.o_proj.weight"),
    ("pre_mlp_layernorm.weight", "post_attention_layernorm.weight"),
    ("mlp.linear_fc2.weight", "mlp.down_proj.weight"),
)
_QKV = "self_attention.linear_qkv.weight"
_FC1 = "mlp.linear_fc1.weight"
_GLOBAL_SAME = (
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
)
_OUTPUT = ("output_layer.weight", "lm_head.weight")


def split_qkv(qkv: torch.Tensor, d: ModelDescription) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, groups, head_dim = d.num_attention_heads, d.num_query_groups, d.kv_channels
    per_group = heads // groups
    rows = qkv.view(groups, per_group + 2, head_dim, qkv.shape[-1])
    q = rows[:, :per_group].reshape(heads * head_dim, -1)
    k = rows[:, per_group].reshape(groups * head_dim, -1)
    v = rows[:, per_group + 1].reshape(groups * head_dim, -1)
    return q.clone(), k.clone(), v.clone()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: ModelDescription) -> torch.Tensor:
    heads, groups, head_dim = d.num_attention_heads, d.num_query_groups, d.kv_channels
    per_group = heads // groups
    hidden = q.shape[-1]
    return torch.cat([
        q.reshape(groups, per_group, head_dim, hidden),
        k.reshape(groups, 1, head_dim, hidden),
        v.reshape(groups, 1, head_dim, hidden),
    ], dim=1).reshape(-1, hidden)


def to_hf(weights: dict, d: ModelDescription) -> dict:
    """Hugging Face Llama tensors from megatron full weights (vocabulary rows as given)."""
    out = {}
    for megatron_name, hf_name in _GLOBAL_SAME:
        out[hf_name] = weights[megatron_name]
    if d.untie_embeddings_and_output_weights:
        out[_OUTPUT[1]] = weights[_OUTPUT[0]]
    for i in range(d.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for m, h in _LAYER_SAME:
            out[dst + h] = weights[src + m]
        q, k, v = split_qkv(weights[src + _QKV], d)
        out[dst + "self_attn.q_proj.weight"] = q
        out[dst + "self_attn.k_proj.weight"] = k
        out[dst + "self_attn.v_proj.weight"] = v
        gate, up = weights[src + _FC1].chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate.clone()
        out[dst + "mlp.up_proj.weight"] = up.clone()
    # safetensors wants each tensor contiguous and owning its memory.
    return {name: t.contiguous() for name, t in out.items()}


def hf_names(d: ModelDescription) -> set[str]:
    names = {h for _, h in _GLOBAL_SAME}
    if d.untie_embeddings_and_output_weights:
        names.add(_OUTPUT[1])
    for i in range(d.num_layers):
        prefix = f"model.layers.{i}."
        names.update(prefix + h for _, h in _LAYER_SAME)
        names.update(prefix + f"self_attn.{p}_proj.weight" for p in "qkv")
        names.update(prefix + f"mlp.{p}_proj.weight" for p in ("gate", "up"))
    return names


def from_hf(tensors: dict, d: ModelDescription) -> dict:
    """Megatron full weights from Hugging Face Llama tensors (vocabulary rows as given)."""
    expected = hf_names(d)
    ignorable = {name for name in tensors if name.endswith("rotary_emb.inv_freq")}
    tied = not d.untie_embeddings_and_output_weights
    if tied and _OUTPUT[1] in tensors:
        # Some tied checkpoints also store lm_head; it must be the embedding itself.
        if not torch.equal(tensors[_OUTPUT[1]], tensors["model.embed_tokens.weight"]):
            raise ConversionError("config says tie_word_embeddings but lm_head.weight differs from "
                                  "model.embed_tokens.weight: fix the config's tie_word_embeddings")
        ignorable.add(_OUTPUT[1])
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected - ignorable)
    if missing or unexpected:
        raise ConversionError(
            "the Hugging Face weights do not match a Llama model of the config's shape: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''} (biases, MoE or other "
            "architectures are not supported)")
    out = {}
    for megatron_name, hf_name in _GLOBAL_SAME:
        out[megatron_name] = tensors[hf_name]
    if d.untie_embeddings_and_output_weights:
        out[_OUTPUT[0]] = tensors[_OUTPUT[1]]
    for i in range(d.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for m, h in _LAYER_SAME:
            out[dst + m] = tensors[src + h]
        out[dst + _QKV] = fuse_qkv(*(tensors[src + f"self_attn.{p}_proj.weight"] for p in "qkv"), d)
        out[dst + _FC1] = torch.cat([tensors[src + "mlp.gate_proj.weight"],
                                     tensors[src + "mlp.up_proj.weight"]])
    return out
