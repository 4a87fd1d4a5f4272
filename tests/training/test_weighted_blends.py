"""Weighted --data-path blends train end to end (megatron's BlendedDataset adds fields).

Real preprocessed prefixes (three slices of the builtin corpus), real
pretrain_patch_gpt.py launches on CPU, with and without --data-cache-path, and
one at DP=2 through torch.distributed.run.
"""

import json
import os
import subprocess
import sys

import numpy
import pytest
import torch

from patch_megatron.training import log_reading
from patch_megatron.training.data import BATCH_FIELDS, MicroBatches
from repo_tools import IN_PROCESS_READING, child_environment, free_port
from patch_megatron.llama_recipe import RECIPE_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 8 "
         "--micro-batch-size 2 --global-batch-size 4 --train-iters 3 "
         "--make-vocab-size-divisible-by 64 --untie-embeddings-and-output-weights "
         "--lr 3e-3 --lr-warmup-iters 1 --log-interval 1 --eval-interval 2 --eval-iters 1 "
         "--split 80,10,10 --cpu --tokenizer-type GPTSentencePieceTokenizer").split() + list(RECIPE_FLAGS) + list(IN_PROCESS_READING)
PATCH = "--patch-size 4 --patch-data-fraction 0.667".split()


class BlendedLikeDataset(torch.utils.data.Dataset):
    """Samples as megatron's BlendedDataset returns them: the fields plus a numpy dataset_id."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"tokens": torch.full((4,), i), "labels": torch.full((4,), i + 1),
                "loss_mask": torch.ones(4), "position_ids": torch.arange(1),
                "dataset_id": numpy.int16(i % 2)}


def test_micro_batches_leave_out_extra_fields():
    batch = next(MicroBatches(BlendedLikeDataset(), 2, dp_rank=1, dp_size=2))
    assert sorted(batch) == sorted(BATCH_FIELDS)
    assert batch["tokens"][:, 0].tolist() == [2, 3]  # rank 1 of 2: samples 2 and 3
    assert batch["labels"].shape == (2, 4)


def test_micro_batches_name_a_missing_field():
    class NoLabels(BlendedLikeDataset):
        def __getitem__(self, i):
            sample = super().__getitem__(i)
            del sample["labels"]
            return sample

    with pytest.raises(KeyError, match="lack \\['labels'\\]"):
        next(MicroBatches(NoLabels(), 2, 0, 1))


@pytest.fixture(scope="module")
def prefixes(builtin_corpus, sentencepiece_model, tmp_path_factory):
    """Three data prefixes: the builtin corpus cut into thirds, preprocessed."""
    from patch_megatron.data.preprocess import PreprocessConfig, preprocess

    folder = tmp_path_factory.mktemp("blend")
    with open(builtin_corpus.path, encoding="utf-8") as lines:
        rows = lines.readlines()[:240]
    made = []
    for part in range(3):
        source = folder / f"part{part}.jsonl"
        source.write_text("".join(rows[part::3]), encoding="utf-8")
        summary = preprocess(PreprocessConfig(
            inputs=[str(source)], output_prefix=str(folder / f"part{part}"),
            tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=sentencepiece_model,
            append_eod=True, workers=0, log_interval=10**9),
            progress_stream=open(os.devnull, "w"))
        made.append(summary.outputs[0])
    return made, sentencepiece_model


def train(model, extra, nproc=1):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                     f"--master-port={free_port()}"]
    command = launcher + [os.path.join(REPO, "pretrain_patch_gpt.py"), *FLAGS,
                          "--tokenizer-model", model, *extra]
    env = child_environment()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    losses = {i: float(v) for i, v in log_reading.losses(result.stdout).items()}
    assert sorted(losses) == [1, 2, 3], result.stdout[-3000:]
    evaluated = log_reading.validation_curve(result.stdout)
    assert sorted({i for i, _ in evaluated}) == [2, 3]  # evaluated too
    return losses


@pytest.fixture(scope="module")
def half_and_half(prefixes):
    (a, b, _), model = prefixes
    return train(model, PATCH + ["--data-path", "0.5", a, "0.5", b])


def test_two_prefix_blend_trains(half_and_half):
    assert all(numpy.isfinite(v) for v in half_and_half.values())


def test_blend_weights_are_normalised_and_dp2_with_cache_matches(prefixes, half_and_half,
                                                                  tmp_path):
    # 1 A 1 B is 0.5 A 0.5 B; DP=2 splits each global batch, the same samples in all.
    (a, b, _), model = prefixes
    cache = tmp_path / "cache"
    got = train(model, PATCH + ["--data-path", "1", a, "1", b, "--data-cache-path", str(cache)],
                nproc=2)
    assert any(name.endswith("BlendedDataset-train-dataset_index.npy")
               for name in os.listdir(cache))
    for i, value in half_and_half.items():
        assert abs(got[i] - value) <= 2e-6 * abs(value), (got, half_and_half)


def test_three_prefix_blend_token_stage_with_cache_and_rerun(prefixes, tmp_path):
    (a, b, c), model = prefixes
    flags = ["--patch-size", "1", "--data-path", "0.3", a, "0.3", b, "0.4", c,
             "--data-cache-path", str(tmp_path / "cache")]
    first = train(model, flags)
    assert train(model, flags) == first  # the second run reads the cache megatron wrote
