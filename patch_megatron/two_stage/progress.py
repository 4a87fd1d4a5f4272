"""Where an earlier run of a two-stage plan stopped, and the steps that remain.

Each stage's checkpoint directory says how far it got; a checkpoint is only
continued when its record holds this plan's flags, and the handoff only when it
was made from the patch stage's planned iteration.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass

from patch_megatron.training import safe_load
from patch_megatron.training.checkpoint_record import RecordError, read_record
from patch_megatron.training.checkpointing import CheckpointError, iteration_dir, read_latest_iteration
from patch_megatron.two_stage.plan import PATCH_DIR, TOKEN_DIR, RunConfig, StageJob, TwoStageError, TwoStagePlan, stage_argv


def saved_iteration(save_dir: str) -> int | None:
    try:
        return read_latest_iteration(save_dir)
    except CheckpointError as error:
        raise TwoStageError(f"{error}. Choose a new --save directory (nothing is deleted)") from None


def _saved_record(save_dir: str, iteration: int):
    """A checkpoint's record, read without unpickling anything else."""
    path = iteration_dir(save_dir, iteration)
    try:
        return read_record(safe_load.read_common(path), path)
    except (safe_load.UnsafeCheckpointError, RecordError) as error:
        raise TwoStageError(f"cannot read the record of {path} ({error}); choose a new --save "
                            "directory") from None


def _refuse_other_plan(where: str, saved: dict, expected: dict) -> None:
    diffs = [f"{key} {saved.get(key)!r} there, {value!r} now" for key, value in expected.items()
             if saved.get(key) != value]
    if diffs:
        raise TwoStageError(f"{where} belongs to another plan ({'; '.join(diffs)}): run with the "
                            "flags it was started with, or choose a new --save directory "
                            "(nothing is overwritten)")


def _stage_flags(stage: StageJob, config: RunConfig) -> dict:
    """The flags that fix a stage's plan: a checkpoint to continue from must have the same."""
    return {"patch_size": stage.plan.patch_size,
            "patch_data_fraction": float(config.patch_data_fraction),
            "train_tokens": config.train_tokens,
            "global_batch_size": stage.plan.global_batch_size,
            "seq_length": stage.plan.seq_length}


def _training_progress(stage: StageJob, config: RunConfig) -> int | None:
    """The stage's saved iteration after checking it belongs to this plan."""
    iteration = saved_iteration(stage.save_dir)
    if iteration is None:
        return None
    saved_args = _saved_record(stage.save_dir, iteration).flags
    _refuse_other_plan(iteration_dir(stage.save_dir, iteration), saved_args,
                       _stage_flags(stage, config))
    if iteration > stage.plan.train_iters:
        raise TwoStageError(f"{stage.save_dir} holds iteration {iteration}, past the {stage.name} "
                            f"stage's planned {stage.plan.train_iters}: choose a new --save directory")
    return iteration


@dataclass(frozen=True)
class Step:
    name: str  # "patch stage", "handoff", "token stage"
    action: str  # "run", "resume", "skip" or "wait"
    note: str
    command: list[str]  # what runs (for "wait" and "skip": what ran or runs on node rank 0)
    expected_iteration: int | None = None  # training steps: where the checkpoint must end up


def next_steps(plan: TwoStagePlan, repo: str, python: str = sys.executable) -> list[Step]:
    """The three steps as they stand now: what is done, what resumes, what starts."""
    config, patch, token = plan.config, plan.patch, plan.token
    launch = config.launch
    patch_done = _training_progress(patch, config)
    handoff_done = saved_iteration(plan.handoff_dir)
    token_done = _training_progress(token, config)
    if handoff_done is not None:
        position = _saved_record(plan.handoff_dir, handoff_done).data_position or {}
        _refuse_other_plan(plan.handoff_dir, position, {
            "iteration": patch.plan.train_iters, "patch_size": patch.plan.patch_size,
            "train_tokens": config.train_tokens,
            "patch_data_fraction": float(config.patch_data_fraction)})
    if (handoff_done is not None or token_done is not None) and patch_done != patch.plan.train_iters:
        raise TwoStageError(f"{plan.handoff_dir} or {token.save_dir} exists but the patch stage in "
                            f"{patch.save_dir} has not reached its planned iteration "
                            f"{patch.plan.train_iters}: they come from another run; choose a new "
                            "--save directory")

    pretrain = os.path.join(repo, "pretrain_patch_gpt.py")
    steps = [_training_step(patch, patch_done, launch.command(
        pretrain, stage_argv(config, PATCH_DIR, load=patch.save_dir), python))]

    convert = [python, os.path.join(repo, "tools", "convert_patch_to_token.py"),
               "--load", patch.save_dir, "--iteration", str(patch.plan.train_iters),
               "--save", plan.handoff_dir]
    if handoff_done is not None:
        steps.append(Step("handoff", "skip", f"done: {plan.handoff_dir}", convert))
    elif launch.node_rank != 0:
        steps.append(Step("handoff", "wait", f"node rank 0 converts; this node waits for "
                          f"{plan.handoff_dir} (a shared filesystem)", convert))
    else:
        steps.append(Step("handoff", "run", f"weights of iteration {patch.plan.train_iters}, "
                          "patch size 1", convert))

    token_load = token.save_dir if token_done is not None else plan.handoff_dir
    steps.append(_training_step(token, token_done, launch.command(
        pretrain, stage_argv(config, TOKEN_DIR, load=token_load), python)))
    return steps


def _training_step(stage: StageJob, done: int | None, command: list[str]) -> Step:
    planned = stage.plan.train_iters
    name = f"{stage.name} stage"
    if done == planned:
        return Step(name, "skip", f"done: {iteration_dir(stage.save_dir, planned)}", command, planned)
    if done is not None:
        return Step(name, "resume", f"from iteration {done} of {planned}", command, planned)
    return Step(name, "run", f"{planned} iterations", command, planned)


def format_steps(steps: list[Step]) -> str:
    lines = []
    for number, step in enumerate(steps, 1):
        lines.append(f"[{number}/{len(steps)}] {step.name}: {step.action} ({step.note})")
        lines.append("    " + shlex.join(step.command))
    return "\n".join(lines)
