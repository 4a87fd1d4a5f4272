"""The plan of a two-stage run: both stages' command lines, schedules and FLOPs.

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
import sys
from dataclasses import dataclass

from patch_megatron import flops
from patch_megatron.model.shape import ModelShape
from patch_megatron.training.arguments import ArgumentError, StagePlan, model_shape, parse_args
from patch_megatron.stage import Stage

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


class TwoStageError(ValueError):
    """A flag, plan or directory problem; the message names the fix."""


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


@dataclass(frozen=True)
class StageJob:
    name: Stage
    plan: StagePlan  # what pretrain_patch_gpt.py's parser derived from the argv
    save_dir: str
    micro_batch_size: int
    flops: float | None  # training FLOPs of all its iterations; None without a vocabulary

    @property
    def title(self) -> str:
        return f"patch stage (K={self.plan.patch_size})" if self.name == Stage.PATCH else "token stage"


@dataclass(frozen=True)
class TwoStagePlan:
    config: RunConfig
    patch: StageJob
    token: StageJob
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    shape: ModelShape | None
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


def plan_two_stage(config: RunConfig) -> TwoStagePlan:
    """Both stages' plans from the real parser; raises TwoStageError naming the fix."""
    _check_config(config)
    parsed = {
        PATCH_DIR: _parse_stage(config, PATCH_DIR, load=config.stage_dir(PATCH_DIR)),
        TOKEN_DIR: _parse_stage(config, TOKEN_DIR, load=config.stage_dir(HANDOFF_DIR)),
    }
    args = parsed[TOKEN_DIR]
    vocab, no_flops_reason = tokenizer_vocab_size(args)
    shape = model_shape(args, vocab) if vocab is not None else None
    stages = []
    for name, stage_args in parsed.items():
        plan = stage_args.stage
        stage_flops = None
        if shape is not None:
            stage_flops = plan.train_iters * flops.training_flops_per_iteration(
                shape, plan.seq_length, plan.global_batch_size, plan.patch_size)
        stages.append(StageJob(plan.name, plan, config.stage_dir(name), stage_args.micro_batch_size,
                               stage_flops))
    dp = _data_parallel_size(config, args, stages)
    return TwoStagePlan(config, *stages, args.tensor_model_parallel_size,
                        args.pipeline_model_parallel_size, dp, shape, no_flops_reason)


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
