"""The SentencePiece tokenizer as Hugging Face tokenizer files, and its special ids.

The export writes ``tokenizer.json`` itself, with the ``tokenizers`` library,
from the SentencePiece model's own pieces, scores and settings, instead of
asking transformers to convert the model: transformers' conversion changed
between releases (4.x's slow ``LlamaTokenizer`` reproduced SentencePiece,
5.x's writes a 3-entry vocabulary for it) and its fast Llama conversion
differs from SentencePiece on leading spaces and user-defined pieces. What is
written here is the SentencePiece algorithm restated for ``tokenizers``:

- normalizer: the model's precompiled normalization rule (none for
  ``identity``), spaces as ``▁``, the dummy ``▁`` prefix when the model adds one;
- model: BPE with every merge ``(left, right)`` whose result is a piece,
  ranked by that piece's score (SentencePiece merges the highest-scoring
  pair first); byte fallback as trained. Unigram models are refused:
  ``tokenizers``' Unigram does not segment exactly as SentencePiece does;
- no pre-tokenizer: SentencePiece does not split the text before its model;
- special pieces (``<unk>``, ``<s>``, ``</s>``, ``<pad>``) at their
  SentencePiece ids and never matched in text (``split_special_tokens``):
  SentencePiece encodes a literal ``</s>`` in a document as text, and so does
  the export.

``check_exact`` encodes a probe text with both tokenizers; the export refuses
a model whose ids it would not reproduce. ``tokenizer.model`` is written too,
for tools that want SentencePiece itself.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass

from patch_megatron.conversion.errors import ConversionError

# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json")


@dataclass(frozen=True)
class SpecialTokens:
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    pieces: dict  # "bos_token" etc. -> piece text, for those that exist


@dataclass(frozen=True)
class SentencePieceModel:
    """The fields of a SentencePiece ``.model`` file that decide how it tokenizes."""
    pieces: list  # (piece, score, type), in id order
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def special_tokens(tokenizer_model: str) -> SpecialTokens:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    ids = {k: (v if v is not None and v >= 0 else None) for k, v in ids.items()}
    pieces = {f"{k}_token": sp.id_to_piece(v) for k, v in ids.items() if v is not None}
    return SpecialTokens(ids["bos"], ids["eos"], ids["pad"], ids["unk"], pieces)


def read_sentencepiece_model(path: str) -> SentencePieceModel:
    """Parse the protobuf fields we need (no protobuf dependency: the wire format is simple)."""
    with open(path, "rb") as f:
        data = f.read()
    pieces, fields = [], {}
    for number, value in _protobuf_fields(data):
        if number == 1:  # repeated SentencePiece {1: piece, 2: score, 3: type}
            piece = dict(_protobuf_fields(value))
            text = piece.get(1, b"").decode("utf-8")
            score = struct.unpack("<f", struct.pack("<I", piece.get(2, 0)))[0]
            pieces.append((text, score, piece.get(3, NORMAL)))
        elif number == 2:  # TrainerSpec
            spec = dict(_protobuf_fields(value))
            fields.update(model_type=spec.get(3, UNIGRAM), byte_fallback=bool(spec.get(35, 0)),
                          treat_whitespace_as_suffix=bool(spec.get(24, 0)))
        elif number == 3:  # NormalizerSpec
            spec = dict(_protobuf_fields(value))
            fields.update(normalizer_name=spec.get(1, b"").decode("utf-8"),
                          precompiled_charsmap=spec.get(2, b""),
                          add_dummy_prefix=bool(spec.get(3, 1)),
                          remove_extra_whitespaces=bool(spec.get(4, 1)),
                          escape_whitespaces=bool(spec.get(5, 1)))
    return SentencePieceModel(pieces=pieces, **fields)


def _protobuf_fields(data: bytes):
    """(field number, value) pairs of one protobuf message: ints for varint/fixed32, bytes else."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 5:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        elif wire == 1:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _varint(data: bytes, pos: int):
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def build_tokenizer(model: SentencePieceModel):
    """A ``tokenizers.Tokenizer`` that tokenizes as the SentencePiece model does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    if model.model_type == UNIGRAM:
        # Measured: tokenizers' Unigram picks other segmentations than SentencePiece's on
        # 9 of 95 stdlib modules (ties and near-ties of the path scores), so it is not offered.
        raise ConversionError("a unigram SentencePiece model has no exact Hugging Face "
                              "equivalent: export without --tokenizer-model and tokenize with "
                              "sentencepiece, or train the tokenizer with --model-type bpe")
    if model.model_type != BPE:
        raise ConversionError("only BPE SentencePiece models can be exported "
                              f"(this one has model type {model.model_type})")
    if model.treat_whitespace_as_suffix or not model.escape_whitespaces:
        raise ConversionError("the SentencePiece model puts whitespace at the ends of pieces or "
                              "does not escape it; its tokenization cannot be exported")
    unk_id = next((i for i, (_, _, kind) in enumerate(model.pieces) if kind == UNKNOWN), None)
    unk_piece = model.pieces[unk_id][0] if unk_id is not None else None
    vocab = {piece: i for i, (piece, _, _) in enumerate(model.pieces)}
    tokenizer = Tokenizer(models.BPE(vocab, _bpe_merges(model), unk_token=unk_piece,
                                     byte_fallback=model.byte_fallback, fuse_unk=True))
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ | $"), "")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decoding = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix:
        decoding.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decoding)
    # Multi-character user-defined pieces are matched before the model, as SentencePiece does;
    # a single character needs nothing (no merge contains it).
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False)
                          for piece, _, kind in model.pieces if kind == USER_DEFINED and len(piece) > 1])
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True)
                                  for piece, _, kind in model.pieces if kind in (UNKNOWN, CONTROL)])
    tokenizer.encode_special_tokens = True
    return tokenizer


def _bpe_merges(model: SentencePieceModel) -> list:
    """Every (left, right) pair that forms a normal piece, best merged piece first."""
    vocab = {piece: i for i, (piece, _, kind) in enumerate(model.pieces) if kind in (NORMAL, USER_DEFINED)}
    scored = []
    for piece, score, kind in model.pieces:
        if kind != NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                scored.append((-score, vocab[piece], vocab[left], vocab[right], left, right))
    scored.sort()
    return [(left, right) for *_, left, right in scored]


def check_exact(tokenizer, tokenizer_model: str, texts) -> None:
    """Refuse an export whose ids differ from SentencePiece's on any of ``texts``."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model)
    for text in texts:
        expected, got = sp.encode_as_ids(text), tokenizer.encode(text, add_special_tokens=False).ids
        if expected != got:
            where = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b),
                         min(len(expected), len(got)))
            raise ConversionError(
                f"{tokenizer_model}: the Hugging Face tokenizer built from it would not reproduce "
                f"SentencePiece's ids (they differ at token {where} of {text[:60]!r}); export "
                "without --tokenizer-model and use the SentencePiece model directly")


