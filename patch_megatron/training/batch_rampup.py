"""Each step's global batch: constant, or ramped up by ``--rampup-batch-size``.

``--rampup-batch-size START INCREMENT RAMPUP_SAMPLES`` means what it means in
Megatron-LM: the global batch starts at START samples and grows by INCREMENT
each time another RAMPUP_SAMPLES / ((global-batch-size - START) / INCREMENT)
samples of the run have been consumed, until it reaches --global-batch-size.
The samples counted are those of the run being trained (the checkpoint's
``consumed_train_samples``), K*T tokens each in the patch stage.

megatron-core's num-microbatches calculator does the ramp's arithmetic, as in
Megatron-LM: the loop updates it from the consumed samples before every step
and asks it for the step's micro-batch count and global batch
(:class:`StepBatches`); :func:`ramp_length` counts a ramped run's steps with
Megatron-LM's rule for ``--train-samples``. This module imports megatron-core,
so the flag parser reaches it only for a ramped command, after its checks.
"""

from __future__ import annotations

from dataclasses import dataclass


def _calculator(rampup_batch_size, global_batch_size: int, micro_batch_size: int):
    """megatron-core's ramp calculator, to count with (not the global one the loop asks)."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    start, increment, rampup_samples = (int(v) for v in rampup_batch_size)
    # The batch sizes do not depend on the data-parallel size; a size of 1 is always valid
    # here. Not rank 0: counting logs nothing.
    return RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size, micro_batch_size, data_parallel_size=1,
        decrease_batch_size_if_needed=False, rank=1, start_global_batch_size=start,
        batch_size_increment=increment, ramup_samples=rampup_samples)


@dataclass(frozen=True)
class RampLength:
    train_iters: int  # steps of the ramped run
    samples_read: int  # the samples those steps consume (the train set's size)


def ramp_length(rampup_batch_size, global_batch_size: int, micro_batch_size: int,
                train_samples: int) -> RampLength:
    """Steps of a ramped run of ``train_samples`` samples, as Megatron-LM counts them: steps
    of the ramp's growing batches while the consumed samples are within both the ramp and the
    run, then as many whole final batches as the rest holds (a partial last one is dropped)."""
    calculator = _calculator(rampup_batch_size, global_batch_size, micro_batch_size)
    rampup_samples = int(rampup_batch_size[2])
    steps = consumed = 0
    while consumed <= rampup_samples and consumed <= train_samples:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.get_current_global_batch_size()
        steps += 1
    final_steps = max(train_samples - consumed, 0) // global_batch_size
    return RampLength(steps + final_steps, consumed + final_steps * global_batch_size)


def batch_changes(plan, micro_batch_size: int) -> list[tuple[int, int]]:
    """(first step, global batch) of each batch size the run's steps take, in order."""
    calculator = _calculator(plan.rampup_batch_size, plan.global_batch_size, micro_batch_size)
    changes, consumed = [], 0
    for step in range(1, plan.train_iters + 1):
        calculator.update(consumed, consistency_check=False)
        batch = calculator.get_current_global_batch_size()
        if not changes or changes[-1][1] != batch:
            changes.append((step, batch))
        if batch == plan.global_batch_size:
            break  # the ramp is over: the rest of the steps keep this batch
        consumed += batch
    return changes


def describe(plan, micro_batch_size: int) -> str:
    """The ramp in words, with the steps at which the batch grows (several lines)."""
    start, increment, rampup_samples = plan.rampup_batch_size
    changes = batch_changes(plan, micro_batch_size)
    shown = [f"{batch} from step {step}" for step, batch in changes]
    if len(shown) > 8:
        shown = shown[:4] + [f"... ({len(shown) - 6} more)"] + shown[-2:]
    per_increment = rampup_samples / ((plan.global_batch_size - start) // increment)
    reached = ("reached" if changes[-1][1] == plan.global_batch_size
               else "not reached: the run ends first")
    return (f"global batch ramped up (--rampup-batch-size {start} {increment} {rampup_samples}): "
            f"{start} -> {plan.global_batch_size} samples by {increment} every "
            f"{per_increment:g} consumed samples; final batch {reached}\n"
            f"  batch sizes: {', '.join(shown)}")


class StepBatches:
    """megatron-core's global calculator set up for this run, as Megatron-LM sets it up at
    start-up (``with`` it: it is torn down at the end), in the loop's terms: update it from
    the consumed samples before a step, then read that step's micro-batches and global batch."""

    def __init__(self, plan, micro_batch_size: int, dp_size: int, rank: int):
        from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator

        init_num_microbatches_calculator(rank, plan.rampup_batch_size, plan.global_batch_size,
                                         micro_batch_size, dp_size,
                                         decrease_batch_size_if_needed=False)

    def __enter__(self) -> "StepBatches":
        return self

    def __exit__(self, *exc) -> None:
        from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

        destroy_num_microbatches_calculator()

    def update(self, consumed_samples: int) -> bool:
        """Set the batch of the step after ``consumed_samples``; True when it changed."""
        from megatron.core.num_microbatches_calculator import (get_num_microbatches,
                                                               update_num_microbatches)

        before = get_num_microbatches()
        # The flags' checks (arguments._check_rampup) make every size of the ramp a multiple
        # of micro-batch x data-parallel size, so megatron-core's consistency check holds.
        update_num_microbatches(consumed_samples, consistency_check=True)
        return get_num_microbatches() != before

    @property
    def num_microbatches(self) -> int:
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        return get_num_microbatches()

    @property
    def global_batch_size(self) -> int:
        from megatron.core.num_microbatches_calculator import get_current_global_batch_size

        return get_current_global_batch_size()
