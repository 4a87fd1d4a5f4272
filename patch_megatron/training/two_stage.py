"""Both stages of a patch-level run back to back: the plan, the commands, the run.

The paper's recipe as one job: the patch stage (K > 1) on the first λ of a
token budget, the weights-only handoff (tools/convert_patch_to_token.py), then
the token stage on the rest, with the same tokens per optimizer step in both
stages (the patch stage's global batch is B/K samples of K·T tokens where the
token stage has B samples of T tokens).

Every number of the plan comes from parsing each stage's real command line
with pretrain_patch_gpt.py's own parser and ``stage_plan``, and every FLOP
count from ``patch_megatron.flops`` on the model those flags build, so the
printed plan is what the stages will run rather than a second calculation
that could drift from it.

Layout under one save directory::

    SAVE/patch       the patch stage's checkpoints (its --save and --load)
    SAVE/token_init  the converter's weights-only checkpoint
    SAVE/token       the token stage's checkpoints

Re-running continues: a stage whose checkpoint is at its planned iteration is
skipped, an interrupted one resumes from its own directory, an existing
handoff is reused. Nothing is overwritten or deleted, and a directory holding
checkpoints of another plan is refused.

Multi-node: every node runs the same command with its own node rank, and each
stage starts through ``torch.distributed.run``. Only node rank 0 converts;
the other nodes wait until SAVE/token_init appears, so SAVE must be on a
filesystem all nodes share.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from patch_megatron import flops
from patch_megatron.training.arguments import ArgumentError, StagePlan, parse_args
from patch_megatron.training import safe_load
from patch_megatron.training.checkpoint_record import RecordError, read_record
from patch_megatron.training.checkpointing import (
    CheckpointError, iteration_dir, read_latest_iteration,
)

PATCH_DIR, HANDOFF_DIR, TOKEN_DIR = "patch", "token_init", "token"

# Flags the runner sets for each stage itself; given among the passed-through
# flags they would contradict the plan.
REFUSED_FLAGS = {
    "--load": "each stage loads from its own directory under --save",
    "--train-iters": "the stages' lengths come from --train-tokens",
    "--train-samples": "the stages' lengths come from --train-tokens",
    "--lr-decay-iters": "each stage decays over its own iterations, which differ between stages",
    "--finetune": "the token stage already starts from the patch stage's weights only",
    "--rampup-batch-size": "a batch-size ramp needs a length in samples (--train-samples), and "
                           "the stages' lengths come from --train-tokens",
}

# How long nodes other than rank 0 wait for the handoff (converting a few
# billion parameters on one CPU process takes minutes, not hours).
HANDOFF_WAIT_SECONDS = 2 * 3600
POLL_SECONDS = 10


class TwoStageError(ValueError):
    """A flag, plan or directory problem; the message names the fix."""


class StageStopped(RuntimeError):
    """A stage process failed or stopped before its planned iteration."""


# ---------------------------------------------------------------------------
# What the user asks for.

@dataclass(frozen=True)
class Launch:
    """How each stage's processes start: Megatron-LM's node settings."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "localhost"
    master_port: int = 6000

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def command(self, script: str, argv: list[str], python: str = sys.executable) -> list[str]:
        if self.world_size == 1:
            return [python, script, *argv]  # one process needs no launcher
        return [python, "-m", "torch.distributed.run",
                f"--nproc-per-node={self.nproc_per_node}", f"--nnodes={self.nnodes}",
                f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                f"--master-port={self.master_port}", script, *argv]


# Launch field -> (environment variable of Megatron-LM's launch scripts, default).
LAUNCH_ENVIRONMENT = {
    "nproc_per_node": ("GPUS_PER_NODE", 1),
    "nnodes": ("NNODES", 1),
    "node_rank": ("NODE_RANK", 0),
    "master_addr": ("MASTER_ADDR", "localhost"),
    "master_port": ("MASTER_PORT", 6000),
}


def launch_defaults(environ=os.environ) -> dict:
    """Launch settings from the environment, as Megatron-LM's example scripts read them."""
    defaults = {}
    for name, (variable, default) in LAUNCH_ENVIRONMENT.items():
        text = environ.get(variable)
        if text is None or text == "":
            defaults[name] = default
        elif isinstance(default, int):
            try:
                defaults[name] = int(text)
            except ValueError:
                raise TwoStageError(f"{variable}={text!r} is not a whole number: fix or unset "
                                    "it") from None
        else:
            defaults[name] = text
    return defaults


