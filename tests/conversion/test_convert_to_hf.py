"""tools/convert_to_hf.py: transformers loads the export and computes our model's logits.

Checkpoints come from a real two-stage run (tests/conversion/conftest.py):
the patch stage saved at TP=2, the converter's output at TP=1/PP=1, the token
stage saved at PP=2.
"""

import json
import os
from dataclasses import replace

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
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
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


def _stdlib_documents(count=12):
    """Real text nobody here wrote: the standard library's own sources."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))[::7][:count]
    return [open(os.path.join(root, n), encoding="utf-8").read() for n in names]


def test_tokenizer_reproduces_training_ids(two_stage_run, tokenizer_model, tmp_path):
    """AutoTokenizer, as a Hugging Face user loads it, gives SentencePiece's ids and text back."""
    import sentencepiece
    from transformers import AutoTokenizer

    out = _export(two_stage_run["token"], str(tmp_path / "hf"), "--tokenizer-model", tokenizer_model)
    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.is_fast and len(tokenizer) == sp.get_piece_size()
    # Merges as "left right" strings: tokenizers 0.19 (transformers 4.43) cannot read the
    # [left, right] pairs that newer releases write, and newer ones read both.
    merges = json.load(open(os.path.join(out, "tokenizer.json"), encoding="utf-8"))["model"]["merges"]
    assert merges and all(isinstance(m, str) and len(m.split(" ")) == 2 for m in merges)
    texts = ["Return a new list.", "  two  spaces\nand a\n\nnewline ", "digits 12345 ünïcödé",
             "\nx", "tab\tand 中文 🙂", "a literal </s> or <s> in a document is text", ""]
    documents = _stdlib_documents()
    assert sum(len(d) for d in documents) > 100_000
    for text in texts + documents:
        ids = sp.encode_as_ids(text)
        assert tokenizer.encode(text) == ids  # no BOS, as in training
        assert tokenizer(text)["input_ids"] == ids
        assert tokenizer.decode(ids) == sp.decode(ids)
        if not text.startswith(" "):  # SentencePiece's decode drops the dummy-prefix space
            assert tokenizer.decode(ids) == text

    # One set of special ids: SentencePiece, the tokenizer files, config.json, generation_config.json.
    expected = dict(bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), pad_token_id=sp.pad_id())
    assert tokenizer.unk_token_id == sp.unk_id()
    config, generation = (json.load(open(os.path.join(out, name)))
                          for name in ("config.json", "generation_config.json"))
    for key, value in expected.items():
        assert getattr(tokenizer, key) == value, key
        assert config[key] == value and generation[key] == value, key


def test_unigram_tokenizer_is_refused_not_approximated(two_stage_run, tmp_path):
    from patch_megatron.data.sentencepiece_training import train_sentencepiece

    unigram = train_sentencepiece([json.__doc__, os.__doc__] * 3, str(tmp_path / "uni"),
                                  vocab_size=350, model_type="unigram", progress_every=0)
    code, err = run_tool("convert_to_hf", ["--load", two_stage_run["token"], "--output",
                                           str(tmp_path / "hf"), "--tokenizer-model",
                                           unigram.model_path, "--vocab-size", "350"])
    assert code == 2 and "unigram" in err and "--model-type bpe" in err
    assert not os.path.exists(tmp_path / "hf")


def test_patch_stage_checkpoint_is_refused(two_stage_run, tmp_path):
    code, err = run_tool("convert_to_hf", ["--load", two_stage_run["patch"],
                                           "--output", str(tmp_path / "hf")])
    assert code == 2
    assert "patch-stage checkpoint (patch size 4)" in err and "--allow-patch-stage" in err
    assert not os.path.exists(tmp_path / "hf")


@pytest.mark.parametrize("option, reason", [
    ("qk_layernorm", "no query/key norms"),
    ("rotary_interleaved", "not the interleaved pairs of --rotary-interleaved"),
])
def test_architectures_llama_cannot_hold_are_refused_with_the_reason(option, reason):
    from patch_megatron.conversion.errors import ConversionError
    from patch_megatron.conversion.hf_export import refuse_non_llama
    from patch_megatron.conversion.model_description import ModelDescription
    from patch_megatron.model.shape import LLAMA_SHAPE_ARCHITECTURE

    llama = ModelDescription(num_layers=2, hidden_size=32, ffn_hidden_size=64,
                             num_attention_heads=4, num_query_groups=2, vocab_size=128,
                             max_position_embeddings=16, rotary_base=10000, norm_epsilon=1e-5,
                             untie_embeddings_and_output_weights=True, patch_size=1,
                             dtype=torch.float32, **LLAMA_SHAPE_ARCHITECTURE)
    refuse_non_llama("ckpt", llama)  # a Llama passes
    other = replace(llama, **{option: True})
    with pytest.raises(ConversionError, match="is not a Llama-architecture model") as refused:
        refuse_non_llama("ckpt", other)
    assert f"{option} True (Llama: False)" in str(refused.value) and reason in str(refused.value)


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


def test_quickstart_sized_export_works_as_a_hugging_face_user_uses_it(tokenizer_model, vocab_size,
                                                                      tmp_path):
    """AutoTokenizer + AutoModelForCausalLM + generate, and pipeline(), on the quickstart's shape."""
    import subprocess
    import sys

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from repo_tools import IN_PROCESS_READING, REPO_ROOT as REPO, child_environment, load_module

    quickstart = load_module(os.path.join(REPO, "examples", "quickstart.py"))
    save = str(tmp_path / "ckpt")
    command = [sys.executable, os.path.join(REPO, "pretrain_patch_gpt.py"), *quickstart.model_flags(),
               "--mock-data", "--vocab-size", str(vocab_size), "--patch-size", "1",
               "--patch-data-fraction", "0", "--train-iters", "2", "--global-batch-size", "2",
               "--micro-batch-size", "2", "--lr", "1e-3", "--eval-iters", "0", "--cpu",
               "--save", save, *IN_PROCESS_READING]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env=child_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    out = _export(save, str(tmp_path / "hf"), "--tokenizer-model", tokenizer_model)

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == quickstart.MODEL["num_layers"]
    assert model.config.hidden_size == quickstart.MODEL["hidden_size"]
    prompt = "Return a new list"
    inputs = tokenizer(prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
    prompt_ids = inputs["input_ids"][0].tolist()
    assert generated[0, :len(prompt_ids)].tolist() == prompt_ids
    assert generated.shape[1] > len(prompt_ids)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    assert text.startswith(prompt)
    assert tokenizer.decode(tokenizer.encode(text)) == text  # the decoded text round-trips

    pipe = transformers.pipeline("text-generation", model=out, tokenizer=out)
    completion = pipe(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert completion.startswith(prompt) and len(completion) > len(prompt)
