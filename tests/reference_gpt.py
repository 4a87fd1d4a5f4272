"""An independent plain-PyTorch GPT with the patch-level loss, written from the papers.

It shares no code with patch_megatron: weights come in as a dict of full
(unsharded) tensors named like megatron's TP=1 state dict, and everything else
is spelled out here from the equations of docs/method.md §1 and of the
architectures' papers: the LLaMA decoder (RMSNorm, RoPE, grouped-query
attention, SwiGLU, no biases) and the GPT-2/3 decoder of Megatron-LM's
defaults (LayerNorm with bias, learned absolute positions, GeLU, biases),
plus the variants Megatron-LM names by flag (zero-centred norm weights,
squared ReLU, no positions, per-head query/key norms, RoFormer's interleaved
RoPE). Patch i of the patch stage has position i.
"""

import math

import torch
import torch.nn.functional as F

LLAMA = dict(normalization="RMSNorm", activation="swiglu", positions="rope")
GPT = dict(normalization="LayerNorm", activation="gelu", positions="learned_absolute")


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def norm(x, weights, prefix, kind, eps, zero_centered=False):
    gamma = weights[prefix + "weight"] + (1 if zero_centered else 0)
    if kind == "RMSNorm":
        return rms_norm(x, gamma, eps)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * gamma + weights[prefix + "bias"]


def linear(x, weights, prefix):
    y = x @ weights[prefix + "weight"].t()
    bias = weights.get(prefix + "bias")
    return y if bias is None else y + bias


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope_angles(d, T, base):
    """[T, d/2]: position t turns channel pair j by t * base^(-2j/d)."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)


def rope(x, base):
    # x: [b, heads, T, d]; position of row t is t (patch index when K > 1).
    # LLaMA's layout: pair j is channels (j, j + d/2).
    angles = rope_angles(x.shape[-1], x.shape[-2], base)
    angles = torch.cat([angles, angles], dim=-1)
    return x * angles.cos() + rotate_half(x) * angles.sin()


def rope_interleaved(x, base):
    # RoFormer's layout: pair j is channels (2j, 2j + 1), read as the complex number
    # x[2j] + i x[2j+1] and multiplied by exp(i * angle).
    angles = rope_angles(x.shape[-1], x.shape[-2], base)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    turned = pairs * torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(turned).reshape(x.shape).to(x.dtype)


def attention(x, weights, prefix, heads, groups, base, positions, qk_norm=None,
              rotary_interleaved=False):
    """``qk_norm``: None, or (kind, eps, zero_centered) of the per-head query and key norms."""
    b, T, h = x.shape
    qkv_out = weights[prefix + "linear_qkv.weight"].shape[0]
    d = qkv_out // (heads + 2 * groups)
    per_group = heads // groups
    # megatron's fused QKV rows: per query group, its query heads then one key and one value head.
    qkv = linear(x, weights, prefix + "linear_qkv.").view(b, T, groups, per_group + 2, d)
    q = qkv[:, :, :, :per_group].reshape(b, T, heads, d).transpose(1, 2)
    k = qkv[:, :, :, per_group].transpose(1, 2)
    v = qkv[:, :, :, per_group + 1].transpose(1, 2)
    if qk_norm is not None:  # over each head's d channels, one weight for all heads
        kind, eps, zero_centered = qk_norm
        q = norm(q, weights, prefix + "q_layernorm.", kind, eps, zero_centered)
        k = norm(k, weights, prefix + "k_layernorm.", kind, eps, zero_centered)
    k = k.repeat_interleave(per_group, dim=1)
    v = v.repeat_interleave(per_group, dim=1)
    if positions == "rope":
        rotate = rope_interleaved if rotary_interleaved else rope
        q, k = rotate(q, base), rotate(k, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, T, heads * d)
    return linear(out, weights, prefix + "linear_proj.")


def mlp(x, weights, prefix, activation):
    up = linear(x, weights, prefix + "linear_fc1.")
    if activation == "swiglu":
        gate, up = up.chunk(2, dim=-1)
        up = F.silu(gate) * up
    elif activation == "squared_relu":
        up = F.relu(up) ** 2
    else:
        up = F.gelu(up)
    return linear(up, weights, prefix + "linear_fc2.")


def hidden_states(weights, tokens, *, num_layers, heads, groups, patch_size, eps=1e-5, base=10000,
                  normalization="RMSNorm", activation="swiglu", positions="rope",
                  zero_centered=False, qk_layernorm=False, rotary_interleaved=False):
    """Final normed hidden states [b, T, h] for tokens [b, K*T]."""
    qk_norm = (normalization, eps, zero_centered) if qk_layernorm else None
    b, n = tokens.shape
    emb = weights["embedding.word_embeddings.weight"][tokens]
    x = emb.view(b, n // patch_size, patch_size, -1).mean(dim=2)  # the patch embedding
    if positions == "learned_absolute":
        x = x + weights["embedding.position_embeddings.weight"][: x.shape[1]]
    for i in range(num_layers):
        p = f"decoder.layers.{i}."
        x = x + attention(norm(x, weights, p + "input_layernorm.", normalization, eps, zero_centered),
                          weights, p + "self_attention.", heads, groups, base, positions,
                          qk_norm, rotary_interleaved)
        x = x + mlp(norm(x, weights, p + "pre_mlp_layernorm.", normalization, eps, zero_centered),
                    weights, p + "mlp.", activation)
    return norm(x, weights, "decoder.final_layernorm.", normalization, eps, zero_centered)


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
    head = weights.get("output_layer.weight", weights["embedding.word_embeddings.weight"])
    logits = h @ head.t()
    targets = sequence[:, K:].reshape(b, T, K)
    nll = patch_nll(logits, targets)
    if loss_mask is None:
        return nll.mean()
    return (nll * loss_mask).sum() / loss_mask.sum()
