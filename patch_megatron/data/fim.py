"""Fill-in-the-middle samples (Megatron-LM's ``--fim-data``), as Bavarian et al. 2022 define them.

A sample window is cut into segments at each ``--fim-eod-token``; with
probability ``--fim-rate`` a segment's text is cut at two character positions
drawn uniformly into prefix, middle and suffix, each re-encoded, and the
segment becomes

* PSM: ``<prefix> prefix <suffix> suffix <middle> middle``, or, with
  probability ``--fim-spm-rate``,
* SPM: ``<prefix> <suffix> suffix <middle> prefix middle``.

With ``--fim-split-sample TOKEN`` a segment holding that token is, with
probability ``--fim-rate``, cut at it into fragments, each rearranged with
probability ``--fim-fragment-rate`` (a fragment whose text starts with
``--fim-no-prefix`` is left alone). The window is then cut back, or padded
with ``--fim-pad-token``, to its length. These are the rules of Megatron-LM's
GPTFIMDataset.

Two differences, on purpose. Every EOD token stays (Megatron-LM's drops the
one that ends an empty segment, as in two EODs in a row). And Megatron-LM
draws from one generator in the order samples are read, so what a sample
becomes depends on the reader processes and on where a run resumed. Here
each sample's draws come from its own generator, seeded by the run's seed,
the dataset and the sample's index: the same sample is always rearranged the
same way, so a resumed run reads what the uninterrupted one would have read.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy


@dataclass(frozen=True)
class FIMConfig:
    """The ``--fim-*`` flags, with the tokens as ids of the run's tokenizer."""

    rate: float
    spm_rate: float
    prefix_id: int
    middle_id: int
    suffix_id: int
    pad_id: int
    eod_id: int
    split_sample_id: int | None = None
    fragment_rate: float | None = None
    no_prefix: str | None = None


def token_id(tokenizer, flag: str, token: str) -> int:
    """The id of ``token`` (a flag's value) in ``tokenizer``'s vocabulary.

    As with Megatron-LM's GPT-2, SentencePiece and Hugging Face tokenizers, a token the
    vocabulary lacks becomes the tokenizer's unknown token (GPT-2 BPE's is ``<|endoftext|>``),
    here with a warning; a tokenizer without an unknown token is refused.
    """
    vocab = tokenizer.vocab  # megatron-core's: a list indexed by id; GPT-2 BPE's: a dict
    if isinstance(vocab, dict):
        found = vocab.get(token)
    else:
        found = vocab.index(token) if token in vocab else None
    if found is not None:
        return int(found)
    try:
        unknown = tokenizer.unk
    except (AttributeError, NotImplementedError):
        unknown = None
    if unknown is None:
        raise ValueError(f"{flag} {token!r} is not in the tokenizer's vocabulary, and the "
                         "tokenizer has no unknown token to stand for it: name a token it holds")
    warnings.warn(f"{flag} {token!r} is not in the tokenizer's vocabulary: as in Megatron-LM it "
                  f"becomes the unknown token (id {unknown}); add the FIM tokens to the "
                  "tokenizer to train distinct sentinels")  # (its TikTokenizer fails instead)
    return int(unknown)


def fim_config(args, tokenizer) -> FIMConfig | None:
    """The run's FIM configuration (None without ``--fim-data``). Raises ValueError."""
    if not args.fim_data:
        return None
    split = None
    if args.fim_split_sample is not None:
        split = token_id(tokenizer, "--fim-split-sample", args.fim_split_sample)
    return FIMConfig(
        rate=args.fim_rate, spm_rate=args.fim_spm_rate,
        prefix_id=token_id(tokenizer, "--fim-prefix-token", args.fim_prefix_token),
        middle_id=token_id(tokenizer, "--fim-middle-token", args.fim_middle_token),
        suffix_id=token_id(tokenizer, "--fim-suffix-token", args.fim_suffix_token),
        pad_id=token_id(tokenizer, "--fim-pad-token", args.fim_pad_token),
        eod_id=token_id(tokenizer, "--fim-eod-token", args.fim_eod_token),
        split_sample_id=split, fragment_rate=args.fim_fragment_rate,
        no_prefix=args.fim_no_prefix)


def sample_generator(seed: int, dataset_hash: str, index: int) -> numpy.random.Generator:
    """The draws of sample ``index`` of the dataset whose unique description hashes to
    ``dataset_hash`` (megatron-core's ``unique_description_hash``)."""
    return numpy.random.default_rng([seed, int(dataset_hash[:8], 16), index])


def rearrange(window: numpy.ndarray, config: FIMConfig, tokenizer,
              rng: numpy.random.Generator) -> numpy.ndarray:
    """``window``'s FIM form, of the same length and dtype."""
    pieces, start = [], 0
    for end in numpy.flatnonzero(window == config.eod_id):
        if end > start:  # an empty segment stays empty
            pieces.append(_segment(window[start:end], config, tokenizer, rng))
        pieces.append([config.eod_id])
        start = end + 1
    pieces.append(_segment(window[start:], config, tokenizer, rng))  # after the last EOD
    out = numpy.concatenate([numpy.asarray(p, dtype=numpy.int64) for p in pieces])
    if len(out) >= len(window):
        return out[:len(window)].astype(window.dtype)
    padding = numpy.full(len(window) - len(out), config.pad_id, dtype=numpy.int64)
    return numpy.concatenate([out, padding]).astype(window.dtype)


def _segment(ids: numpy.ndarray, config: FIMConfig, tokenizer, rng) -> numpy.ndarray:
    if config.split_sample_id is None:
        return _maybe_rearrange(ids, config.rate, config, tokenizer, rng)
    cuts = numpy.flatnonzero(ids == config.split_sample_id)
    if len(cuts) == 0:
        return _maybe_rearrange(ids, config.rate, config, tokenizer, rng)
    if not rng.random() < config.rate:
        return ids
    pieces, start = [], 0
    for end in cuts:
        if end > start:
            pieces.append(_maybe_rearrange(ids[start:end], config.fragment_rate, config,
                                           tokenizer, rng))
            pieces.append([config.split_sample_id])
        start = end + 1
    pieces.append(_maybe_rearrange(ids[start:], config.fragment_rate, config, tokenizer, rng))
    return numpy.concatenate([numpy.asarray(p, dtype=numpy.int64) for p in pieces])


def _maybe_rearrange(ids, rate: float, config: FIMConfig, tokenizer, rng) -> numpy.ndarray:
    if not rng.random() < rate:
        return numpy.asarray(ids, dtype=numpy.int64)
    text = tokenizer.detokenize([int(i) for i in ids])
    if config.no_prefix is not None and text.startswith(config.no_prefix):
        return numpy.asarray(ids, dtype=numpy.int64)
    first, second = sorted(int(b) for b in rng.integers(0, len(text) + 1, size=2))

    def encode(part: str) -> list[int]:
        return list(tokenizer.tokenize(part)) if part else []

    prefix, middle, suffix = (encode(text[:first]), encode(text[first:second]),
                              encode(text[second:]))
    if rng.random() < config.spm_rate:
        order = [config.prefix_id, config.suffix_id, *suffix, config.middle_id, *prefix, *middle]
    else:
        order = [config.prefix_id, *prefix, config.suffix_id, *suffix, config.middle_id, *middle]
    return numpy.asarray(order, dtype=numpy.int64)
