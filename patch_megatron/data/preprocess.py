"""Raw text to megatron-core ``.bin/.idx`` files, Megatron-LM compatible.

Same input, SentencePiece model and flags give the same bytes as Megatron-LM's
``tools/preprocess_data.py`` (core_v0.16.1): one ``PREFIX_{key}_document`` pair
(``_sentence`` with --split-sentences) per JSON key, written by megatron-core's ``IndexedDatasetBuilder`` with the dtype
``DType.optimal_dtype(vocab_size)`` (uint16 below 65500 ids, else int32), one
document (one sequence, or one per sentence for pre-split lists) per record,
EOD appended with ``append_eod``.

Differences by design: several inputs (files, directories, globs; .jsonl,
.jsonl.gz, .txt), flat memory (a bounded number of batches in flight), bad
records stop the run with their file and line (or are skipped and counted),
and outputs appear only when complete (see ``atomic_output``).
"""

import collections
import contextlib
import multiprocessing
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence

from megatron.core.datasets.indexed_dataset import DType

from patch_megatron.data.atomic_output import AtomicIndexedOutput
from patch_megatron.data.document_encoding import (
    DocumentEncoder, EncodedBatch, EncoderSettings, EncodeTask, encode_in_worker, init_worker)
from patch_megatron.data.input_documents import (
    BadRecordError, expand_inputs, input_format, iter_raw_records)
from patch_megatron.data.progress import ProgressBar
from patch_megatron.data.sentence_splitting import load_splitter
from patch_megatron.data.tokenizers import build_tokenizer

# Records per task: large enough that pickling and IPC are cheap per document,
# small enough that a few tasks in flight keep memory flat.
BATCH_RECORDS = 64
BATCH_BYTES = 1 << 20
TASKS_IN_FLIGHT_PER_WORKER = 4


@dataclass
class PreprocessConfig:
    inputs: Sequence[str]
    output_prefix: str
    tokenizer_type: str
    tokenizer_model: Optional[str] = None
    vocab_size: Optional[int] = None
    vocab_file: Optional[str] = None  # GPT2BPETokenizer
    merge_file: Optional[str] = None
    json_keys: Sequence[str] = ("text",)
    append_eod: bool = False
    workers: int = 1  # 0: encode in this process
    log_interval: int = 1000
    skip_bad_lines: bool = False
    split_sentences: bool = False  # --split-sentences (NLTK's Punkt model of --lang)
    lang: str = "english"
    keep_newlines: bool = False
    tiktoken_pattern: Optional[str] = None  # TikTokenizer
    tiktoken_num_special_tokens: int = 1000


@dataclass
class PreprocessSummary:
    documents: int = 0
    tokens: Dict[str, int] = field(default_factory=dict)
    input_bytes: int = 0
    seconds: float = 0.0
    skipped: Dict[str, int] = field(default_factory=dict)
    outputs: List[str] = field(default_factory=list)

    def report(self) -> str:
        rate = self.documents / max(self.seconds, 1e-9)
        mbs = self.input_bytes / max(self.seconds, 1e-9) / 1e6
        lines = [f"documents: {self.documents}",
                 "tokens: " + ", ".join(f"{k}={v}" for k, v in self.tokens.items()),
                 f"input bytes: {self.input_bytes}",
                 f"time: {self.seconds:.2f}s ({rate:.1f} docs/s, {mbs:.2f} MB/s)"]
        if self.skipped:
            lines.append("skipped: " + ", ".join(f"{k}={v}" for k, v in
                                                  sorted(self.skipped.items())))
        lines += [f"wrote: {path}.bin/.idx" for path in self.outputs]
        return "\n".join(lines)


