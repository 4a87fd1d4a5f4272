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
"""

import argparse
import os
from dataclasses import dataclass
from typing import Any, Optional

SENTENCEPIECE_TYPES = ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer")
SUPPORTED_TYPES = SENTENCEPIECE_TYPES + ("HuggingFaceTokenizer", "NullTokenizer")


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
                       help="NullTokenizer only: number of ids before the EOD id.")
    return parser


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_size: Optional[int] = None) -> Any:
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
        trust_remote_code=False, tiktoken_pattern=None, tiktoken_num_special_tokens=1000,
    )
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer as _build

    try:
        return _build(megatron_args)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as error:
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
                           getattr(args, "vocab_size", None))


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
