"""Build the tokenizer named by Megatron-LM's ``--tokenizer-type/--tokenizer-model`` flags.

Training, export and preprocessing all go through :func:`build_tokenizer`, so the
vocabulary size and the end-of-document id are the same everywhere. The objects
are megatron-core's own tokenizers (``megatron.core.tokenizers``), built the way
Megatron-LM's ``build_tokenizer`` builds them, so ids match Megatron-LM's tools:

* ``GPTSentencePieceTokenizer`` (also ``SentencePieceTokenizer``, ``Llama2Tokenizer``,
  which megatron-core treats the same way): the SentencePiece model as it is,
  ``tokenize(text) == sp.encode_as_ids(text)``, no BOS added, ``eod`` = the model's EOS.
* ``HuggingFaceTokenizer``: a local ``tokenizer.json`` (or a directory holding one)
  through ``transformers.AutoTokenizer``; ``eod`` = its EOS token.
* ``NullTokenizer``: text is space-separated integer ids; needs ``vocab_size``;
  ``eod`` = ``vocab_size`` and the vocabulary holds ``vocab_size + 1`` ids.
* ``TikTokenizer``: a tiktoken vocabulary .json as megatron-core reads it (ids
  shifted by ``--tiktoken-num-special-tokens``, its ``</s>`` the EOD), cut to
  ``--vocab-size`` (2^17 when not given); needs the ``tiktoken`` package.
* ``GPT2BPETokenizer``: GPT-2's byte-level BPE from ``--vocab-file`` (vocab.json)
  and ``--merge-file`` (merges.txt); ``eod`` = ``<|endoftext|>``. megatron-core's
  builder for this type asks the Hugging Face hub for gpt2's configuration
  first, so this one is built here, on the ``tokenizers`` library's byte-level
  BPE, which encodes as Megatron-LM's own GPT2Tokenizer does (tested against
  its ids).
"""

import argparse
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Optional

SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")
SUPPORTED_TYPES = SENTENCEPIECE_TYPES + ("HuggingFaceTokenizer", "NullTokenizer",
                                         "GPT2BPETokenizer", "TikTokenizer")
TIKTOKEN_VOCAB_SIZE = 2 ** 17  # megatron-core's TikTokenizer size when --vocab-size is not given


@dataclass(frozen=True)
class TokenizerInfo:
    """The two numbers the rest of the project needs from a tokenizer."""

    vocab_size: int
    eod_id: int


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add Megatron-LM's tokenizer flags (the subset this project supports)."""
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, required=True, choices=SUPPORTED_TYPES,
                       help="Megatron-LM tokenizer type name.")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="SentencePiece .model file, or tokenizer.json / its directory "
                            "for HuggingFaceTokenizer.")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer: ids before the EOD id; TikTokenizer: its size "
                            "(default 2^17).")
    add_bpe_file_args(group)
    add_tiktoken_args(group)
    return parser


def add_bpe_file_args(group) -> None:
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: its vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: its merges.txt")


def add_tiktoken_args(group) -> None:
    group.add_argument("--tiktoken-pattern", default=None, choices=["v1", "v2"],
                       help="TikTokenizer: the pre-tokenisation regex (megatron-core's v2 when "
                            "not given)")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: ids before the vocabulary's first entry")


class GPT2BPETokenizer:
    """GPT-2's byte-level BPE with megatron-core's tokenizer interface."""

    def __init__(self, vocab_file: str, merge_file: str):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        # GPT-2's pre-tokenisation (its regex over bytes), no prefix space, no special tokens:
        # "<|endoftext|>" inside a text is encoded as text, as Megatron-LM's tokenizer does.
        self._tokenizer = Tokenizer(models.BPE.from_file(vocab_file, merge_file))
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        vocab = self._tokenizer.get_vocab()
        if "<|endoftext|>" not in vocab:
            raise ValueError(f"{vocab_file} has no <|endoftext|> entry, GPT2BPETokenizer's "
                             "end-of-document token: give GPT-2's vocab.json (or one trained "
                             "with that special token)")
        self.eod = vocab["<|endoftext|>"]
        self.vocab_size = len(vocab)

    @property
    def vocab(self) -> dict:
        return self._tokenizer.get_vocab()

    @property
    def unk(self) -> int:
        return self.eod  # GPT-2's unknown token is <|endoftext|>, as in Megatron-LM's

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, tiktoken_pattern: Optional[str] = None,
                    tiktoken_num_special_tokens: int = 1000) -> Any:
    """Return a megatron-core tokenizer (``.tokenize``, ``.detokenize``, ``.vocab_size``, ``.eod``).

    Raises ValueError with the fix when the flags do not describe a usable tokenizer.
    """
    if tokenizer_type not in SUPPORTED_TYPES:
        raise ValueError(f"--tokenizer-type {tokenizer_type!r} is not supported; "
                         f"use one of {', '.join(SUPPORTED_TYPES)}.")
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None or vocab_size <= 0:
            raise ValueError("NullTokenizer needs --vocab-size (a positive number of ids).")
    elif tokenizer_type == "HuggingFaceTokenizer":
        tokenizer_model = _huggingface_directory(tokenizer_model)
    elif tokenizer_type == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not path or not os.path.isfile(path):
                raise ValueError(f"GPT2BPETokenizer needs {flag} (GPT-2's vocab.json and "
                                 f"merges.txt); got {path!r}")
        try:
            return GPT2BPETokenizer(vocab_file, merge_file)
        except Exception as error:  # the tokenizers library raises its own types for bad files
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(f"--vocab-file {vocab_file!r} / --merge-file {merge_file!r} cannot "
                             f"be loaded as GPT-2 BPE files ({first_line})") from None
    elif tokenizer_type == "TikTokenizer":
        _check_tiktoken_file(tokenizer_model, vocab_size, tiktoken_num_special_tokens)
    else:
        if not tokenizer_model or not os.path.isfile(tokenizer_model):
            raise ValueError(f"{tokenizer_type} needs --tokenizer-model pointing at a SentencePiece "
                             f".model file; got {tokenizer_model!r}. Train one with "
                             f"tools/train_tokenizer.py.")
        _check_sentencepiece_model(tokenizer_type, tokenizer_model)
    # megatron-core's builder reads these attributes; the defaults are Megatron-LM's.
    megatron_args = argparse.Namespace(
        tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, vocab_size=vocab_size,
        vocab_file=None, merge_file=None, tokenizer_metadata=None,
        tokenizer_special_tokens=None, tokenizer_sentencepiece_legacy=False,
        tokenizer_hf_use_fast=False, tokenizer_hf_include_special_tokens=False,
        trust_remote_code=False, tiktoken_pattern=tiktoken_pattern,
        tiktoken_num_special_tokens=tiktoken_num_special_tokens,
    )
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer as _build

    try:
        return _build(megatron_args)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AssertionError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--tokenizer-model {tokenizer_model!r} cannot be loaded as a "
                         f"{tokenizer_type} ({first_line}); pass a tokenizer file (or folder) of "
                         f"that type.") from None


def tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """Vocabulary size and EOD id of a tokenizer from :func:`build_tokenizer`."""
    return TokenizerInfo(vocab_size=int(tokenizer.vocab_size), eod_id=int(tokenizer.eod))


def build_tokenizer_from_args(args: argparse.Namespace) -> Any:
    """:func:`build_tokenizer` from parsed ``add_tokenizer_args`` flags."""
    return build_tokenizer(args.tokenizer_type, args.tokenizer_model,
                           getattr(args, "vocab_size", None), getattr(args, "vocab_file", None),
                           getattr(args, "merge_file", None),
                           getattr(args, "tiktoken_pattern", None),
                           getattr(args, "tiktoken_num_special_tokens", 1000))


def _check_tiktoken_file(path: Optional[str], vocab_size: Optional[int],
                         num_special_tokens: int) -> None:
    """What megatron-core's TikTokenizer asserts, as errors that name the flag to change."""
    if not path or not os.path.isfile(path) or not path.endswith(".json"):
        raise ValueError("TikTokenizer needs --tokenizer-model pointing at its vocabulary .json "
                         "(a list of {rank, token_bytes, token_str} entries, as megatron-core "
                         f"reads it); got {path!r}")
    if importlib.util.find_spec("tiktoken") is None:
        raise ValueError("TikTokenizer needs the 'tiktoken' package: pip install tiktoken")
    import json

    try:
        with open(path) as f:
            entries = len(json.load(f))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"--tokenizer-model {path}: not a TikTokenizer vocabulary .json "
                         f"({error})") from None
    size = TIKTOKEN_VOCAB_SIZE if vocab_size is None else vocab_size
    if not 0 < num_special_tokens < size or size - num_special_tokens > entries:
        raise ValueError(
            f"TikTokenizer: --vocab-size {size} leaves {size - num_special_tokens} ids after the "
            f"{num_special_tokens} special ones (--tiktoken-num-special-tokens), and {path} "
            f"holds {entries} entries: pass --vocab-size {entries + num_special_tokens} (or "
            "fewer) to use them all")


def _check_sentencepiece_model(tokenizer_type: str, path: str) -> None:
    """A file SentencePiece can parse; its C++ error alone does not say what to do."""
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as error:
        hint = (" (that is the .vocab listing; pass the .model next to it)"
                if path.endswith(".vocab") else "")
        first_line = (str(error).strip().splitlines() or ["unreadable"])[0]
        raise ValueError(f"--tokenizer-model {path}: not a SentencePiece model file{hint} "
                         f"({first_line}). {tokenizer_type} needs the .model file that "
                         f"tools/train_tokenizer.py (or SentencePiece) writes.") from None


def _huggingface_directory(tokenizer_model: Optional[str]) -> str:
    if not tokenizer_model or not os.path.exists(tokenizer_model):
        raise ValueError("HuggingFaceTokenizer needs --tokenizer-model pointing at a local "
                         f"tokenizer.json or the directory holding it; got {tokenizer_model!r}.")
    try:
        import transformers  # noqa: F401  (megatron-core's HF wrapper needs it)
    except ImportError as err:
        raise ValueError("HuggingFaceTokenizer needs the 'transformers' package: "
                         "pip install 'transformers>=4.40'.") from err
    # AutoTokenizer loads directories; a bare tokenizer.json is read from its folder.
    return os.path.dirname(os.path.abspath(tokenizer_model)) if os.path.isfile(tokenizer_model) \
        else tokenizer_model
