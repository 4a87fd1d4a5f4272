"""tools/convert_from_hf.py: a Hugging Face Llama becomes our checkpoint and comes back unchanged."""

import json
import os

import pytest
import torch

from two_stage import our_model, run_tool, sample_tokens

from patch_megatron.conversion.hf_config import rope_theta

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A tiny random Llama with tied embeddings, grouped-query attention and a large RoPE base."""
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    directory = str(tmp_path_factory.mktemp("hf") / "llama")
    model.save_pretrained(directory, safe_serialization=True)
    return directory, model


def test_import_matches_transformers_and_export_round_trips(hf_llama, world_of_one, tmp_path):
    from safetensors.torch import load_file

    directory, hf = hf_llama
    save = str(tmp_path / "ours")
    code, err = run_tool("convert_from_hf", ["--hf-dir", directory, "--save", save,
                                             "--target-tensor-parallel-size", "2",
                                             "--target-pipeline-parallel-size", "2"])
    assert code == 0, err
    ours, checkpoint = our_model(save)
    assert checkpoint.description.padded_vocab_size == 256  # 128 x TP=2
    assert checkpoint.record.layout == (2, 2)
    tokens = sample_tokens(100, length=12)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens)[..., :100], hf(tokens).logits, rtol=1e-5, atol=1e-5)

    back = str(tmp_path / "back")
    code, err = run_tool("convert_to_hf", ["--load", save, "--output", back])
    assert code == 0, err
    original, exported = load_file(f"{directory}/model.safetensors"), load_file(f"{back}/model.safetensors")
    original.pop("lm_head.weight", None)  # tied: the embedding itself
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    config, before = (json.load(open(os.path.join(d, "config.json"))) for d in (back, directory))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_key_value_heads",
                "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        assert config[key] == before[key], key
    assert rope_theta(config) == rope_theta(before) == 500000.0  # 5.x: inside rope_parameters
    # ... and transformers reads the export back as the model it started from (RoPE base included).
    again = transformers.AutoModelForCausalLM.from_pretrained(back, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, hf(tokens).logits, rtol=1e-5, atol=1e-5)


def test_unsupported_models_are_refused(hf_llama, tmp_path):
    directory, _ = hf_llama
    config = json.load(open(os.path.join(directory, "config.json")))
    odd = tmp_path / "odd"
    odd.mkdir()
    json.dump({**config, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
              open(odd / "config.json", "w"))
    code, err = run_tool("convert_from_hf", ["--hf-dir", str(odd), "--save", str(tmp_path / "x")])
    assert code == 2 and "rope_scaling" in err
    code, err = run_tool("convert_from_hf", ["--hf-dir", directory, "--save", str(tmp_path / "y"),
                                             "--target-tensor-parallel-size", "3"])
    assert code == 2 and "TP=3" in err
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")
