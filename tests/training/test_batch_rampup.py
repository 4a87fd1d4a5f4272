"""--rampup-batch-size: the run's steps and batches, its checks, and what --check-only prints.

The expected batches come from the flag's definition (tests/ramp_reference.py);
the code under test takes them from megatron-core's calculator. The loop's use of
them is in tests/training/test_loop.py, a real ramped run and its resume in
tests/test_pretrain_patch_gpt.py.
"""

import re

import pytest

from patch_megatron.training import batch_rampup, command_check
from patch_megatron.training.arguments import ArgumentError, check_world_size, parse_args
from ramp_reference import step_batches

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 8 --mock-data "
        "--vocab-size 128 --lr 3e-4 --cpu").split()


def ramped(flags, world_size=1):
    args = parse_args(BASE + flags.split())
    check_world_size(args, world_size=world_size)
    return args


@pytest.mark.parametrize("mbs, gbs, ramp, train_samples, patch", [
    (2, 12, (4, 4, 40), 100, ""),  # three sizes, then the final batch
    (1, 64, (16, 16, 100), 1000, ""),  # shares of 33.3 samples: not whole
    (2, 12, (4, 4, 40), 30, ""),  # the run ends inside the ramp
    (2, 32, (8, 8, 60), 200, "--patch-size 4 --patch-data-fraction 0.5"),  # K*T-token samples
])
def test_the_steps_and_their_batches_follow_the_definition(mbs, gbs, ramp, train_samples, patch):
    args = ramped(f"--micro-batch-size {mbs} --global-batch-size {gbs} --train-samples "
                  f"{train_samples} --rampup-batch-size {' '.join(map(str, ramp))} {patch}")
    plan = args.stage
    expected = step_batches(*ramp, gbs, train_samples)
    assert plan.train_iters == len(expected)
    assert plan.samples_read == sum(expected)  # the train set's size
    assert plan.train_tokens == sum(expected) * plan.tokens_per_sample
    # The schedule keeps counting samples of the run: its horizon is --train-samples.
    assert plan.train_samples == plan.lr_decay_samples == train_samples
    changes = [(i + 1, b) for i, b in enumerate(expected) if i == 0 or expected[i - 1] != b]
    assert batch_rampup.batch_changes(plan, mbs) == changes


def test_parsing_a_ramp_leaves_its_steps_to_check_world_size():
    # The steps come from megatron-core's calculator, which the parser does not import.
    args = parse_args(BASE + "--micro-batch-size 2 --global-batch-size 12 --train-samples 100 "
                             "--rampup-batch-size 4 4 40".split())
    assert args.stage is None
    check_world_size(args, world_size=2)
    assert args.stage.rampup_batch_size == (4, 4, 40) and args.stage.global_batch_size == 12


@pytest.mark.parametrize("flags, world_size, message", [
    ("--train-iters 10", 1, "give --train-samples instead of --train-iters"),
    ("--train-tokens 3200", 1, "give --train-samples instead of --train-tokens"),
    ("--train-samples 100 --lr-warmup-iters 2", 1,
     "--lr-warmup-iters with --rampup-batch-size: a step's samples change during the ramp"),
    ("--train-samples 100 --lr-decay-iters 8", 1,
     "--lr-decay-iters with --rampup-batch-size.*--lr-decay-samples"),
    ("--train-samples 100 --rampup-batch-size 0 4 40", 1, "must be >= 1"),
    ("--train-samples 100 --rampup-batch-size 4 4 0", 1, "a ramp over 0 samples is no ramp"),
    ("--train-samples 100 --rampup-batch-size 12 4 40", 1,
     "starts at 12 samples, the --global-batch-size itself: there is nothing to ramp"),
    ("--train-samples 100 --rampup-batch-size 16 4 40", 1, "above --global-batch-size 12"),
    ("--train-samples 100 --rampup-batch-size 4 6 40", 1,
     "from 4 to --global-batch-size 12 is not a whole number of increments of 6"),
    ("--train-samples 100 --rampup-batch-size 3 3 40", 1,
     "START and INCREMENT must be multiples of micro-batch-size x data-parallel size = 2 x 1"),
    ("--train-samples 100 --rampup-batch-size 2 2 40", 2,
     "multiples of micro-batch-size x data-parallel size = 2 x 2 = 4"),
    ("--train-samples 100 --rampup-batch-size 6 3 40", 1, "multiples of micro-batch-size"),
])
def test_bad_ramps_are_refused_with_the_fix(flags, world_size, message):
    flags = "--micro-batch-size 2 --global-batch-size 12 " + flags
    if "--rampup-batch-size" not in flags:
        flags += " --rampup-batch-size 4 4 40"
    with pytest.raises(ArgumentError, match=message):
        ramped(flags, world_size)


def test_the_two_stage_runner_refuses_a_ramp():
    from patch_megatron.two_stage.plan import TwoStageError, check_passthrough

    with pytest.raises(TwoStageError, match="--rampup-batch-size cannot be passed.*--train-tokens"):
        check_passthrough(["--rampup-batch-size", "4", "4", "40"])


def test_check_only_prints_the_ramp_and_its_schedule_in_samples():
    args = ramped("--micro-batch-size 2 --global-batch-size 24 --train-samples 200 "
                  "--rampup-batch-size 8 8 64 --lr-warmup-samples 50", world_size=2)
    text = command_check.report(args, dp=2)
    expected = step_batches(8, 8, 64, 24, 200)
    firsts = ", ".join(f"{b} from step {i + 1}" for i, b in enumerate(expected)
                       if i == 0 or expected[i - 1] != b)
    assert f"{len(expected)} steps of up to 24 samples" in text
    assert "--rampup-batch-size 8 8 64): 8 -> 24 samples by 8 every 32 consumed samples" in text
    assert f"batch sizes: {firsts}\n" in text
    assert "2 growing to 6 micro-batches of 2 per step on each of 2 data-parallel ranks" in text
    assert re.search(r"over 50 warmup samples, then linear to 0.0 over 200 samples", text)
