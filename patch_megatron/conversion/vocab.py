"""The padded vocabulary: the tokenizer's size, trimming for export, re-padding for a new TP.

Megatron pads the embedding and output layer to a multiple of
``--make-vocab-size-divisible-by`` x TP rows. The rows past the tokenizer's
size never hold an input token and are never a target; the logits of real
tokens do not depend on them, so export trims them.
"""

from __future__ import annotations

import os

import torch

from patch_megatron.conversion.errors import ConversionError

VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def tokenizer_vocab_size(tokenizer_model: str) -> int:
    """Pieces of a SentencePiece model file."""
    import sentencepiece

    if not os.path.isfile(tokenizer_model):
        raise ConversionError(f"--tokenizer-model {tokenizer_model} does not exist: give the "
                              "SentencePiece .model file the model was trained with")
    return sentencepiece.SentencePieceProcessor(model_file=tokenizer_model).get_piece_size()


def vocab_size_from_args(args: dict) -> int | None:
    """The unpadded vocabulary a training run used, from its recorded flags, when knowable."""
    tokenizer_type = args.get("tokenizer_type")
    if args.get("mock_data") and args.get("vocab_size"):
        return int(args["vocab_size"])
    if tokenizer_type == "NullTokenizer" and args.get("vocab_size"):
        return int(args["vocab_size"]) + 1  # NullTokenizer's EOD id is vocab_size
    if tokenizer_type == "TikTokenizer":  # megatron-core's size: --vocab-size, else its default
        from patch_megatron.data.tokenizers import TIKTOKEN_VOCAB_SIZE

        return int(args.get("vocab_size") or TIKTOKEN_VOCAB_SIZE)
    model = args.get("tokenizer_model")
    if model and os.path.isfile(model) and tokenizer_type != "HuggingFaceTokenizer":
        return tokenizer_vocab_size(model)
    if args.get("vocab_size"):
        return int(args["vocab_size"])
    return None


def resolve_vocab_size(padded: int, explicit: int | None, tokenizer_model: str | None,
                       args: dict) -> int:
    """The tokenizer's vocabulary: --vocab-size, else --tokenizer-model, else the run's flags."""
    if explicit is not None:
        size, source = explicit, "--vocab-size"
    elif tokenizer_model is not None:
        size, source = tokenizer_vocab_size(tokenizer_model), f"tokenizer {tokenizer_model}"
    else:
        size, source = vocab_size_from_args(args), "the checkpoint's recorded flags"
        if size is None:
            raise ConversionError(
                "cannot tell the tokenizer's vocabulary size (the checkpoint's tokenizer file is "
                "not reachable from here): pass --tokenizer-model PATH or --vocab-size N")
    if not 1 <= size <= padded:
        raise ConversionError(f"vocabulary size {size} (from {source}) does not fit the "
                              f"checkpoint's {padded} embedding rows: wrong tokenizer?")
    return size


def trim(weights: dict, vocab_size: int) -> dict:
    """The weights with only the tokenizer's rows in the embedding and output layer."""
    return {name: (t[:vocab_size] if name in VOCAB_ROWS else t) for name, t in weights.items()}


def repad(weights: dict, vocab_size: int, padded: int) -> dict:
    """Resize the vocabulary rows to ``padded``, keeping the first ``vocab_size`` unchanged.

    New embedding rows are zeros (no token maps to them). New output rows take
    the mean of the existing padding rows when there are any, as training has
    pushed those logits down; a zero row would give the padding entries
    probability mass the model never assigned them.
    """
    out = {}
    for name, tensor in weights.items():
        if name not in VOCAB_ROWS or tensor.shape[0] == padded:
            out[name] = tensor
            continue
        if tensor.shape[0] > padded:
            out[name] = tensor[:padded].clone()
            continue
        extra = padded - tensor.shape[0]
        filler = torch.zeros(extra, tensor.shape[1], dtype=tensor.dtype)
        padding_rows = tensor[vocab_size:]
        if name == "output_layer.weight" and padding_rows.shape[0] > 0:
            filler[:] = padding_rows.float().mean(0).to(tensor.dtype)
        out[name] = torch.cat([tensor, filler])
    return out


__all__ = ["resolve_vocab_size", "trim", "repad",
           "vocab_size_from_args", "tokenizer_vocab_size"]