@dataclass(frozen=True)
class RunConfig:
    train_tokens: int  # the budget of both stages together
    patch_size: int  # K of the patch stage
    patch_data_fraction: float  # λ
    global_batch_size: int  # the token stage's B; the patch stage gets B/K
    save: str
    passthrough: tuple[str, ...] = ()  # every other flag, for both stages
    launch: Launch = Launch()

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.save, name)


# ---------------------------------------------------------------------------
# The plan.

@dataclass(frozen=True)
class StageJob:
    name: str  # "patch" or "token"
    plan: StagePlan  # what pretrain_patch_gpt.py's parser derived from the argv
    save_dir: str
    micro_batch_size: int
    flops: float | None  # training FLOPs of all its iterations; None without a vocabulary

    @property
    def title(self) -> str:
        return f"patch stage (K={self.plan.patch_size})" if self.name == "patch" else "token stage"


@dataclass(frozen=True)
class TwoStagePlan:
    config: RunConfig
    patch: StageJob
    token: StageJob
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    shape: flops.ModelShape | None
    no_flops_reason: str | None  # why FLOPs are missing, when they are

    @property
    def handoff_dir(self) -> str:
        return self.config.stage_dir(HANDOFF_DIR)

    @property
    def trained_tokens(self) -> int:
        return self.patch.plan.train_tokens + self.token.plan.train_tokens

    @property
    def token_only_flops(self) -> float | None:
        """Token-only training (K=1) on the same tokens, with the token stage's T."""
        if self.shape is None:
            return None
        return self.trained_tokens * flops.flops_per_token(self.shape, self.token.plan.seq_length)

    @property
    def total_flops(self) -> float | None:
        return None if self.shape is None else self.patch.flops + self.token.flops

    @property
    def cost_ratio(self) -> float | None:
        """Measured from FLOPs: both stages over token-only training on the same tokens."""
        return None if self.shape is None else self.total_flops / self.token_only_flops

    @property
    def paper_cost_ratio(self) -> float:
        lam, K = self.config.patch_data_fraction, self.config.patch_size
        return lam / K + 1 - lam


def check_passthrough(flags) -> None:
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in REFUSED_FLAGS:
            raise TwoStageError(f"{name} cannot be passed to the two-stage runner: "
                                f"{REFUSED_FLAGS[name]}. Remove it")


def stage_argv(config: RunConfig, name: str, load: str) -> list[str]:
    """pretrain_patch_gpt.py's flags for one stage: the passed-through ones, then the stage's own."""
    patch = name == PATCH_DIR
    K = config.patch_size if patch else 1
    batch = config.global_batch_size // config.patch_size if patch else config.global_batch_size
    return [*_tensorboard_per_stage(config.passthrough, name),
            "--patch-size", str(K),
            "--patch-data-fraction", repr(float(config.patch_data_fraction)),
            "--global-batch-size", str(batch),
            "--train-tokens", str(config.train_tokens),
            "--save", config.stage_dir(name),
            "--load", load]


def _tensorboard_per_stage(flags, name: str) -> list[str]:
    """``--tensorboard-dir D`` becomes ``D/<stage>``: both stages count iterations from 0."""
    flags, out = list(flags), []
    for i, flag in enumerate(flags):
        if flag.startswith("--tensorboard-dir="):
            flag = "--tensorboard-dir=" + os.path.join(flag.split("=", 1)[1], name)
        elif i > 0 and flags[i - 1] == "--tensorboard-dir":
            flag = os.path.join(flag, name)
        out.append(flag)
    return out


def _check_config(config: RunConfig) -> None:
    K, lam, B = config.patch_size, config.patch_data_fraction, config.global_batch_size
    launch = config.launch
    if K < 2:
        raise TwoStageError(f"--patch-size {K} has no patch stage: use K >= 2 (the paper uses 4), "
                            "or run token-only training with pretrain_patch_gpt.py directly")
    if not 0.0 < lam < 1.0:
        raise TwoStageError(f"--patch-data-fraction {lam} leaves a stage without data: use "
                            "0 < λ < 1 (the paper uses 2/3)")
    if B < 1 or config.train_tokens < 1:
        raise TwoStageError("--global-batch-size and --train-tokens must be positive")
    if B % K:
        lower, higher = B // K * K, (B // K + 1) * K
        raise TwoStageError(
            f"--global-batch-size {B} is not divisible by --patch-size {K}: the patch stage runs "
            f"B/K samples of K·T tokens per step so that both stages see B·T tokens per step. "
            f"Use a multiple of {K}, e.g. {lower or higher} or {higher}")
    if min(launch.nproc_per_node, launch.nnodes) < 1 or not 0 <= launch.node_rank < launch.nnodes:
        raise TwoStageError(f"node settings: need --nproc-per-node >= 1, --nnodes >= 1 and "
                            f"0 <= --node-rank < --nnodes (got {launch.nproc_per_node}, "
                            f"{launch.nnodes}, {launch.node_rank})")
    check_passthrough(config.passthrough)


