"""What --load does with a directory whose saves did not all finish; that
--save-retain-interval leaves a linked checkpoint (its run: tests/test_pretrain_patch_gpt.py)."""

import os

import pytest

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


def test_save_retain_interval_leaves_a_linked_checkpoint(tmp_path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    os.symlink(real, checkpointing.iteration_dir(str(tmp_path), 3))
    checkpointing._drop_unretained(str(tmp_path), 3, 4, retain_interval=2)
    assert real.is_dir() and os.path.islink(checkpointing.iteration_dir(str(tmp_path), 3))
