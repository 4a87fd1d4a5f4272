"""Feeding the schedule: this stage's datasets, and micro-batch iterators that resume.

Datasets yield dicts with ``tokens``, ``labels``, ``loss_mask`` of K*T entries
and ``position_ids`` of T (the data pipeline's format). Train sets are indexed
from 0 in stream order per stage, so resuming is skipping the consumed samples.

````--data-path`` goes through the data pipeline (``patch_megatron.data``);
``--mock-data`` gives :class:`MockPatchDataset`: synthetic, learnable
sequences (arithmetic progressions modulo the vocabulary) in the same format,
for tests and smoke runs without a corpus.
"""

from __future__ import annotations

import multiprocessing
import signal
from dataclasses import dataclass

import numpy as np
import torch

from patch_megatron.training.arguments import ArgumentError
from patch_megatron.stage import Stage

VALID_STREAM_OFFSET = 1 << 40  # mock validation samples come from a far-away part of the stream
BATCH_FIELDS = ("tokens", "labels", "loss_mask", "position_ids")
"""The sample fields a micro-batch carries. megatron's datasets add others (BlendedDataset
adds ``dataset_id``, a numpy scalar); those are not the model's input and are left out."""


class MockPatchDataset(torch.utils.data.Dataset):
    """Sample i is a progression ``(start + step*j) % vocab`` seeded by its stream position.

    The stream position of sample i is ``first_token // (K*T) + i``, so the
    token stage's samples (which start at the patch stage's end) differ from
    the patch stage's. Labels follow the model's convention: the K tokens of
    the next patch (K=1: the next token).
    """

    def __init__(self, num_samples, patch_size, seq_length, vocab_size, seed, first_token=0):
        self.num_samples = num_samples
        self.patch_size = patch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.seed = seed
        self.first_sample = first_token // (patch_size * seq_length)

    def __len__(self):
        return self.num_samples

    def __getitem__(self, index):
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, self.first_sample + index])
        start = int(rng.integers(self.vocab_size))
        step = int(rng.integers(1, 4))
        n = self.patch_size * self.seq_length
        stream = (start + step * np.arange(n + self.patch_size)) % self.vocab_size
        stream = torch.from_numpy(stream).long()
        return {
            "tokens": stream[:n],
            "labels": stream[self.patch_size:],
            "loss_mask": torch.ones(n, dtype=torch.float),
            "position_ids": torch.arange(self.seq_length),
        }


@dataclass
class StageData:
    train: torch.utils.data.Dataset
    valid: torch.utils.data.Dataset | None  # this stage's samples (K*T tokens)
    valid_tokens: torch.utils.data.Dataset | None  # K=1 samples for the token NLL (patch stage)
    vocab_size: int  # the tokenizer's, before padding


def build_stage_data(args, plan, dp_size: int) -> StageData:
    """This stage's train and validation sets."""
    train_samples = plan.samples_read  # a ramp's steps read fewer than train_iters full batches
    eval_samples = args.eval_iters * plan.global_batch_size
    want_token_valid = plan.name == Stage.PATCH and args.eval_token_nll and args.eval_iters > 0
    if args.mock_data:
        vocab = args.vocab_size
        if vocab is None:
            from patch_megatron.data.tokenizers import tokenizer_info

            vocab = tokenizer_info(_tokenizer(args)).vocab_size
        K, T = plan.patch_size, plan.seq_length

        def mock(num, k, first):
            return MockPatchDataset(num, k, T, vocab, args.seed, first)

        return StageData(
            train=mock(train_samples, K, plan.data_start_token),
            valid=mock(eval_samples, K, VALID_STREAM_OFFSET) if eval_samples else None,
            valid_tokens=mock(eval_samples * K, 1, VALID_STREAM_OFFSET) if want_token_valid else None,
            vocab_size=vocab,
        )
    return _build_corpus_data(args, plan, train_samples, eval_samples, want_token_valid)


def _build_corpus_data(args, plan, train_samples, eval_samples, want_token_valid) -> StageData:
    """The data pipeline's stage datasets (patch_megatron.data.build_stage_datasets).

    The λ split: with --train-tokens the pipeline places both stages' windows
    from that whole-run budget; without it, it splits the train documents
    λ : 1-λ by tokens, which both stages compute identically whatever their
    step counts.
    """
    from patch_megatron.data.stage_datasets import build_stage_datasets
    from patch_megatron.data.tokenizers import tokenizer_info
    from patch_megatron.data.index_validation import DatasetFileError
    from patch_megatron.data.patch_dataset import DatasetTooSmallError

    from patch_megatron.data.fim import fim_config

    tokenizer = _tokenizer(args)
    try:
        fim = fim_config(args, tokenizer)  # --fim-data: its tokens in this tokenizer
    except ValueError as error:
        raise ArgumentError(f"--fim-data: {error}") from None

    def build(train, evals, eval_patch_size):
        return build_stage_datasets(
            args.data_path, args.split, plan.seq_length, plan.patch_size, plan.name,
            args.patch_data_fraction, args.train_tokens, args.seed, args.data_cache_path,
            train_samples=train, valid_samples=evals, test_samples=evals,
            tokenizer=tokenizer, eval_patch_size=eval_patch_size, fim=fim,
        )

    try:
        stage = build(train_samples, max(eval_samples, 1), plan.patch_size)
        valid_tokens = None
        if want_token_valid:  # K=1 samples of the same validation documents
            valid_tokens = build(plan.global_batch_size, eval_samples * plan.patch_size, 1).valid
    except (DatasetFileError, DatasetTooSmallError, ValueError) as error:
        raise ArgumentError(f"data: {error}") from None
    return StageData(train=stage.train, valid=stage.valid if eval_samples else None,
                     valid_tokens=valid_tokens, vocab_size=tokenizer_info(tokenizer).vocab_size)