def _parse_stage(config: RunConfig, name: str, load: str):
    argv = stage_argv(config, name, load)
    try:
        return parse_args(argv)
    except ArgumentError as error:
        batch = argv[argv.index("--global-batch-size") + 1]
        raise TwoStageError(f"the {name} stage's flags (global batch {batch}) are refused by "
                            f"pretrain_patch_gpt.py: {error}") from None


def _data_parallel_size(config: RunConfig, args, stages: list[StageJob]) -> int:
    """pretrain_patch_gpt.py's world-size check, made here before anything starts."""
    world = config.launch.world_size
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world % (tp * pp):
        raise TwoStageError(f"{world} processes ({config.launch.nnodes} nodes x "
                            f"{config.launch.nproc_per_node}) cannot hold tensor x pipeline "
                            f"parallel size {tp * pp}: launch a multiple of {tp * pp} processes")
    dp = world // (tp * pp)
    for stage in stages:
        per_step = stage.micro_batch_size * dp
        if stage.plan.global_batch_size % per_step:
            multiple = config.patch_size * per_step
            raise TwoStageError(
                f"the {stage.name} stage's global batch of {stage.plan.global_batch_size} samples "
                f"is not divisible by micro-batch-size x data-parallel size = "
                f"{stage.micro_batch_size} x {dp}: lower --micro-batch-size, or make "
                f"--global-batch-size a multiple of K x {per_step} = {multiple}")
    return dp


def tokenizer_vocab_size(args) -> tuple[int | None, str | None]:
    """The unpadded vocabulary the stages will use (as their data pipeline takes it), or why it
    cannot be known here."""
    if args.mock_data and args.vocab_size is not None:
        return args.vocab_size, None
    from patch_megatron.data.tokenizers import build_tokenizer_from_args, tokenizer_info

    try:
        return tokenizer_info(build_tokenizer_from_args(args)).vocab_size, None
    except Exception as error:  # noqa: BLE001 - only the FLOPs need it; the stages report it again
        first_line = (str(error).splitlines() or [""])[0]
        return None, f"the tokenizer cannot be loaded here ({first_line})"


def _model_shape(args, vocab_size: int) -> flops.ModelShape:
    """The shape the stages build (padded vocabulary, default FFN), as their FLOPs logging sees it."""
    from patch_megatron.training.build import model_config
    from patch_megatron.training.metrics import model_shape

    return model_shape(model_config(args, vocab_size))


def plan_two_stage(config: RunConfig) -> TwoStagePlan:
    """Both stages' plans from the real parser; raises TwoStageError naming the fix."""
    _check_config(config)
    parsed = {
        PATCH_DIR: _parse_stage(config, PATCH_DIR, load=config.stage_dir(PATCH_DIR)),
        TOKEN_DIR: _parse_stage(config, TOKEN_DIR, load=config.stage_dir(HANDOFF_DIR)),
    }
    args = parsed[TOKEN_DIR]
    vocab, no_flops_reason = tokenizer_vocab_size(args)
    shape = _model_shape(args, vocab) if vocab is not None else None
    stages = []
    for name, stage_args in parsed.items():
        plan = stage_args.stage
        stage_flops = None
        if shape is not None:
            stage_flops = plan.train_iters * flops.training_flops_per_iteration(
                shape, plan.seq_length, plan.global_batch_size, plan.patch_size)
        stages.append(StageJob(name, plan, config.stage_dir(name), stage_args.micro_batch_size,
                               stage_flops))
    dp = _data_parallel_size(config, args, stages)
    return TwoStagePlan(config, *stages, args.tensor_model_parallel_size,
                        args.pipeline_model_parallel_size, dp, shape, no_flops_reason)


# ---------------------------------------------------------------------------
# Where a previous run stopped, and what runs now.

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


# ---------------------------------------------------------------------------
# Printing.

def _count(n) -> str:
    return f"{n:,}"


def _flops(value) -> str:
    return "n/a" if value is None else f"{value:.3e}"


