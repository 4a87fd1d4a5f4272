"""The SentencePiece tokenizer as Hugging Face tokenizer files, and its special ids.

Written by transformers' own ``LlamaTokenizer.save_pretrained`` (``tokenizer.model``,
``tokenizer_config.json``, ``special_tokens_map.json``), configured to tokenize
as training did: the SentencePiece model as it is (``legacy=True``: no extra
handling of the dummy prefix), no BOS or EOS added (megatron's
GPTSentencePieceTokenizer adds none; documents end in EOD = EOS).

No ``tokenizer.json`` is written on purpose: transformers' conversion of this
model to a fast tokenizer differs from SentencePiece on leading spaces and on
the newline piece, while the slow tokenizer reproduces the training ids
exactly. ``AutoTokenizer.from_pretrained(dir, use_fast=False)`` gives those ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from patch_megatron.conversion.errors import ConversionError


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    pieces: dict  # "bos_token" etc. -> piece text, for those that exist


def special_tokens(tokenizer_model: str) -> SpecialTokens:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    ids = {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}
    pieces = {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items() if v is not None}
    return SpecialTokens(ids["bos"], ids["eos"], ids["pad"], ids["unk"], pieces)


def export_tokenizer(tokenizer_model: str, directory: str) -> SpecialTokens:
    """Write the Hugging Face tokenizer files for ``tokenizer_model`` into ``directory``."""
    try:
        from transformers import LlamaTokenizer
    except ImportError:
        raise ConversionError("exporting the tokenizer needs transformers: "
                              "pip install 'transformers>=4.40' sentencepiece") from None
    tokens = special_tokens(tokenizer_model)
    tokenizer = LlamaTokenizer(
        vocab_file=tokenizer_model, legacy=True, add_bos_token=False, add_eos_token=False,
        clean_up_tokenization_spaces=False, **tokens.pieces)
    tokenizer.save_pretrained(directory)
    return tokens
