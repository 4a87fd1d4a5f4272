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

    tokenizer = _tokenizer(args)

    def build(train, evals, eval_patch_size):
        return build_stage_datasets(
            args.data_path, args.split, plan.seq_length, plan.patch_size, plan.name,
            args.patch_data_fraction, args.train_tokens, args.seed, args.data_cache_path,
            train_samples=train, valid_samples=evals, test_samples=evals,
            tokenizer=tokenizer, eval_patch_size=eval_patch_size,
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


class MicroBatches:
    """Micro-batches of this data-parallel rank, from ``consumed_samples`` on.

    Each group of ``micro_batch_size * dp_size`` consecutive samples is split
    over the data-parallel ranks (Megatron's pretraining sampler order), so a
    global batch holds the same samples whatever the layout.
    """

    def __init__(self, dataset, micro_batch_size, dp_rank, dp_size, consumed_samples=0):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    def __iter__(self):
        return self

    def __next__(self):
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        if self.consumed_samples + self.micro_batch_size * self.dp_size > len(self.dataset):
            raise StopIteration
        samples = [self.dataset[i] for i in range(first, first + self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.dp_size
        return collate(samples)


def collate(samples) -> dict:
    """One micro-batch of BATCH_FIELDS from samples that may carry more fields."""
    missing = [key for key in BATCH_FIELDS if key not in samples[0]]
    if missing:
        raise KeyError(f"dataset samples lack {missing} (they hold {sorted(samples[0])}); "
                       f"a training dataset must yield {list(BATCH_FIELDS)}")
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_FIELDS}
