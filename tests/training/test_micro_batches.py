"""Micro-batches: Megatron-LM's sampler order, resumption, and --num-workers reader processes.

In process, over the mock dataset; tests/training/test_loop.py checks that a real run's losses
are the same with and without workers.
"""

import pytest
import torch

from patch_megatron.training.data import BatchLoaders, MicroBatches, MockPatchDataset


def dataset(num_samples=24):
    return MockPatchDataset(num_samples, patch_size=2, seq_length=4, vocab_size=5000, seed=7)


def first_tokens(batches):
    """Each micro-batch as the stream positions of its samples (tokens identify a sample)."""
    ds = dataset()
    index = {tuple(ds[i]["tokens"].tolist()): i for i in range(len(ds))}
    assert len(index) == len(ds)  # no two samples alike
    return [[index[tuple(row.tolist())] for row in batch["tokens"]] for batch in batches]


@pytest.mark.parametrize("dp_size, consumed", [(1, 0), (2, 0), (2, 8), (3, 6)])
def test_each_global_group_is_split_over_the_ranks_in_order(dp_size, consumed):
    micro = 2
    per_rank = [first_tokens(MicroBatches(dataset(), micro, rank, dp_size, consumed))
                for rank in range(dp_size)]
    groups = (len(dataset()) - consumed) // (micro * dp_size)  # a last partial group is dropped
    assert all(len(batches) == groups for batches in per_rank)
    for g in range(groups):
        start = consumed + g * micro * dp_size
        # rank r holds the r-th micro_batch_size samples of each group of micro x dp samples
        assert sum((per_rank[r][g] for r in range(dp_size)), []) == list(
            range(start, start + micro * dp_size))


def test_workers_give_the_same_batches_resume_rereads_and_stop_on_close():
    plain = list(MicroBatches(dataset(), 2, 1, 2, consumed_samples=4))
    batches = MicroBatches(dataset(), 2, 1, 2, consumed_samples=4, num_workers=2)
    workers = batches._batches._workers  # the reader processes (to check that close stops them)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    for _ in range(2):  # a second pass (each evaluation rereads its first samples) reuses them
        read = list(batches)
        assert len(read) == len(plain) == 5
        for got, want in zip(read, plain):
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)
        batches.restart()
        assert batches._batches._workers == workers
    batches.close()
    for worker in workers:
        worker.join(timeout=30)
    assert not any(w.is_alive() for w in workers)


def test_batch_loaders_keep_one_loader_per_dataset_and_start():
    loaders = BatchLoaders(2, dp_rank=0, dp_size=1)
    valid, train = dataset(8), dataset(24)
    first = loaders(valid)
    assert len(list(first)) == 4
    again = loaders(valid)  # the next evaluation: the same samples from the start
    assert again is first and first_tokens(again) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert first_tokens(loaders(train, 20)) == [[20, 21], [22, 23]]
    loaders.close()
    assert loaders.made == {}


def test_reading_leaves_torchs_default_generator_alone():
    """A run resumed from a checkpoint builds its readers after restoring the RNG states; on
    CPU dropout draws from torch's default generator, so reading must not draw from it."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    batches = MicroBatches(dataset(), 2, 0, 1)
    next(batches)
    batches.restart()
    next(batches)
    assert torch.equal(torch.rand(4), expected)
