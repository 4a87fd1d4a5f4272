"""--tokenizer-model that is not a tokenizer: one-line errors that name the file and the fix."""

import json
import os

import pytest

from patch_megatron.data.tokenizers import build_tokenizer

SP = "GPTSentencePieceTokenizer"


@pytest.mark.parametrize("content, hint", [
    (b"hello, this is a text file\n", "not a SentencePiece model file"),
    (bytes(range(256)) * 20, "not a SentencePiece model file"),
])
def test_not_a_sentencepiece_model(tmp_path, content, hint):
    path = tmp_path / "tok.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"--tokenizer-model {path}: {hint}.*needs the "
                                         rf"\.model file") as caught:
        build_tokenizer(SP, str(path))
    assert "\n" not in str(caught.value)


def test_vocab_listing_instead_of_model(sentencepiece_model, tmp_path):
    listing = sentencepiece_model[:-len(".model")] + ".vocab"
    with pytest.raises(ValueError, match=r"that is the \.vocab listing; pass the \.model"):
        build_tokenizer(SP, listing)


def test_missing_model(tmp_path):
    with pytest.raises(ValueError, match="needs --tokenizer-model pointing at a SentencePiece"):
        build_tokenizer(SP, str(tmp_path / "missing.model"))


def test_broken_huggingface_tokenizer_json(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
    with pytest.raises(ValueError, match="cannot be loaded as a HuggingFaceTokenizer"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tokenizer.json"))


def test_good_model_still_loads(sentencepiece_model):
    assert build_tokenizer(SP, sentencepiece_model).vocab_size == 1024


BPE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "megatron_lm", "gpt2_bpe")


def test_gpt2_bpe_gives_megatron_lms_ids():
    # ids.json: Megatron-LM core_v0.16.1's own GPT2Tokenizer on standard-library text
    # (tests/fixtures/megatron_lm/make_gpt2_bpe.py).
    with open(os.path.join(BPE, "ids.json"), encoding="utf-8") as f:
        expected = json.load(f)
    tokenizer = build_tokenizer("GPT2BPETokenizer", vocab_file=os.path.join(BPE, "vocab.json"),
                                merge_file=os.path.join(BPE, "merges.txt"))
    assert (tokenizer.vocab_size, tokenizer.eod) == (expected["vocab_size"], expected["eod"])
    for sample in expected["samples"]:
        assert tokenizer.tokenize(sample["text"]) == sample["ids"]
        assert tokenizer.detokenize(sample["ids"]) == sample["text"]


def test_gpt2_bpe_needs_both_files_and_an_end_of_document_token(tmp_path):
    with pytest.raises(ValueError, match="GPT2BPETokenizer needs --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=os.path.join(BPE, "vocab.json"))
    vocab = json.load(open(os.path.join(BPE, "vocab.json"), encoding="utf-8"))
    del vocab["<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="no <|endoftext|> entry"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                        merge_file=os.path.join(BPE, "merges.txt"))
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="cannot be loaded as GPT-2 BPE files"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "bad.json"),
                        merge_file=os.path.join(BPE, "merges.txt"))


@pytest.fixture(scope="module")
def tiktoken_vocabulary(tmp_path_factory):
    import inspect
    import json as json_module

    from repo_tools import write_tiktoken_vocabulary

    path = str(tmp_path_factory.mktemp("tiktoken") / "vocab.json")
    return path, write_tiktoken_vocabulary(path, inspect.getsource(json_module))


def test_tiktokenizer_encodes_as_tiktoken_does(tiktoken_vocabulary):
    import base64
    import inspect
    import textwrap

    import tiktoken
    from megatron.core.tokenizers.text.libraries.tiktoken_tokenizer import _PATTERN_TIKTOKEN_V2

    path, entries = tiktoken_vocabulary
    specials = 16
    tokenizer = build_tokenizer("TikTokenizer", path, vocab_size=entries + specials,
                                tiktoken_num_special_tokens=specials)
    assert tokenizer.vocab_size == entries + specials
    assert tokenizer.eod == 2  # megatron-core's special tokens: <unk>, <s>, </s>, ...
    # The reference: tiktoken itself on the same ranks, moved past the special ids.
    with open(path) as f:
        ranks = {base64.b64decode(e["token_bytes"]): e["rank"] + specials for e in json.load(f)}
    reference = tiktoken.Encoding(name="reference", pat_str=_PATTERN_TIKTOKEN_V2,
                                  mergeable_ranks=ranks, special_tokens={})
    text = inspect.getsource(textwrap.dedent) + " naïve café, 12 345\n"
    ids = tokenizer.tokenize(text)
    assert ids == reference.encode(text) and min(ids) >= specials
    assert len(ids) < 0.8 * len(text.encode())  # the merges are used
    # megatron-core decodes token by token, so a character split across tokens does not come
    # back (as in Megatron-LM); ASCII text does.
    ascii_text = inspect.getsource(textwrap.dedent)
    assert tokenizer.detokenize(tokenizer.tokenize(ascii_text)) == ascii_text


def test_tiktokenizer_flags_that_do_not_fit_the_file_are_named(tiktoken_vocabulary, tmp_path,
                                                                monkeypatch):
    path, entries = tiktoken_vocabulary
    with pytest.raises(ValueError, match=rf"--vocab-size 131072 leaves 130072 ids after the 1000 "
                                         rf"special ones .* holds {entries} entries: pass "
                                         rf"--vocab-size {entries + 1000}"):
        build_tokenizer("TikTokenizer", path)
    with pytest.raises(ValueError, match="needs --tokenizer-model pointing at its vocabulary"):
        build_tokenizer("TikTokenizer", str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="not a TikTokenizer vocabulary .json"):
        build_tokenizer("TikTokenizer", str(tmp_path / "bad.json"))
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tiktoken" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install tiktoken"):
        build_tokenizer("TikTokenizer", path, vocab_size=entries + 1000)
