"""An independent plain-PyTorch LLaMA with the patch-level loss, written from the papers.

It shares no code with patch_megatron: weights come in as a dict of full
(unsharded) tensors named like megatron's TP=1 state dict, and everything else
(RMSNorm, RoPE, grouped-query attention, SwiGLU, patch mean, patch loss) is
spelled out here from the equations of docs/method.md §1.
"""

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope(x, base):
    # x: [b, heads, T, d]; position of row t is t (patch index when K > 1).
    d, T = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return x * angles.cos() + rotate_half(x) * angles.sin()


def attention(x, w_qkv, w_proj, heads, groups, base):
    b, T, h = x.shape
    d = h // heads
    per_group = heads // groups
    # megatron's fused QKV rows: per query group, its query heads then one key and one value head.
    qkv = (x @ w_qkv.t()).view(b, T, groups, per_group + 2, d)
    q = qkv[:, :, :, :per_group].reshape(b, T, heads, d).transpose(1, 2)
    k = qkv[:, :, :, per_group].transpose(1, 2)
    v = qkv[:, :, :, per_group + 1].transpose(1, 2)
    k = k.repeat_interleave(per_group, dim=1)
    v = v.repeat_interleave(per_group, dim=1)
    q, k = rope(q, base), rope(k, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, T, heads * d)
    return out @ w_proj.t()


def swiglu_mlp(x, w_fc1, w_fc2):
    gate, up = (x @ w_fc1.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_fc2.t()


def hidden_states(weights, tokens, *, num_layers, heads, groups, patch_size, eps=1e-5, base=10000):
    """Final normed hidden states [b, T, h] for tokens [b, K*T]."""
    b, n = tokens.shape
    emb = weights["embedding.word_embeddings.weight"][tokens]
    x = emb.view(b, n // patch_size, patch_size, -1).mean(dim=2)  # the patch embedding
    for i in range(num_layers):
        p = f"decoder.layers.{i}."
        x = x + attention(
            rms_norm(x, weights[p + "input_layernorm.weight"], eps),
            weights[p + "self_attention.linear_qkv.weight"],
            weights[p + "self_attention.linear_proj.weight"],
            heads, groups, base,
        )
        x = x + swiglu_mlp(
            rms_norm(x, weights[p + "pre_mlp_layernorm.weight"], eps),
            weights[p + "mlp.linear_fc1.weight"],
            weights[p + "mlp.linear_fc2.weight"],
        )
    return rms_norm(x, weights["decoder.final_layernorm.weight"], eps)


def patch_nll(logits, targets):
    """-log p_i(target_{i,k}) for logits [b, T, V] and targets [b, T, K]: one softmax per position."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_probs = logits.log_softmax(-1)
    return -log_probs.gather(-1, targets)


def patch_loss(weights, sequence, *, patch_size, loss_mask=None, **shape):
    """The paper's loss on a raw window of K*(T+1) tokens: mean over positions i and k.

    Position i sees patches 0..i and is scored on the K tokens of patch i+1.
    ``loss_mask`` is [b, T, K] over those targets (1 = scored).
    """
    K = patch_size
    b, n = sequence.shape
    T = n // K - 1
    h = hidden_states(weights, sequence[:, : K * T], patch_size=K, **shape)
    logits = h @ weights["output_layer.weight"].t()
    targets = sequence[:, K:].reshape(b, T, K)
    nll = patch_nll(logits, targets)
    if loss_mask is None:
        return nll.mean()
    return (nll * loss_mask).sum() / loss_mask.sum()
