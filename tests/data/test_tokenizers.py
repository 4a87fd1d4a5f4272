"""--tokenizer-model that is not a tokenizer: one-line errors that name the file and the fix."""

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
