"""The paper's subnetwork formulas in plain PyTorch, on full (unsharded) weights.

Independent of patch_megatron: every head and every MLP unit is computed, and
the subnetwork is selected afterwards, by sums over the kept heads and a 0/1
unit mask, exactly as written in the paper (docs/method.md §2):

* attention: (1/p_H) * sum_{i in I_H} head_i @ W_O^(i), p_H = |I_H| / N_H
* MLP:       (1/p_M) * act(X W1[:, I_M]) W2[I_M, :],     p_M = |I_M| / N_M
* a skipped layer adds nothing to the residual stream.

A layer's mask is None (skipped) or (heads, units), each a list of global
indices or None for all.
"""

import math

import torch
import torch.nn.functional as F

from reference_gpt import patch_nll, rms_norm, rope


def attention_subset(x, w_qkv, w_proj, heads, groups, base, kept_heads):
    b, T, h = x.shape
    d = h // heads
    per_group = heads // groups
    qkv = (x @ w_qkv.t()).view(b, T, groups, per_group + 2, d)
    q = qkv[:, :, :, :per_group].reshape(b, T, heads, d).transpose(1, 2)
    k = qkv[:, :, :, per_group].transpose(1, 2).repeat_interleave(per_group, dim=1)
    v = qkv[:, :, :, per_group + 1].transpose(1, 2).repeat_interleave(per_group, dim=1)
    q, k = rope(q, base), rope(k, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    head_outputs = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v  # [b, heads, T, d]
    kept = range(heads) if kept_heads is None else kept_heads
    p = len(kept) / heads
    total = sum(head_outputs[:, i] @ w_proj[:, i * d:(i + 1) * d].t() for i in kept)
    return total / p


def swiglu_subset(x, w_fc1, w_fc2, kept_units):
    gate, up = (x @ w_fc1.t()).chunk(2, dim=-1)
    act = F.silu(gate) * up
    f = act.shape[-1]
    if kept_units is None:
        return act @ w_fc2.t()
    mask = torch.zeros(f)
    mask[list(kept_units)] = 1.0
    return (act * mask) @ w_fc2.t() / (len(kept_units) / f)


def subnetwork_patch_loss(weights, sequence, layer_masks, *, patch_size, heads, groups,
                          eps=1e-5, base=10000):
    """Mean patch loss over a raw window of K*(T+1) tokens with the given subnetwork."""
    K = patch_size
    b, n = sequence.shape
    T = n // K - 1
    tokens = sequence[:, : K * T]
    x = weights["embedding.word_embeddings.weight"][tokens].view(b, T, K, -1).mean(dim=2)
    for i, mask in enumerate(layer_masks):
        if mask is None:
            continue  # skipped: the residual path only
        kept_heads, kept_units = mask
        p = f"decoder.layers.{i}."
        x = x + attention_subset(
            rms_norm(x, weights[p + "input_layernorm.weight"], eps),
            weights[p + "self_attention.linear_qkv.weight"],
            weights[p + "self_attention.linear_proj.weight"], heads, groups, base, kept_heads)
        x = x + swiglu_subset(
            rms_norm(x, weights[p + "pre_mlp_layernorm.weight"], eps),
            weights[p + "mlp.linear_fc1.weight"], weights[p + "mlp.linear_fc2.weight"], kept_units)
    x = rms_norm(x, weights["decoder.final_layernorm.weight"], eps)
    logits = x @ weights["output_layer.weight"].t()
    return patch_nll(logits, sequence[:, K:].reshape(b, T, K)).mean()
