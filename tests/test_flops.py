"""FLOPs model against a hand count, the patch-stage relation and EST fractions."""

import pytest

from patch_megatron.flops import (
    KeptFractions,
    flops_per_token,
    forward_flops_per_sample,
    training_flops_per_iteration,
    training_flops_per_sample,
)
from patch_megatron.model.shape import llama_shape

# Small GQA config: 2 layers, h=64, 4 heads of d=16 in 2 groups, ffn 176, V=256.
SMALL = llama_shape(num_layers=2, hidden_size=64, ffn_hidden_size=176,
                    num_attention_heads=4, num_query_groups=2, vocab_size=256)
T = 32


def test_hand_count_small_config():
    # Per layer, forward, 32 positions, 2 FLOPs per multiply-add:
    q_proj = 2 * 32 * 64 * (4 * 16)          # 262_144
    kv_proj = 2 * 32 * 64 * (2 * 2 * 16)     # 262_144  (K and V, 2 groups)
    scores = 2 * 32 * 32 * (4 * 16)          # 131_072  (full 32x32 square)
    values = 2 * 32 * 32 * (4 * 16)          # 131_072
    out_proj = 2 * 32 * (4 * 16) * 64        # 262_144
    fc1 = 2 * 32 * 64 * (2 * 176)            # 1_441_792 (gate + up)
    fc2 = 2 * 32 * 176 * 64                  # 720_896
    layer = q_proj + kv_proj + scores + values + out_proj + fc1 + fc2
    assert layer == 3_211_264
    lm_head = 2 * 32 * 64 * 256              # 1_048_576
    forward = 2 * layer + lm_head            # 7_471_104
    assert forward_flops_per_sample(SMALL, T) == forward == 7_471_104
    assert training_flops_per_sample(SMALL, T) == 3 * 7_471_104
    assert flops_per_token(SMALL, T) == 3 * 7_471_104 / 32
    assert training_flops_per_iteration(SMALL, T, global_batch_size=8) == 8 * 3 * 7_471_104


def test_gelu_mlp_has_one_input_projection():
    # Megatron-LM's default GPT MLP: fc1 computes f outputs, not SwiGLU's 2f.
    from dataclasses import replace

    gelu = replace(SMALL, activation="gelu")
    fc1_half = 2 * 32 * 64 * 176  # the up projection alone
    assert forward_flops_per_sample(SMALL, T) - forward_flops_per_sample(gelu, T) == 2 * fc1_half
    assert SMALL.parameter_count() - gelu.parameter_count() == 2 * 64 * 176


def test_matches_megatron_lm_closed_form():
    # Megatron-LM's num_floating_point_operations for a dense SwiGLU GQA model as it was
    # before it halved the causal attention matmuls (core_v0.16.1 has s/(2h) for s/h, see
    # patch_megatron/flops.py), written out independently: 12·b·s·L·h² · [(1 + g/a + s/h)·(a·d/h)
    #   + (f/h)·3/2 + V/(2·L·h)].
    shape = llama_shape(num_layers=24, hidden_size=2048, ffn_hidden_size=5504,
                        num_attention_heads=16, num_query_groups=4, vocab_size=32000)
    b, s, L, h, a, g, d, f, V = 3, 2048, 24, 2048, 16, 4, 128, 5504, 32000
    expected = 12 * b * s * L * h**2 * (
        (1 + g / a + s / h) * (a * d / h) + (f / h) * 1.5 + V / (2 * L * h)
    )
    assert training_flops_per_iteration(shape, s, b) == pytest.approx(expected, rel=1e-12)


def test_patch_stage_same_per_sample_quarter_per_token():
    token = training_flops_per_sample(SMALL, T, patch_size=1)
    patch = training_flops_per_sample(SMALL, T, patch_size=4)
    # Same T positions through the transformer and LM head: same cost per sample...
    assert patch == token
    # ...but each sample holds 4x the tokens.
    assert flops_per_token(SMALL, T, patch_size=4) == pytest.approx(flops_per_token(SMALL, T) / 4)
    # Against a token-stage sample of the same 4·T tokens (longer attention too),
    # the patch stage is more than 4x cheaper per token.
    assert flops_per_token(SMALL, 4 * T) > 4 * flops_per_token(SMALL, T, patch_size=4)


def test_est_fractions_scale_their_terms():
    full = forward_flops_per_sample(SMALL, T)
    lm_head = 2 * T * 64 * 256
    layer = (full - lm_head) / 2
    # Half the layers: half the per-layer FLOPs, LM head unchanged.
    assert forward_flops_per_sample(SMALL, T, kept=KeptFractions(layers=0.5)) == pytest.approx(
        layer + lm_head)
    # Half the MLP units: fc1 + fc2 halve.
    mlp = 2 * T * 64 * 2 * 176 + 2 * T * 176 * 64
    assert forward_flops_per_sample(SMALL, T, kept=KeptFractions(mlp_units=0.5)) == pytest.approx(
        full - 2 * mlp / 2)
    # Half the heads (groups dropped with them): every attention term halves.
    attention = layer - mlp
    assert forward_flops_per_sample(SMALL, T, kept=KeptFractions(attention_heads=0.5)) == pytest.approx(
        full - 2 * attention / 2)
    # Heads sampled inside groups that all stay: K/V projections keep full cost.
    kv_proj = 2 * T * 64 * (2 * 2 * 16)
    inside_groups = KeptFractions(attention_heads=0.5, query_groups=1.0)
    assert forward_flops_per_sample(SMALL, T, kept=inside_groups) == pytest.approx(
        full - 2 * (attention - kv_proj) / 2)
    # Backward is still 2x forward under EST.
    kept = KeptFractions(layers=0.75, attention_heads=0.5, mlp_units=0.5)
    assert training_flops_per_sample(SMALL, T, kept=kept) == 3 * forward_flops_per_sample(SMALL, T, kept=kept)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="patch_size"):
        flops_per_token(SMALL, T, patch_size=0)
    with pytest.raises(ValueError, match="seq_length"):
        training_flops_per_sample(SMALL, 0)
    with pytest.raises(ValueError, match="layers"):
        KeptFractions(layers=0.0)
