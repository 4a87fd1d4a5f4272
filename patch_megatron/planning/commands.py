"""Ready-to-run command lines for a plan.

A plan with a patch stage is one ``tools/pretrain_two_stage.py`` command: the
runner parses both stages' pretrain_patch_gpt.py command lines, splits
``--train-tokens`` between them as the planner did (``stage_iterations``), runs
the patch stage, the handoff of its last iteration and the token stage, and
continues them when re-run. Its conventions:

* ``--seq-length`` is T, model positions (patches in the patch stage), so a
  patch-stage sample holds K·T tokens.
* ``--global-batch-size`` is the token stage's B; the patch stage runs B/K
  samples of K·T tokens, so both stages see the same tokens per step.
* The flags after the runner's own go to both stages: each stage warms up for
  ``--lr-warmup-iters`` steps and decays (cosine) over its own steps; the token
  stage starts from the handoff's weights with a fresh optimizer.

A token-only plan is one ``pretrain_patch_gpt.py`` command with its ``--train-iters``.
Node ranks and the rendezvous address belong to the cluster: the runner reads
them from Megatron-LM's variables (``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Optional

from patch_megatron.llama_recipe import ARCHITECTURE_FLAGS
from patch_megatron.planning.plan import ComputePlan

PRETRAIN_SCRIPT = "pretrain_patch_gpt.py"
RUNNER_SCRIPT = "tools/pretrain_two_stage.py"
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


def _nodes(gpus: Optional[int]) -> tuple[int, int]:
    """(processes per node, nodes) for ``gpus`` GPUs (one process without a GPU count)."""
    if gpus is None:
        return 1, 1
    nodes = math.ceil(gpus / GPUS_PER_NODE)
    return gpus // nodes, nodes


def _fmt(value: float) -> str:
    return repr(float(value)) if value not in (0, 0.0) else "0.0"


def pretrain_args(plan: ComputePlan, options: CommandOptions) -> list[str]:
    """The flags of every stage: model, optimizer, parallelism, data."""
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
    return args + [
        "--seq-length", str(t),
        "--max-position-embeddings", str(t),
        "--micro-batch-size", str(plan.inputs.micro_batch_size),
        "--lr", _fmt(shape.lr),
        "--min-lr", _fmt(options.min_lr),
        "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(plan.stages[0].warmup_iters),
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
        "--seed", str(options.seed),
    ]


def build_commands(plan: ComputePlan, options: CommandOptions = CommandOptions()) -> list[Command]:
    """The command that runs the plan (one: the runner, or token-only training)."""
    per_node, nodes = _nodes(plan.inputs.gpus)
    run_dir = options.run_dir.rstrip("/")
    if not plan.uses_patch_stage:
        (stage,) = plan.stages
        launcher = ["python"] if plan.inputs.gpus is None else [
            "torchrun", f"--nproc-per-node={per_node}", *([f"--nnodes={nodes}"] if nodes > 1 else [])]
        return [Command("token-only", launcher, PRETRAIN_SCRIPT, [
            *pretrain_args(plan, options), "--global-batch-size", str(stage.global_batch_size),
            "--train-iters", str(stage.train_iters), "--patch-size", "1",
            "--save", f"{run_dir}/token_only"])]
    runner = [
        "--train-tokens", str(plan.total_iters * plan.global_batch_size * plan.inputs.seq_length),
        "--patch-size", str(plan.inputs.patch_size),
        "--patch-data-fraction", _fmt(plan.inputs.patch_fraction),
        "--global-batch-size", str(plan.global_batch_size),
        "--save", run_dir,
        "--nproc-per-node", str(per_node), "--nnodes", str(nodes),
    ]
    return [Command("two-stage run", ["python"], RUNNER_SCRIPT,
                    runner + pretrain_args(plan, options))]
