"""The tensor layout pieces on their own: QKV/fc1 (un)fusing, vocabulary rows, shard sizes."""

import pytest
import torch

from patch_megatron.model.shape import LLAMA_SHAPE_ARCHITECTURE
from patch_megatron.conversion.errors import ConversionError
from patch_megatron.conversion.llama_layout import from_hf, fuse_qkv, split_qkv, to_hf
from patch_megatron.conversion.model_description import ModelDescription
from patch_megatron.conversion.safetensors_io import parse_size, plan_shards
from patch_megatron.conversion.vocab import repad, trim, vocab_size_from_args


def _description(heads=4, groups=2, tied=False):
    return ModelDescription(num_layers=2, hidden_size=16, ffn_hidden_size=24,
                            num_attention_heads=heads, num_query_groups=groups,
                            vocab_size=12, max_position_embeddings=8, rotary_base=10000,
                            norm_epsilon=1e-5, untie_embeddings_and_output_weights=not tied,
                            patch_size=1, dtype=torch.float32, **LLAMA_SHAPE_ARCHITECTURE)


@pytest.mark.parametrize("heads, groups", [(4, 4), (4, 2), (4, 1)])
def test_qkv_rows_follow_megatron_grouping(heads, groups):
    d = _description(heads, groups)
    head_dim, hidden = d.kv_channels, d.hidden_size
    per_group = heads // groups
    # Label every row with (group, slot in group): slots < per_group are query heads.
    qkv = torch.zeros(groups * (per_group + 2) * head_dim, hidden)
    for g in range(groups):
        for slot in range(per_group + 2):
            start = (g * (per_group + 2) + slot) * head_dim
            qkv[start:start + head_dim] = 100 * g + slot
    q, k, v = split_qkv(qkv, d)
    for head in range(heads):  # query head i belongs to group i // per_group
        assert (q[head * head_dim:(head + 1) * head_dim] == 100 * (head // per_group) + head % per_group).all()
    for g in range(groups):
        assert (k[g * head_dim:(g + 1) * head_dim] == 100 * g + per_group).all()
        assert (v[g * head_dim:(g + 1) * head_dim] == 100 * g + per_group + 1).all()
    assert torch.equal(fuse_qkv(q, k, v, d), qkv)


@pytest.mark.parametrize("tied", [False, True])
def test_megatron_to_hf_and_back_is_exact(tied):
    d = _description(tied=tied)
    g = torch.Generator().manual_seed(0)
    names = {"embedding.word_embeddings.weight": (12, 16), "decoder.final_layernorm.weight": (16,)}
    if not tied:
        names["output_layer.weight"] = (12, 16)
    for i in range(2):
        p = f"decoder.layers.{i}."
        names.update({p + "input_layernorm.weight": (16,), p + "pre_mlp_layernorm.weight": (16,),
                      p + "self_attention.linear_qkv.weight": (32, 16),
                      p + "self_attention.linear_proj.weight": (16, 16),
                      p + "mlp.linear_fc1.weight": (48, 16), p + "mlp.linear_fc2.weight": (16, 24)})
    weights = {n: torch.randn(*s, generator=g) for n, s in names.items()}
    hf = to_hf(weights, d)
    assert ("lm_head.weight" in hf) != tied
    assert torch.equal(hf["model.layers.1.mlp.gate_proj.weight"], weights["decoder.layers.1.mlp.linear_fc1.weight"][:24])
    assert torch.equal(hf["model.layers.1.mlp.up_proj.weight"], weights["decoder.layers.1.mlp.linear_fc1.weight"][24:])
    back = from_hf(hf, d)
    assert back.keys() == weights.keys()
    assert all(torch.equal(back[n], weights[n]) for n in weights)
    hf.pop("model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(ConversionError, match="missing.*k_proj"):
        from_hf(hf, d)


def test_vocab_rows_trim_and_repad():
    emb, out = torch.randn(128, 4), torch.randn(128, 4)
    weights = {"embedding.word_embeddings.weight": emb, "output_layer.weight": out, "x": torch.ones(2)}
    assert trim(weights, 100)["output_layer.weight"].shape == (100, 4)
    grown = repad(weights, 100, 256)
    assert torch.equal(grown["output_layer.weight"][:128], out)
    # New output rows copy the mean of the trained padding rows; new embedding rows are zero.
    torch.testing.assert_close(grown["output_layer.weight"][200], out[100:].mean(0))
    assert (grown["embedding.word_embeddings.weight"][128:] == 0).all()
    assert torch.equal(repad(weights, 100, 100)["embedding.word_embeddings.weight"], emb[:100])


def test_the_vocabulary_a_run_used_from_its_recorded_flags():
    # What each tokenizer's size is in Megatron-LM: NullTokenizer adds its EOD id; TikTokenizer is
    # --vocab-size, 2^17 without it (its vocabulary file is not read).
    assert vocab_size_from_args({"tokenizer_type": "NullTokenizer", "vocab_size": 99}) == 100
    assert vocab_size_from_args({"tokenizer_type": "TikTokenizer", "vocab_size": 1556,
                                 "tokenizer_model": "vocab.json"}) == 1556
    assert vocab_size_from_args({"tokenizer_type": "TikTokenizer"}) == 2 ** 17
    assert vocab_size_from_args({"mock_data": True, "vocab_size": 64}) == 64


def test_shard_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500") == 500 and parse_size("1.5MB") == 1_500_000
    with pytest.raises(ConversionError, match="not a size"):
        parse_size("five gigs")
    tensors = {n: torch.zeros(10) for n in "abcde"}  # 40 bytes each
    assert plan_shards(tensors, 100) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_shards(tensors, 10) == [["a"], ["b"], ["c"], ["d"], ["e"]]
