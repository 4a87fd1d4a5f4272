"""--split-sentences: NLTK's Punkt sentence splitter, as Megatron-LM's preprocess_data.py uses it.

Each document is cut into sentences by the Punkt model of ``--lang`` (NLTK's
pickle-free ``tokenizers/punkt_tab/LANG/`` data, found on NLTK's data path or
under ``NLTK_DATA``), in pieces of at most a million characters as Megatron-LM
cuts them; each sentence is then tokenized on its own and written as one
sequence of the document. Punkt drops the whitespace between sentences;
``--keep-newlines`` keeps it, at the end of the sentence it follows, so the
sentences together are the document's text.

NLTK is an optional dependency (``pip install nltk``), and its Punkt models are
data (``python -m nltk.downloader punkt_tab``).

Measured against Megatron-LM core_v0.16.1's own tool (NLTK 3.10.4, 19 documents
of the language reference): without ``--keep-newlines`` the files are
byte-identical. With it they agree on 10 of the 19: Megatron-LM's regular
expression for this keeps the whitespace after most sentences but drops it
after a sentence that ends in a bracket or quote, and at the end of a document.
Here no whitespace is dropped.
"""

from __future__ import annotations

import re
from typing import Callable, List

# Megatron-LM splits a document in pieces of this many characters before Punkt sees it.
PIECE_CHARACTERS = 1_000_000

Splitter = Callable[[str], List[str]]


class SentenceSplittingError(ValueError):
    """NLTK or its Punkt model is missing, or --lang names none."""


def load_splitter(lang: str, keep_newlines: bool, nltk_data: str | None = None) -> Splitter:
    """The function that cuts a document's text into its sentences; refuses with the fix.

    ``nltk_data``: the launching process's ``NLTK_DATA``, searched first (worker processes
    come from a fork server whose environment may predate it)."""
    try:
        import nltk
        from nltk.tokenize.punkt import PunktTokenizer
    except ImportError:
        raise SentenceSplittingError(
            "--split-sentences needs NLTK 3.9 or newer (its pickle-free Punkt models): "
            "pip install 'nltk>=3.9', then python -m nltk.downloader punkt_tab") from None
    # A model is a folder named after its language; a path would reach another folder.
    if not re.fullmatch(r"[A-Za-z0-9_-]+", lang):
        raise SentenceSplittingError(f"--lang {lang!r} is not a Punkt model's name (letters, "
                                     "digits, - and _, such as english or german)")
    if nltk_data and nltk_data not in nltk.data.path:
        nltk.data.path.insert(0, nltk_data)
    try:
        punkt = PunktTokenizer(lang)
    except LookupError:
        raise SentenceSplittingError(
            f"--split-sentences --lang {lang}: NLTK's Punkt model for {lang!r} is not "
            f"installed (NLTK {nltk.__version__} looks for tokenizers/punkt_tab/{lang}/ in "
            f"{', '.join(nltk.data.path[:3])}, ...): run python -m nltk.downloader punkt_tab, "
            "or set NLTK_DATA to a folder that holds it") from None
    except ValueError as error:
        raise SentenceSplittingError(f"--lang {lang!r}: {error}") from None

    def split(text: str) -> List[str]:
        sentences = []
        for start in range(0, len(text), PIECE_CHARACTERS):
            piece = text[start:start + PIECE_CHARACTERS]
            if keep_newlines:
                sentences += _with_whitespace(piece, [s for s, _ in punkt.span_tokenize(piece)])
            else:
                sentences += punkt.tokenize(piece)
        return sentences

    return split


def _with_whitespace(text: str, starts: List[int]) -> List[str]:
    """``text`` cut just before each sentence's first character: what separates two sentences
    stays with the first, and the text before the first sentence with it."""
    if not starts:
        return [text] if text else []
    cuts = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]