def format_plan(plan: TwoStagePlan) -> str:
    config, launch = plan.config, plan.config.launch
    lam = config.patch_data_fraction
    lines = [
        f"Two-stage run: {_count(config.train_tokens)} tokens (--train-tokens), patch size "
        f"K={config.patch_size} on the first λ={lam:.4g} of them, then the token stage; "
        f"{_count(plan.token.plan.tokens_per_step)} tokens per step in both stages",
        f"World: {launch.world_size} processes ({launch.nnodes} node(s) x {launch.nproc_per_node}) "
        f"= TP {plan.tensor_parallel_size} x PP {plan.pipeline_parallel_size} x DP "
        f"{plan.data_parallel_size}; checkpoints under {config.save}",
        "",
        f"{'stage':<20}{'iterations':>12}{'batch (samples x tokens)':>26}{'tokens/step':>14}"
        f"{'tokens':>18}{'warmup':>8}{'FLOPs':>12}",
    ]
    for stage in (plan.patch, plan.token):
        p = stage.plan
        batch = f"{p.global_batch_size} x {p.tokens_per_sample}"
        lines.append(f"{stage.title:<20}{_count(p.train_iters):>12}{batch:>26}"
                     f"{_count(p.tokens_per_step):>14}{_count(p.train_tokens):>18}"
                     f"{p.lr_warmup_iters:>8}{_flops(stage.flops):>12}")
    lines.append(f"{'both':<20}{_count(plan.patch.plan.train_iters + plan.token.plan.train_iters):>12}"
                 f"{'':>26}{'':>14}{_count(plan.trained_tokens):>18}{'':>8}"
                 f"{_flops(plan.total_flops):>12}")
    lines.append("")
    if plan.shape is None:
        lines.append(f"FLOPs: not computed, {plan.no_flops_reason}")
    else:
        lines.append(f"Token-only training on the same {_count(plan.trained_tokens)} tokens: "
                     f"{_flops(plan.token_only_flops)} FLOPs. Cost ratio (FLOPs): "
                     f"{plan.cost_ratio:.4f}; the paper's λ/K + 1 - λ = {plan.paper_cost_ratio:.4f}")
    return "\n".join(lines)


def format_steps(steps: list[Step]) -> str:
    lines = []
    for number, step in enumerate(steps, 1):
        lines.append(f"[{number}/{len(steps)}] {step.name}: {step.action} ({step.note})")
        lines.append("    " + shlex.join(step.command))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Running.

def _process_environment(command: list[str], environ) -> dict:
    """A process started without torch.distributed.run is a world of one: give it a free local
    port, so that it never collides with another job's default port (or the launch's)."""
    if "torch.distributed.run" in command:
        return dict(environ)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _run_process(command: list[str], environ) -> int:
    """Run a stage; a SIGTERM to the runner goes on to it (it saves with --exit-signal-handler)."""
    process = subprocess.Popen(command, env=_process_environment(command, environ))
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_for_checkpoint(save_dir: str, iteration: int, timeout_s: float,
                        poll_s: float = POLL_SECONDS) -> bool:
    """Wait until ``save_dir``'s latest checkpoint is ``iteration`` (another node writes it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if read_latest_iteration(save_dir) == iteration:
                return True
        except CheckpointError:
            pass  # being written
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def run_steps(steps: list[Step], launch: Launch, print_fn=print, environ=os.environ,
              handoff_wait_s: float = HANDOFF_WAIT_SECONDS) -> None:
    """Run what is not done yet, in order; raises StageStopped or TwoStageError."""
    for number, step in enumerate(steps, 1):
        title = f"[{number}/{len(steps)}] {step.name}"
        if step.action == "skip":
            print_fn(f"{title}: skipped, {step.note}")
            continue
        save_dir = step.command[step.command.index("--save") + 1]
        if step.action == "wait":
            print_fn(f"{title}: {step.note}")
            if not wait_for_checkpoint(save_dir, 0, handoff_wait_s):
                raise TwoStageError(f"{save_dir} did not appear within {handoff_wait_s / 60:.0f} "
                                    "minutes: check node rank 0's output, and that --save is on a "
                                    "filesystem all nodes share")
            continue
        print_fn(f"{title}: {step.action} ({step.note})\n    {shlex.join(step.command)}")
        code = _run_process(step.command, environ)
        if code != 0:
            raise StageStopped(f"{step.name} failed (exit code {code}). Fix the cause and run the "
                               "same command again: finished steps are skipped and an interrupted "
                               "stage resumes from its last checkpoint")
        expected = step.expected_iteration if step.expected_iteration is not None else 0
        # Other nodes may see the shared filesystem's latest file a little later.
        settle_s = 60 if launch.node_rank else 0
        if not wait_for_checkpoint(save_dir, expected, settle_s, poll_s=5):
            found = saved_iteration(save_dir)
            raise StageStopped(f"{step.name} ended at iteration {found}, before its planned "
                               f"{expected} (an exit condition: --exit-interval, "
                               "--exit-duration-in-mins or a signal). Run the same command again "
                               "to continue it")
