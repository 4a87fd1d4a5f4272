"""Turn batches of raw records into token arrays (runs inside worker processes).

Tokenization follows Megatron-LM's ``tools/preprocess_data.py``: every
``--json-keys`` field is one document; a string is tokenized whole, a list of
strings is tokenized sentence by sentence (empty sentences dropped, one index
sequence per sentence); ``--append-eod`` adds the tokenizer's EOD to the last
sequence. With ``--split-sentences`` a string is first cut into sentences
(``sentence_splitting``) and then tokenized as such a list. Unlike Megatron-LM, a document with no tokens is an error (or, with
``--skip-bad-lines``, skipped) instead of being written as an empty document.
"""

import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy

from patch_megatron.data.input_documents import BadRecordError, RawRecord, parse_record
from patch_megatron.data.sentence_splitting import load_splitter
from patch_megatron.data.tokenizers import build_tokenizer


@dataclass(frozen=True)
class EncoderSettings:
    tokenizer_type: str
    tokenizer_model: Optional[str]
    vocab_size: Optional[int]
    json_keys: Tuple[str, ...]
    append_eod: bool
    token_dtype: type
    vocab_file: Optional[str] = None  # GPT2BPETokenizer
    merge_file: Optional[str] = None
    split_sentences: bool = False  # NLTK's Punkt, for --lang; --keep-newlines keeps whitespace
    lang: str = "english"
    keep_newlines: bool = False
    nltk_data: Optional[str] = None  # the launching process's NLTK_DATA
    tiktoken_pattern: Optional[str] = None  # TikTokenizer
    tiktoken_num_special_tokens: int = 1000


@dataclass(frozen=True)
class EncodeTask:
    fmt: str
    records: List[RawRecord]


@dataclass
class EncodedBatch:
    """Documents of one batch that encoded fine, plus the ones that did not."""

    # key -> all token ids of the good documents, back to back
    tokens: Dict[str, numpy.ndarray] = field(default_factory=dict)
    # key -> per good document, the lengths of its sequences
    sequence_lengths: Dict[str, List[List[int]]] = field(default_factory=dict)
    documents: int = 0
    payload_bytes: int = 0
    errors: List[BadRecordError] = field(default_factory=list)


class DocumentEncoder:
    """Holds one tokenizer per process; ``encode`` is what the pool maps."""

    def __init__(self, settings: EncoderSettings) -> None:
        self.settings = settings
        self.tokenizer = build_tokenizer(settings.tokenizer_type, settings.tokenizer_model,
                                         settings.vocab_size, settings.vocab_file,
                                         settings.merge_file, settings.tiktoken_pattern,
                                         settings.tiktoken_num_special_tokens)
        self.eod = self.tokenizer.eod
        self._batch_encode = _sentencepiece_batch_encoder(self.tokenizer)
        self._split = None
        if settings.split_sentences:
            self._split = load_splitter(settings.lang, settings.keep_newlines,
                                        settings.nltk_data)

    def encode(self, task: EncodeTask) -> EncodedBatch:
        keys = self.settings.json_keys
        out = EncodedBatch()
        parsed: List[Dict[str, object]] = []
        for record in task.records:
            out.payload_bytes += len(record.payload)
            try:
                parsed.append(parse_record(record, task.fmt, keys))
            except BadRecordError as err:
                out.errors.append(err)
                parsed.append(None)
        per_key = {key: self._tokenize_field([f[key] if f else None for f in parsed])
                   for key in keys}
        good = []
        for index, record in enumerate(task.records):
            if parsed[index] is None:
                continue
            failed = [(key, per_key[key][index]) for key in keys
                      if isinstance(per_key[key][index], Exception)]
            if failed:
                key, err = failed[0]
                out.errors.append(BadRecordError(
                    record.path, record.line, f"key {key!r} cannot be tokenized: {err}",
                    "tokenizer_error"))
                continue
            empty = [key for key in keys if not per_key[key][index][1]]
            if empty:
                out.errors.append(BadRecordError(
                    record.path, record.line, f"empty document: key {empty[0]!r} has no tokens",
                    "empty_document"))
                continue
            good.append(index)
        out.documents = len(good)
        for key in keys:
            ids = [per_key[key][i][0] for i in good]
            out.tokens[key] = numpy.fromiter(itertools.chain.from_iterable(ids),
                                             dtype=self.settings.token_dtype,
                                             count=sum(map(len, ids)))
            out.sequence_lengths[key] = [per_key[key][i][1] for i in good]
        out.errors.sort(key=lambda e: e.line)
        return out

    def _tokenize_field(self, values: Sequence[object]) -> List[object]:
        """Per value: (document ids, sequence lengths) by Megatron-LM's rules, or the
        exception the tokenizer raised on it (e.g. NullTokenizer given words)."""
        texts, owners = [], []
        for index, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, str):
                value = self._split(value) if self._split else [value]
            for sentence in value:
                texts.append(sentence)
                owners.append(index)
        encoded = self._batch_encode(texts)
        result: List[object] = [([], []) for _ in values]
        for owner, ids in zip(owners, encoded):
            if isinstance(ids, Exception) or isinstance(result[owner], Exception):
                result[owner] = result[owner] if isinstance(result[owner], Exception) else ids
                continue
            if len(ids) > 0:
                result[owner][0].extend(ids)
                result[owner][1].append(len(ids))
        if self.settings.append_eod:
            for entry in result:
                if isinstance(entry, Exception):
                    continue
                doc_ids, lengths = entry
                if doc_ids:
                    doc_ids.append(self.eod)
                    lengths[-1] += 1
        return result


def _sentencepiece_batch_encoder(tokenizer):
    """A list encoder equal to ``[tokenizer.tokenize(t) for t in texts]``, batched when possible.

    megatron-core's SentencePiece tokenizer with ``legacy=False`` and default
    whitespace handling is exactly ``encode_as_ids``; for it one batched call
    into SentencePiece (one thread, so ``--workers`` stays the only parallelism)
    avoids a Python call per document. Any other tokenizer goes text by text.
    """
    library = getattr(tokenizer, "_tokenizer", None)
    processor = getattr(library, "tokenizer", None)
    plain_sentencepiece = (
        type(library).__name__ == "SentencePieceTokenizer"
        and not getattr(library, "legacy", True)
        and not getattr(library, "special_token_to_id", None)
        and not (library.removed_extra_spaces and not library.ignore_extra_whitespaces)
        and hasattr(processor, "encode"))
    if plain_sentencepiece:
        return lambda texts: processor.encode(texts, num_threads=1) if texts else []
    def one_by_one(texts):
        encoded = []
        for text in texts:
            try:
                encoded.append(tokenizer.tokenize(text))
            except Exception as err:  # reported as a bad record, with file and line
                encoded.append(ValueError(f"{type(err).__name__}: {err}"))
        return encoded

    return one_by_one


# The pool calls these module-level functions; the encoder lives in each worker.
_WORKER_ENCODER: Optional[DocumentEncoder] = None


def init_worker(settings: EncoderSettings) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = DocumentEncoder(settings)


def encode_in_worker(task: EncodeTask) -> EncodedBatch:
    return _WORKER_ENCODER.encode(task)
