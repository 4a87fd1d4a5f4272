"""tools/convert_to_hf.py: transformers loads the export and computes our model's logits.

Checkpoints come from a real two-stage run (tests/conversion/conftest.py):
the patch stage saved at TP=2, the converter's output at TP=1/PP=1, the token
stage saved at PP=2.
"""

import json
import os

import pytest
import torch

from two_stage import our_model, run_tool, sample_tokens

pytest.importorskip("transformers")


def _export(load, output, *extra):
    code, err = run_tool("convert_to_hf", ["--load", load, "--output", output, *extra])
    assert code == 0, err
    return output


def _hf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.mark.parametrize("stage", ["token", "handoff", "patch"],
                         ids=["saved-at-PP2", "saved-at-TP1-PP1", "saved-at-TP2"])
def test_transformers_logits_equal_ours(stage, two_stage_run, world_of_one, vocab_size,
                                        tokenizer_model, tmp_path):
    extra = ["--tokenizer-model", tokenizer_model, "--max-shard-size", "40KB"]
    if stage == "patch":
        extra.append("--allow-patch-stage")
    out = _export(two_stage_run[stage], str(tmp_path / "hf"), *extra)
    files = os.listdir(out)
    assert {"config.json", "generation_config.json", "tokenizer.model",
            "tokenizer_config.json", "model.safetensors.index.json"} <= set(files)
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded under 40KB

    hf = _hf_model(out)
    assert hf.config.vocab_size == vocab_size  # padded rows trimmed
    assert hf.config.num_key_value_heads == 2 and not hf.config.tie_word_embeddings
    ours, checkpoint = our_model(two_stage_run[stage])
    assert checkpoint.description.padded_vocab_size > vocab_size
    tokens = sample_tokens(vocab_size)
    with torch.no_grad():
        expected = ours(tokens)[..., :vocab_size]
        got = hf(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    generated = hf.generate(tokens[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9) and torch.equal(generated[:, :4], tokens[:1, :4])


def test_tokenizer_reproduces_training_ids(two_stage_run, tokenizer_model, tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    out = _export(two_stage_run["token"], str(tmp_path / "hf"), "--tokenizer-model", tokenizer_model)
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    slow = AutoTokenizer.from_pretrained(out, use_fast=False)
    texts = ["Return a new list.", "  two  spaces\nand a\n\nnewline ", "digits 12345 ünïcödé", "\nx"]
    for text in texts:
        assert slow.encode(text) == sp.encode_as_ids(text)  # no BOS, as in training
        if not text.startswith(" "):  # transformers' decode drops one leading space
            assert slow.decode(slow.encode(text)) == text
    default = AutoTokenizer.from_pretrained(out)  # transformers' fast conversion also loads
    assert default.decode(default.encode("Return a new list.")) == "Return a new list."
    config = json.load(open(os.path.join(out, "generation_config.json")))
    assert config["eos_token_id"] == sp.eos_id() and config["bos_token_id"] == sp.bos_id()


def test_patch_stage_checkpoint_is_refused(two_stage_run, tmp_path):
    code, err = run_tool("convert_to_hf", ["--load", two_stage_run["patch"],
                                           "--output", str(tmp_path / "hf")])
    assert code == 2
    assert "patch-stage checkpoint (patch size 4)" in err and "--allow-patch-stage" in err
    assert not os.path.exists(tmp_path / "hf")


def test_refusals_leave_nothing_behind(two_stage_run, tmp_path, vocab_size):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    code, err = run_tool("convert_to_hf", ["--load", two_stage_run["token"], "--output", str(occupied)])
    assert code == 2 and "not empty" in err and "--force" in err
    assert (occupied / "keep.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_tool("convert_to_hf", ["--load", str(empty), "--output", str(tmp_path / "x")])
    assert code == 2 and "no checkpoint" in err

    code, err = run_tool("convert_to_hf", ["--load", two_stage_run["token"], "--output",
                                           str(tmp_path / "y"), "--vocab-size", "100000"])
    assert code == 2 and "does not fit" in err
    assert sorted(os.listdir(tmp_path)) == ["empty", "occupied"]  # no partial outputs
