"""Ready-to-run command lines for a plan: pretrain_patch_gpt.py per stage and
the patch-to-token converter between them.

Conventions of pretrain_patch_gpt.py followed here:
* ``--seq-length`` is T, model positions (patches in the patch stage), so a
  patch-stage sample holds K·T tokens.
* ``--global-batch-size`` and ``--train-iters`` are this stage's samples per
  step and steps (Megatron-LM's meaning). Both stages see the same tokens
  per step, so the patch stage's batch is B/K samples of K·T tokens where
  the token stage has B samples of T tokens.
* ``--patch-data-fraction λ`` on both; ``--patch-size`` is K in the patch
  stage and 1 in the token stage. With λ > 0 the token stage skips the data
  the patch stage read, which it locates as its own tokens · λ/(1-λ); the
  planner's step split keeps that at or past the patch stage's end.
* Each stage has its own warmup (``--lr-warmup-iters``, per command) + cosine
  over its own steps; the token stage starts from the converter's
  weights-only checkpoint.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Optional

from patch_megatron.planning.plan import ComputePlan, PlannedStage
from patch_megatron.llama_recipe import ARCHITECTURE_FLAGS

PRETRAIN_SCRIPT = "pretrain_patch_gpt.py"
CONVERTER_SCRIPT = "tools/convert_patch_to_token.py"
GPUS_PER_NODE = 8


@dataclass
class CommandOptions:
    data_path: str = "data/pile_text_document"
    tokenizer_type: str = "GPTSentencePieceTokenizer"
    tokenizer_model: str = "tokenizer.model"
    run_dir: str = "runs/plan"
    split: str = "99,1,0"
    seed: int = 1234
    # The paper's optimiser settings (docs/method.md §1).
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    min_lr: float = 0.0  # cosine to 0, as in the paper


@dataclass
class Command:
    name: str
    launcher: list[str]  # e.g. ["torchrun", "--nproc-per-node=8"] or ["python"]
    script: str
    args: list[str]  # what the script's own argument parser receives

    def shell(self) -> str:
        return shlex.join(self.launcher + [self.script] + self.args)


def _launcher(gpus: Optional[int]) -> list[str]:
    if gpus is None or gpus == 1:
        return ["python"] if gpus is None else ["torchrun", "--nproc-per-node=1"]
    nodes = math.ceil(gpus / GPUS_PER_NODE)
    per_node = gpus // nodes
    launcher = ["torchrun", f"--nproc-per-node={per_node}"]
    if nodes > 1:
        # Each node also needs its --node-rank and a rendezvous address; those
        # belong to the cluster, not to the plan.
        launcher.append(f"--nnodes={nodes}")
    return launcher


def _fmt(value: float) -> str:
    return repr(float(value)) if value not in (0, 0.0) else "0.0"


def stage_args(plan: ComputePlan, stage: PlannedStage, options: CommandOptions, save: str, load: Optional[str]) -> list[str]:
    shape = plan.shape
    t = plan.inputs.seq_length
    args = [
        "--num-layers", str(shape.num_layers),
        "--hidden-size", str(shape.hidden_size),
        "--ffn-hidden-size", str(shape.ffn_hidden_size),
        "--num-attention-heads", str(shape.num_attention_heads),
    ]
    args += list(ARCHITECTURE_FLAGS)  # the paper's LLaMA decoder (Megatron-LM's default is GPT-3's)
    if shape.num_query_groups != shape.num_attention_heads:
        args += ["--group-query-attention", "--num-query-groups", str(shape.num_query_groups)]
    args += [
        "--seq-length", str(t),
        "--max-position-embeddings", str(t),
        "--micro-batch-size", str(plan.inputs.micro_batch_size),
        "--global-batch-size", str(stage.global_batch_size),
        "--train-iters", str(stage.train_iters),
        "--lr", _fmt(shape.lr),
        "--min-lr", _fmt(options.min_lr),
        "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(stage.warmup_iters),
        "--weight-decay", _fmt(options.weight_decay),
        "--adam-beta1", _fmt(options.adam_beta1),
        "--adam-beta2", _fmt(options.adam_beta2),
        "--clip-grad", _fmt(options.clip_grad),
        "--bf16",
        "--tensor-model-parallel-size", str(shape.tensor_model_parallel_size),
        "--pipeline-model-parallel-size", str(shape.pipeline_model_parallel_size),
        "--data-path", options.data_path,
        "--split", options.split,
        "--tokenizer-type", options.tokenizer_type,
        "--tokenizer-model", options.tokenizer_model,
        "--save", save,
    ]
    if load is not None:
        args += ["--load", load]
    args += ["--seed", str(options.seed)]
    args += ["--patch-size", str(stage.patch_size)]
    if plan.uses_patch_stage:
        args += ["--patch-data-fraction", _fmt(plan.inputs.patch_fraction)]
    return args


def build_commands(plan: ComputePlan, options: CommandOptions = CommandOptions()) -> list[Command]:
    """Commands in the order to run them."""
    launcher = _launcher(plan.inputs.gpus)
    run_dir = options.run_dir.rstrip("/")
    if not plan.uses_patch_stage:
        (stage,) = plan.stages
        save = f"{run_dir}/token_only"
        return [Command("token-only", launcher, PRETRAIN_SCRIPT, stage_args(plan, stage, options, save, None))]
    patch_stage, token_stage = plan.stages
    patch_save = f"{run_dir}/patch_stage"
    token_init = f"{run_dir}/token_init"
    token_save = f"{run_dir}/token_stage"
    return [
        Command("patch stage", launcher, PRETRAIN_SCRIPT,
                stage_args(plan, patch_stage, options, patch_save, None)),
        Command("convert", ["python"], CONVERTER_SCRIPT, ["--load", patch_save, "--save", token_init]),
        Command("token stage", launcher, PRETRAIN_SCRIPT,
                stage_args(plan, token_stage, options, token_save, token_init)),
    ]
