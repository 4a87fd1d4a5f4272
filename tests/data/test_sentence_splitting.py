"""patch_megatron.data.sentence_splitting: NLTK's Punkt as --split-sentences uses it."""

import sys

import pytest

from patch_megatron.data import sentence_splitting
from patch_megatron.data.sentence_splitting import SentenceSplittingError, load_splitter

TEXT = ("  The cat sat on the mat. It was happy, e.g. very glad.\n\nDr. Smith came at 5 p.m. "
        "today!  Was it late?\nYes.\n")


def punkt_reference(punkt_data):
    from nltk.tokenize.punkt import PunktTokenizer

    return PunktTokenizer("english")  # punkt_data put its folder on nltk's path


def test_sentences_are_punkts_and_keep_newlines_keeps_the_text(punkt_data):
    punkt = punkt_reference(punkt_data)
    plain = load_splitter("english", keep_newlines=False, nltk_data=punkt_data)(TEXT)
    assert plain == punkt.tokenize(TEXT) and len(plain) >= 5
    kept = load_splitter("english", keep_newlines=True, nltk_data=punkt_data)(TEXT)
    assert "".join(kept) == TEXT  # nothing between the sentences is lost
    assert [s.strip() for s in kept] == [s.strip() for s in plain]
    assert kept[1].endswith("\n\n")  # the paragraph break stays after its sentence


def test_long_documents_are_split_in_pieces_as_megatron_lm_does(punkt_data, monkeypatch):
    monkeypatch.setattr(sentence_splitting, "PIECE_CHARACTERS", 40)
    punkt = punkt_reference(punkt_data)
    pieces = [TEXT[i:i + 40] for i in range(0, len(TEXT), 40)]
    expected = [s for piece in pieces for s in punkt.tokenize(piece)]
    assert load_splitter("english", False, punkt_data)(TEXT) == expected


def test_a_missing_model_or_nltk_names_the_fix(punkt_data, monkeypatch):
    with pytest.raises(SentenceSplittingError, match="python -m nltk.downloader punkt_tab"):
        load_splitter("klingon", False, punkt_data)
    with pytest.raises(SentenceSplittingError, match="--lang '../english'"):
        load_splitter("../english", False, punkt_data)
    monkeypatch.setitem(sys.modules, "nltk", None)  # as if it were not installed
    with pytest.raises(SentenceSplittingError, match="pip install 'nltk>=3.9'"):
        load_splitter("english", False, punkt_data)
