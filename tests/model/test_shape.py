"""ModelShape: its defaults, its checks, and its parameter count against the models it builds."""

from dataclasses import replace

import pytest

from patch_megatron.llama_recipe import LLAMA_ARCHITECTURE
from patch_megatron.model.shape import ModelShape, llama_shape, padded_vocab_size

# Small GQA config: 2 layers, h=64, 4 heads of d=16 in 2 groups, ffn 176, V=256.
SMALL = llama_shape(num_layers=2, hidden_size=64, ffn_hidden_size=176,
                    num_attention_heads=4, num_query_groups=2, vocab_size=256)


def test_llama_parameter_count_by_hand():
    per_layer = 64 * (64 + 2 * 32) + 64 * 64 + 64 * 2 * 176 + 176 * 64 + 2 * 64
    assert SMALL.parameter_count(include_embeddings=False) == 2 * per_layer + 64
    assert SMALL.parameter_count() == 2 * per_layer + 64 + 2 * 256 * 64
    tied = replace(SMALL, untie_embeddings_and_output_weights=False)
    assert SMALL.parameter_count() - tied.parameter_count() == 256 * 64


def test_paper_370m_parameter_count():
    # The patch paper's "370M" LLaMA (h=1024, ffn=2752, 24 layers, 16 heads, V=32000).
    shape = llama_shape(num_layers=24, hidden_size=1024, ffn_hidden_size=2752,
                        num_attention_heads=16, vocab_size=32000)
    assert shape.parameter_count() == pytest.approx(370e6, rel=0.03)


def test_megatron_lm_defaults():
    shape = ModelShape(num_layers=2, hidden_size=512, num_attention_heads=8, vocab_size=128)
    assert (shape.ffn_hidden_size, shape.num_query_groups, shape.kv_channels) == (2048, 8, 64)
    assert shape.add_qkv_bias  # implied by add_bias_linear, as in Megatron-LM
    assert replace(shape, activation="swiglu", ffn_hidden_size=None).ffn_hidden_size == 1344


@pytest.mark.parametrize("fields, message", [
    (dict(num_query_groups=3), "--num-query-groups 3 must divide --num-attention-heads 4"),
    (dict(hidden_size=30), "--hidden-size 30 is not divisible by --num-attention-heads 4"),
    (dict(normalization="BatchNorm"), "--normalization 'BatchNorm'"),
    (dict(rotary_percent=0.0), "--rotary-percent must lie in"),
    (dict(num_layers=0), "--num-layers must be a positive integer"),
])
def test_bad_shapes_name_the_flag(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelShape(**{**dict(num_layers=2, hidden_size=32, num_attention_heads=4,
                             vocab_size=64), **fields})


def test_parallel_checks():
    SMALL.check_parallel(2, 2)
    with pytest.raises(ValueError, match="--num-attention-heads 4 is not divisible by "
                                         "--tensor-model-parallel-size 8"):
        SMALL.check_parallel(8, 1)
    with pytest.raises(ValueError, match="--num-layers 2 cannot be split evenly"):
        SMALL.check_parallel(1, 4)


def test_counting_the_embedding_and_loss_in_the_pipeline_split():
    both = dict(embedding_in_split=True, loss_in_split=True)
    SMALL.check_parallel(1, 2, **both)  # 2 layers + 2 counted over 2 stages
    SMALL.check_parallel(1, 3, embedding_in_split=True)
    SMALL.check_parallel(1, 2, None, None, 2, **both)  # a chunk each for 4 units
    with pytest.raises(ValueError, match="plus the 1 counted .* makes 3, which cannot be split "
                                         "evenly over --pipeline-model-parallel-size 2"):
        SMALL.check_parallel(1, 2, loss_in_split=True)
    with pytest.raises(ValueError, match="cannot be combined with --decoder-first/last"):
        SMALL.check_parallel(1, 2, 1, None, **both)
    with pytest.raises(ValueError, match="into 3 model chunks, but each pipeline stage "
                                         r"\(counting the embedding or loss\) holds 2"):
        SMALL.check_parallel(1, 2, None, None, 3, **both)


def test_padded_vocab_size():
    assert padded_vocab_size(32000) == 32000
    assert padded_vocab_size(50257) == 50304
    assert padded_vocab_size(50257, tensor_model_parallel_size=2) == 50432
    assert padded_vocab_size(100, 64, 2) == 128


GPT_DEFAULTS = {}
ARCHITECTURES = {
    "gpt": GPT_DEFAULTS,
    "llama": {k: v for k, v in LLAMA_ARCHITECTURE.items() if "dropout" not in k},
    "rmsnorm-squared-relu-qkv-bias": dict(normalization="RMSNorm", activation="squared_relu",
                                          add_bias_linear=False, add_qkv_bias=True,
                                          position_embedding_type="none"),
    "gpt-qk-layernorm": dict(qk_layernorm=True, apply_layernorm_1p=True),
    "llama-qk-layernorm-interleaved": dict(
        {k: v for k, v in LLAMA_ARCHITECTURE.items() if "dropout" not in k},
        qk_layernorm=True, rotary_interleaved=True),
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("untie", [True, False])
def test_parameter_count_equals_the_built_model(arch, untie, model_parallel_world_of_one):
    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.model.patch_gpt import build_model

    config = PatchGPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                            num_query_groups=2, ffn_hidden_size=48, vocab_size=64, seq_length=8,
                            untie_embeddings_and_output_weights=untie, patch_size=2,
                            **ARCHITECTURES[arch])
    model = build_model(config)
    built = sum(p.numel() for p in model.parameters())
    assert config.parameter_count() == built
    assert config.shape.parameter_count() == built