def output_prefix_for_key(output_prefix: str, key: str, split_sentences: bool = False) -> str:
    """Megatron-LM's naming: ``{prefix}_{key}_document``, or ``{prefix}_{key}_sentence``
    with --split-sentences."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def preprocess(config: PreprocessConfig, progress_stream=None) -> PreprocessSummary:
    """Tokenize the inputs into one ``.bin/.idx`` pair per JSON key; see module docs.

    Raises BadRecordError for the first bad record unless ``skip_bad_lines``; on
    any error or interruption no output pair is left behind.
    """
    files = expand_inputs(config.inputs)
    formats = {path: input_format(path) for path in files}
    if any(fmt == "txt" for fmt in formats.values()) and len(config.json_keys) != 1:
        raise ValueError("plain .txt inputs hold one field: pass a single --json-keys name.")
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model,
                                config.vocab_size, config.vocab_file, config.merge_file,
                                config.tiktoken_pattern, config.tiktoken_num_special_tokens)
    settings = EncoderSettings(
        config.tokenizer_type, config.tokenizer_model, config.vocab_size,
        tuple(config.json_keys), config.append_eod,
        DType.optimal_dtype(tokenizer.vocab_size), config.vocab_file, config.merge_file,
        config.split_sentences, config.lang, config.keep_newlines, os.environ.get("NLTK_DATA"),
        config.tiktoken_pattern, config.tiktoken_num_special_tokens)
    if config.split_sentences:  # NLTK and its model, checked here once rather than per worker
        load_splitter(config.lang, config.keep_newlines, settings.nltk_data)
    summary = PreprocessSummary(tokens={key: 0 for key in config.json_keys})
    started = time.time()
    outputs = {key: AtomicIndexedOutput(output_prefix_for_key(config.output_prefix, key,
                                                              config.split_sentences),
                                        settings.token_dtype) for key in config.json_keys}
    progress = ProgressBar(config.log_interval, sum(os.path.getsize(p) for p in files),
                           progress_stream)
    previous_sigterm = _raise_on_sigterm()
    try:
        # closing(): an error stops the worker pool now, not when garbage collected.
        with contextlib.closing(_encoded_batches(files, formats, settings,
                                                 config.workers)) as batches:
            for batch in batches:
                _write_batch(batch, outputs, summary, config.skip_bad_lines)
                progress.update(batch.documents + len(batch.errors), batch.payload_bytes)
        progress.close()
        if summary.documents == 0:
            raise ValueError("no usable documents in the inputs; nothing written.")
        for output in outputs.values():
            output.finalize()
        for output in outputs.values():
            output.publish()
    except BaseException:
        for output in outputs.values():
            output.discard()
        raise
    finally:
        _restore_sigterm(previous_sigterm)
    summary.seconds = time.time() - started
    summary.outputs = [output.prefix for output in outputs.values()]
    return summary


def _write_batch(batch: EncodedBatch, outputs: Dict[str, AtomicIndexedOutput],
                 summary: PreprocessSummary, skip_bad_lines: bool) -> None:
    if batch.errors and not skip_bad_lines:
        raise batch.errors[0]
    for error in batch.errors:
        summary.skipped[error.kind] = summary.skipped.get(error.kind, 0) + 1
    for key, output in outputs.items():
        tokens, start = batch.tokens[key], 0
        for lengths in batch.sequence_lengths[key]:
            end = start + sum(lengths)
            output.add_document(tokens[start:end], lengths)
            start = end
        summary.tokens[key] += int(tokens.size)
    summary.documents += batch.documents
    summary.input_bytes += batch.payload_bytes


def _encoded_batches(files, formats, settings: EncoderSettings,
                     workers: int) -> Iterator[EncodedBatch]:
    if workers <= 0:
        encoder = DocumentEncoder(settings)
        yield from map(encoder.encode, _tasks(files, formats))
        return
    # Tasks are submitted from this thread with at most a fixed number pending
    # (Pool.imap would drain the whole input into memory), and collected in order.
    # Workers come from a fork server, not from this process: a fork of a process that holds
    # threads (torch's, a caller's) can inherit a held lock, and the pool's queue then hangs
    # (seen in CI: a worker forked from the test process waited on its queue's lock forever).
    context = multiprocessing.get_context("forkserver")
    # The server imports the encoder once; each pool's workers are forked from it ready to run.
    context.set_forkserver_preload(["patch_megatron.data.preprocess",
                                    "megatron.core.tokenizers.text.utils.build_tokenizer"])
    pool = context.Pool(
        workers, initializer=_quiet_worker_init, initargs=(settings,))
    pending = collections.deque()
    limit = workers * TASKS_IN_FLIGHT_PER_WORKER
    finished = False
    try:
        for task in _tasks(files, formats):
            pending.append(pool.apply_async(encode_in_worker, (task,)))
            if len(pending) >= limit:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        finished = True
    finally:
        if finished:
            pool.close()
        else:
            pool.terminate()
        pool.join()


def _quiet_worker_init(settings: EncoderSettings) -> None:
    # Ctrl-C is handled once, by the parent, which then stops the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init_worker(settings)


def _tasks(files, formats) -> Iterator[EncodeTask]:
    for path in files:
        records, size = [], 0
        for record in iter_raw_records(path):
            records.append(record)
            size += len(record.payload)
            if len(records) >= BATCH_RECORDS or size >= BATCH_BYTES:
                yield EncodeTask(formats[path], records)
                records, size = [], 0
        if records:
            yield EncodeTask(formats[path], records)


def _raise_on_sigterm():
    """Turn SIGTERM into an exception so temporary outputs are removed."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