def _tokenizer(args):
    from patch_megatron.data.tokenizers import build_tokenizer_from_args

    try:
        return build_tokenizer_from_args(args)
    except ValueError as error:  # the tokenizer module's messages name the flag and the fix
        raise ArgumentError(f"tokenizer: {error}") from None


class PretrainingBatchSampler:
    """This data-parallel rank's micro-batches of sample indices, from ``consumed_samples`` on.

    Megatron-LM's pretraining sampler order: each group of ``micro_batch_size * dp_size``
    consecutive samples is split over the data-parallel ranks in rank order, so a global
    batch holds the same samples whatever the layout; a last, partial group is dropped.
    """

    def __init__(self, total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size):
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.group = micro_batch_size * dp_size

    def __len__(self):
        return max(0, (self.total_samples - self.consumed_samples) // self.group)

    def __iter__(self):
        for start in range(self.consumed_samples, self.consumed_samples + len(self) * self.group,
                           self.group):
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))


def _ignore_sigterm(_worker_id):
    # --exit-signal-handler: a SIGTERM sent to the whole job must reach the training process
    # (which saves and exits), not kill the workers it still reads batches from.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class MicroBatches:
    """Micro-batches of this data-parallel rank, from ``consumed_samples`` on (an iterator).

    A ``torch.utils.data.DataLoader`` over the dataset with Megatron-LM's sampler order
    (:class:`PretrainingBatchSampler`): ``num_workers`` > 0 reads samples in that many worker
    processes, in the same order. Workers come from a fork server, not from this process: a
    fork of a process that holds threads (gloo's, a checkpoint writer's) can inherit a held
    lock and hang. They stay up between passes (``restart``: the evaluations' same first
    samples) until ``close``.
    """

    def __init__(self, dataset, micro_batch_size, dp_rank, dp_size, consumed_samples=0,
                 num_workers=0, pin_memory=False, exit_signal_handler=False):
        sampler = PretrainingBatchSampler(len(dataset), consumed_samples, micro_batch_size,
                                          dp_rank, dp_size)
        workers = {}
        if num_workers > 0:
            workers = dict(multiprocessing_context=_worker_context(), persistent_workers=True,
                           worker_init_fn=_ignore_sigterm if exit_signal_handler else None)
        # Its own generator: each iterator draws the workers' base seed from it, not from
        # torch's default generator, which dropout draws from on CPU (a resumed run builds its
        # iterators after the RNG states are restored, and would then drop out differently).
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
            pin_memory=pin_memory, generator=torch.Generator(), **workers)
        self._batches = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._batches)

    def restart(self) -> "MicroBatches":
        """Read again from the first sample (the same workers)."""
        self._batches = iter(self.loader)
        return self

    def close(self) -> None:
        """Stop the workers now (not whenever the iterator is garbage collected)."""
        # torch has no public call for this; the iterator's own shutdown is idempotent.
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _worker_context():
    return multiprocessing.get_context("forkserver")


def start_worker_server(mock_data: bool) -> None:
    """Start the fork server of the reader processes now, importing the dataset's module, so
    that its start-up (a fresh interpreter importing torch, and megatron-core for a corpus)
    overlaps the model's build instead of delaying the first batch.

    Its first import (``worker_server``) makes the server and its workers die with the run.
    """
    context = _worker_context()
    module = "patch_megatron.training.data" if mock_data else "patch_megatron.data.patch_dataset"
    context.set_forkserver_preload(["patch_megatron.training.worker_server", "torch", module])
    from multiprocessing import forkserver

    forkserver.ensure_running()


class BatchLoaders:
    """``make_batches`` of the loop: one :class:`MicroBatches` per (dataset, start), kept, so
    each evaluation rereads its first samples with the same workers; ``close`` stops them all."""

    def __init__(self, micro_batch_size, dp_rank, dp_size, num_workers=0, pin_memory=False,
                 exit_signal_handler=False):
        self.settings = dict(micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                             num_workers=num_workers, pin_memory=pin_memory,
                             exit_signal_handler=exit_signal_handler)
        self.made = {}

    def __call__(self, dataset, consumed_samples=0) -> MicroBatches:
        key = (id(dataset), consumed_samples)
        if key in self.made:
            return self.made[key][1].restart()
        batches = MicroBatches(dataset, consumed_samples=consumed_samples, **self.settings)
        self.made[key] = (dataset, batches)  # the dataset is held so that its id stays its own
        return batches

    def close(self) -> None:
        for _, batches in self.made.values():
            batches.close()
        self.made.clear()


def collate(samples) -> dict:
    """One micro-batch of BATCH_FIELDS from samples that may carry more fields."""
    missing = [key for key in BATCH_FIELDS if key not in samples[0]]
    if missing:
        raise KeyError(f"dataset samples lack {missing} (they hold {sorted(samples[0])}); "
                       f"a training dataset must yield {list(BATCH_FIELDS)}")
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_FIELDS}
