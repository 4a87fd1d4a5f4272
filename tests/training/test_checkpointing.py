"""What --load does with a directory whose saves did not all finish; which saves
--save-retain-interval keeps."""

import os
import subprocess
import sys

import pytest

from repo_tools import IN_PROCESS_READING, REPO_ROOT, child_environment
from patch_megatron.llama_recipe import RECIPE_FLAGS
from patch_megatron.training import checkpointing
from patch_megatron.training.checkpointing import CheckpointError, load_checkpoint


def load(directory):
    # With no latest_checkpointed_iteration.txt, nothing but the directory is touched.
    return load_checkpoint(str(directory), None, None, None, None, None, None)


def test_a_killed_first_save_starts_the_run_afresh(tmp_path):
    (tmp_path / "iter_0000010.incomplete").mkdir()
    assert load(tmp_path) is None
    assert (tmp_path / "iter_0000010.incomplete").is_dir()  # left for the next save to clear


def test_finished_iterations_without_the_tracker_file_are_refused(tmp_path):
    (tmp_path / "iter_0000010").mkdir()
    with pytest.raises(CheckpointError, match="tracker file .* is missing"):
        load(tmp_path)


def test_an_empty_or_missing_directory_starts_afresh(tmp_path):
    assert load(tmp_path) is None
    assert load(tmp_path / "absent") is None


def test_save_retain_interval_keeps_its_multiples_and_the_latest(tmp_path):
    # As Megatron-LM: each save deletes the checkpoint it replaces as latest, unless that one's
    # iteration is a multiple of the interval. Saves at 1..5, interval 2: 2, 4 and 5 stay.
    save = str(tmp_path / "ckpt")
    flags = ("--num-layers 1 --hidden-size 32 --num-attention-heads 2 --seq-length 8 "
             "--micro-batch-size 2 --global-batch-size 2 --mock-data --vocab-size 64 "
             "--lr 1e-3 --log-interval 1 --eval-iters 0 --cpu --train-iters 5 "
             "--save-interval 1 --save-retain-interval 2").split()
    result = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "pretrain_patch_gpt.py"), *flags,
         *RECIPE_FLAGS, *IN_PROCESS_READING, "--save", save],
        capture_output=True, text=True, env=child_environment(), timeout=240, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpointing.finished_iterations(save) == [2, 4, 5]
    assert checkpointing.read_latest_iteration(save) == 5
    assert result.stdout.count("> deleted") == 2


def test_save_retain_interval_leaves_a_linked_checkpoint(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    os.symlink(real, checkpointing.iteration_dir(str(tmp_path), 3))
    checkpointing._drop_unretained(str(tmp_path), 3, 4, retain_interval=2)
    assert real.is_dir() and os.path.islink(checkpointing.iteration_dir(str(tmp_path), 3))