def probe_texts() -> list:
    """Real text with spaces, tabs, newlines, digits and non-ASCII: the stdlib's own docs."""
    import argparse
    import collections
    import json as json_module
    import re
    import unicodedata

    texts = [m.__doc__ for m in (argparse, collections, json_module, re, unicodedata) if m.__doc__]
    texts += ["", " ", "  two  spaces\nand a\n\nnewline ", "\nstarts with a newline",
              "tab\there, ünïcödé ✓ 中文 🙂, digits 12345", "literal <s> and </s> and <unk>"]
    return texts


@dataclass(frozen=True)
class ExportedTokenizer:
    """A checked tokenizer ready to write: built before any weights load, so a refusal is quick."""
    tokenizer_model: str
    tokenizer: object  # tokenizers.Tokenizer
    special: SpecialTokens


def prepare_tokenizer(tokenizer_model: str) -> ExportedTokenizer:
    """Read, convert and check ``tokenizer_model``; raise ConversionError if it cannot be exact."""
    try:
        model = read_sentencepiece_model(tokenizer_model)
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as error:
        raise ConversionError(f"--tokenizer-model {tokenizer_model} is not a readable SentencePiece "
                              f"model ({error}); give the .model file train_tokenizer.py wrote "
                              "(only SentencePiece tokenizers are exported: for another one, "
                              "leave --tokenizer-model out and export the weights alone)") from None
    try:
        import tokenizers  # noqa: F401  (transformers' own dependency)
    except ImportError:
        raise ConversionError("exporting the tokenizer needs the tokenizers package: "
                              "pip install 'transformers>=4.43'") from None
    tokenizer = build_tokenizer(model)
    check_exact(tokenizer, tokenizer_model, probe_texts())
    return ExportedTokenizer(tokenizer_model, tokenizer, special_tokens(tokenizer_model))


def _save_portable(tokenizer, path: str) -> None:
    """Save with BPE merges as ``"left right"`` strings, the form every ``tokenizers`` reads.

    tokenizers 0.20+ writes merges as ``[left, right]`` pairs, which 0.19 (transformers
    4.43's) cannot load; the string form is unambiguous because no piece holds a space
    (SentencePiece writes spaces as ``▁``).
    """
    state = json.loads(tokenizer.to_str())
    merges = state["model"]["merges"]
    if merges and not isinstance(merges[0], str):
        if any(" " in part for pair in merges for part in pair):
            raise ConversionError("a merge holds a literal space; cannot write tokenizer.json")
        state["model"]["merges"] = [" ".join(pair) for pair in merges]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(state, f, ensure_ascii=False, indent=1)
        f.write("\n")


def write_tokenizer(prepared: ExportedTokenizer, directory: str,
                    model_max_length: int | None = None) -> SpecialTokens:
    """Write tokenizer.json, tokenizer.model, tokenizer_config.json, special_tokens_map.json."""
    _save_portable(prepared.tokenizer, os.path.join(directory, "tokenizer.json"))
    shutil.copyfile(prepared.tokenizer_model, os.path.join(directory, "tokenizer.model"))
    pieces = prepared.special.pieces
    config = {
        # The generic fast class loads tokenizer.json as written; a Llama class would
        # rebuild parts of it from its own defaults in some transformers releases.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **pieces,
        "add_bos_token": False,  # megatron's SentencePiece tokenizers add none in training
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # honoured by fast tokenizers from transformers 4.43
        "model_input_names": ["input_ids", "attention_mask"],  # a Llama takes no token_type_ids
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", pieces)):
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
    return prepared.special
