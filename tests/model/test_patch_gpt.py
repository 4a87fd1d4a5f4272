"""PatchGPTModel against the independent reference, megatron's GPTModel at K=1, and its errors."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel

from patch_megatron.model.config import PatchGPTConfig
from patch_megatron.model.patch_gpt import build_model
from patch_megatron.model.generate import generate
from patch_megatron.model.spec import decoder_block_spec
import reference_gpt
from patch_megatron.llama_recipe import LLAMA_ARCHITECTURE

SHAPE = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
             ffn_hidden_size=48, vocab_size=64, seq_length=6, **LLAMA_ARCHITECTURE)


@pytest.fixture(autouse=True)
def _world(model_parallel_world_of_one):
    yield


def _model(K, **overrides):
    return build_model(PatchGPTConfig(**{**SHAPE, **overrides, "patch_size": K}))


def _weights(model):
    return {k: v.detach().clone().requires_grad_() for k, v in model.state_dict().items()
            if not k.endswith("_extra_state")}


def _window(K, b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SHAPE["vocab_size"], (b, K * (SHAPE["seq_length"] + 1)), generator=g)


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_loss_and_every_gradient_match_reference(K, masked):
    model = _model(K)
    window = _window(K)
    tokens, labels = window[:, :-K], window[:, K:]
    b, T = tokens.shape[0], SHAPE["seq_length"]
    mask = torch.ones(b, T, K)
    if masked:
        mask[0, 2:] = 0  # a padded tail
        mask[1, :, -1] = 0  # and single targets inside patches
    mask_flat = mask.reshape(b, T * K)

    per_token = model(tokens, labels=labels)
    assert per_token.shape == (b, T * K)
    loss = (per_token * mask_flat).sum() / mask_flat.sum()
    loss.backward()

    weights = _weights(model)
    ref_loss = reference_gpt.patch_loss(
        weights, window, patch_size=K, loss_mask=mask if masked else None,
        num_layers=SHAPE["num_layers"], heads=4, groups=2,
    )
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    grads = dict(model.named_parameters())
    assert set(grads) == set(weights)
    for name, w in weights.items():
        torch.testing.assert_close(grads[name].grad, w.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_patch_size_one_is_megatron_gpt_model_exactly():
    ours = _model(1)
    cfg = PatchGPTConfig(**SHAPE)
    tc = cfg.transformer_config(cpu=True)
    plain = GPTModel(tc, decoder_block_spec(tc), SHAPE["vocab_size"],
                     SHAPE["seq_length"], position_embedding_type="rope",
                     share_embeddings_and_output_weights=False)
    plain.load_state_dict(ours.state_dict())
    window = _window(1, seed=5)
    tokens, labels = window[:, :-1], window[:, 1:]
    a = ours(tokens, labels=labels)
    b = plain(tokens, None, None, labels=labels)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    for (name, p), q in zip(ours.named_parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name


def test_state_dict_names_do_not_depend_on_patch_size():
    assert _model(1).state_dict().keys() == _model(4).state_dict().keys()


def test_logits_without_labels_and_greedy_generation():
    model = _model(1)
    weights = _weights(model)
    prompt = _window(1, b=2, seed=7)[:, :4]
    out = generate(model, prompt, max_new_tokens=3)
    assert out.shape == (2, 7) and torch.equal(out[:, :4], prompt)
    with torch.no_grad():
        seq = prompt
        for _ in range(3):
            h = reference_gpt.hidden_states(weights, seq, num_layers=2, heads=4, groups=2, patch_size=1)
            nxt = (h[:, -1] @ weights["output_layer.weight"].t()).argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


def test_patch_model_returns_next_patch_logits_without_labels():
    model = _model(4)
    logits = model(_window(4)[:, :-4])
    assert logits.shape == (3, SHAPE["seq_length"], SHAPE["vocab_size"])


def test_generation_refuses_patch_model():
    with pytest.raises(ValueError, match="convert_patch_to_token"):
        generate(_model(4), _window(4)[:, :4], 1)


def test_input_length_not_a_multiple_of_patch_size():
    model = _model(4)
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        model(_window(4)[:, :10])


def test_labels_must_match_inputs():
    model = _model(2)
    window = _window(2)
    with pytest.raises(ValueError, match="one target per input token"):
        model(window[:, :-2], labels=window[:, 2:-2])


@pytest.mark.parametrize("overrides, message", [
    (dict(patch_size=0), "--patch-size must be >= 1"),
    (dict(tensor_model_parallel_size=3), "--num-attention-heads 4 is not divisible by "
                                         "--tensor-model-parallel-size 3"),
    (dict(sequence_parallel=True), "sequence parallel needs tensor parallel size > 1"),
    (dict(num_query_groups=3), "--num-query-groups 3 must divide --num-attention-heads 4"),
    (dict(hidden_size=30), "--hidden-size 30 is not divisible"),
    (dict(num_layers=3, pipeline_model_parallel_size=2), "--num-layers 3 cannot be split evenly"),
    (dict(tensor_model_parallel_size=2, sequence_parallel=True, seq_length=5),
     "--seq-length divisible by --tensor-model-parallel-size"),
    (dict(vocab_size=63, tensor_model_parallel_size=2, num_query_groups=2), "make-vocab-size-divisible-by"),
    (dict(max_position_embeddings=4), "below --seq-length"),
])
def test_impossible_configurations_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        PatchGPTConfig(**{**SHAPE, **overrides})


def test_transformer_impl_selects_the_layers():
    from patch_megatron.model.sdpa_attention import SDPAttention
    from patch_megatron.model.spec import have_transformer_engine

    local = _model(2, transformer_impl="local")
    assert all(isinstance(layer.self_attention.core_attention, SDPAttention)
               for layer in local.decoder.layers)
    default = PatchGPTConfig(**SHAPE)
    assert default.transformer_impl == ("transformer_engine" if have_transformer_engine() else "local")
    if not have_transformer_engine():
        with pytest.raises(ValueError, match="Transformer Engine is not installed"):
            PatchGPTConfig(**SHAPE, transformer_impl="transformer_engine")
    with pytest.raises(ValueError, match="unknown transformer implementation"):
        PatchGPTConfig(**SHAPE, transformer_impl="fused")


def test_local_layers_checkpoint_under_transformer_engines_key_names():
    # TE fuses each pre-norm into the linear after it (linear_qkv / linear_fc1.layer_norm_weight).
    keys = {v.key for v in _model(2, transformer_impl="local").sharded_state_dict().values()
            if hasattr(v, "key") and not v.key.endswith("_extra_state")}
    assert {"decoder.layers.self_attention.linear_qkv.layer_norm_weight",
            "decoder.layers.mlp.linear_fc1.layer_norm_weight",
            "decoder.final_layernorm.weight"} <= keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)


# Megatron-LM's default GPT and the variants its flags name, against the reference's equations.
VARIANTS = {
    "gpt": dict(normalization="LayerNorm", activation="gelu", add_bias_linear=True,
                position_embedding_type="learned_absolute"),
    "gpt-1p-squared-relu-no-positions": dict(
        normalization="LayerNorm", apply_layernorm_1p=True, activation="squared_relu",
        add_bias_linear=False, add_qkv_bias=True, position_embedding_type="none"),
    "rmsnorm-gelu-learned": dict(normalization="RMSNorm", activation="gelu", add_bias_linear=True,
                                 position_embedding_type="learned_absolute"),
    # --qk-layernorm: LayerNorm (weight and bias) with --apply-layernorm-1p's gamma offset
    "gpt-1p-qk-layernorm": dict(normalization="LayerNorm", apply_layernorm_1p=True,
                                activation="gelu", add_bias_linear=True,
                                position_embedding_type="learned_absolute", qk_layernorm=True),
    # Qwen3's attention: RMSNorm over each query and key head, then RoPE
    "llama-qk-layernorm": dict(LLAMA_ARCHITECTURE, qk_layernorm=True),
    "llama-rotary-interleaved": dict(LLAMA_ARCHITECTURE, rotary_interleaved=True),
}


@pytest.mark.parametrize("K", [1, 4])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_megatron_lm_architectures_match_reference(variant, K):
    arch = VARIANTS[variant]
    shape = {**SHAPE, **arch, "hidden_dropout": 0.0, "attention_dropout": 0.0}
    model = build_model(PatchGPTConfig(**shape, patch_size=K))
    # Non-trivial norm weights and biases, so that a dropped bias or gamma offset shows.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    window = _window(K, seed=11)
    tokens, labels = window[:, :-K], window[:, K:]
    loss = model(tokens, labels=labels).mean()
    loss.backward()
    weights = _weights(model)
    positions = {"learned_absolute": "learned_absolute", "none": "none",
                 "rope": "rope"}[arch["position_embedding_type"]]
    options = {"qk_layernorm": arch.get("qk_layernorm", False),
               "rotary_interleaved": arch.get("rotary_interleaved", False)}

    shape = dict(num_layers=SHAPE["num_layers"], heads=4, groups=2,
                 normalization=arch["normalization"], activation=arch["activation"],
                 positions=positions, zero_centered=arch.get("apply_layernorm_1p", False))
    ref_loss = reference_gpt.patch_loss(weights, window, patch_size=K, **shape, **options)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        for option in [name for name, on in options.items() if on]:
            # the reference without the option computes another model, which the test would see
            with_it, without = (reference_gpt.hidden_states(weights, tokens, patch_size=K, **shape,
                                                            **{**options, option: on})
                                for on in (True, False))
            assert not torch.allclose(with_it, without, rtol=1e-3, atol=1e-4), option
    assert any("q_layernorm" in n for n in weights) == options["qk_layernorm"]
    expected_biases = arch["add_bias_linear"] or arch.get("add_qkv_bias", False)
    assert any(n.endswith("linear_qkv.bias") for n in weights) == expected_biases
    assert ("embedding.position_embeddings.weight" in weights) == (positions == "learned_absolute")
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, weights[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_dropout_is_applied_in_training_only():
    model = build_model(PatchGPTConfig(**{**SHAPE, "hidden_dropout": 0.5, "attention_dropout": 0.5,
                                          "patch_size": 4}))
    tokens = _window(4)[:, :-4]
    model.train()
    first, second = model(tokens), model(tokens)
    assert not torch.equal(first, second)
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_megatron_lm_ffn_default():
    # 4h for GeLU; SwiGLU's two input projections: 8h/3 rounded down to a multiple of 64.
    base = {k: v for k, v in SHAPE.items() if k not in ("ffn_hidden_size", "hidden_size")}
    assert PatchGPTConfig(**{**base, "hidden_size": 512, "activation": "gelu"}).ffn_hidden_size == 2048
    assert PatchGPTConfig(**{**base, "hidden_size": 512}).ffn_hidden_size == 1344


@pytest.mark.parametrize("recompute", [dict(recompute_granularity="full", recompute_method="uniform",
                                            recompute_num_layers=1),
                                       dict(recompute_granularity="full", recompute_method="block",
                                            recompute_num_layers=2),
                                       dict(recompute_granularity="selective")],
                         ids=["full-uniform", "full-block", "selective"])
def test_activation_recompute_gives_the_same_loss_and_gradients(recompute):
    plain, again = _model(4), _model(4, **recompute)
    again.load_state_dict(plain.state_dict())
    window = _window(4, seed=2)
    tokens, labels = window[:, :-4], window[:, 4:]
    for model in (plain, again):
        model(tokens, labels=labels).mean().backward()
    for (name, p), q in zip(plain.named_parameters(), again.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
