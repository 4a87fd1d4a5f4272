"""The FLOPs behind the loop's TFLOP/s and MFU are patch_megatron.flops' and the planner's.

The loop's figure is taken the way pretrain_patch_gpt.py takes it: flags ->
StagePlan and model config (vocabulary padded as the model pads it) -> the
shape and ``metrics.step_flops``. Compared unrounded, not through the log text.
"""

import pytest

from repo_tools import load_tool
from patch_megatron.two_stage.plan import PATCH_DIR, TOKEN_DIR, RunConfig, launch_defaults, stage_argv
from patch_megatron.flops import training_flops_per_iteration
from patch_megatron.model.shape import llama_shape
from patch_megatron.planning.commands import build_commands
from patch_megatron.planning.plan import PlanInputs, compute_plan
from patch_megatron.training import build, metrics
from patch_megatron.training.arguments import parse_args
from patch_megatron.llama_recipe import RECIPE_FLAGS

PAPER_370M = ("--num-layers 24 --hidden-size 1024 --ffn-hidden-size 2752 --num-attention-heads 16 "
              "--seq-length 2048 --micro-batch-size 2 --train-iters 10 --bf16 --lr 3e-4").split() \
    + list(RECIPE_FLAGS)


def loop_step_flops(argv, vocab_size):
    """FLOPs per iteration as the training loop counts them for this command line."""
    args = parse_args(argv)
    config = build.model_config(args, vocab_size)
    return metrics.step_flops(args.stage, config.shape)


@pytest.mark.parametrize("gqa", [[], ["--group-query-attention", "--num-query-groups", "4"]],
                         ids=["MHA", "GQA"])
@pytest.mark.parametrize("stage", [
    ["--patch-size", "1", "--global-batch-size", "8"],
    ["--patch-size", "4", "--patch-data-fraction", "0.667", "--global-batch-size", "2"],
], ids=["token", "patch K=4"])
@pytest.mark.parametrize("tp", [1, 2])
def test_loop_counts_what_patch_megatron_flops_counts(gqa, stage, tp):
    # Vocabulary 32001 pads to 32128 (TP=1) or 32256 (TP=2): the head's FLOPs use the padded rows.
    argv = PAPER_370M + stage + gqa + ["--mock-data", "--vocab-size", "32001",
                                       "--tensor-model-parallel-size", str(tp)]
    padded = {1: 32128, 2: 32256}[tp]
    groups = 4 if gqa else 16
    K, batch = (1, 8) if stage[1] == "1" else (4, 2)
    shape = llama_shape(num_layers=24, hidden_size=1024, ffn_hidden_size=2752,
                        num_attention_heads=16, num_query_groups=groups, vocab_size=padded)
    expected = training_flops_per_iteration(shape, 2048, batch, K)
    assert loop_step_flops(argv, 32001) == pytest.approx(expected, rel=1e-12)


def test_patch_stage_step_costs_one_kth_of_the_token_stage_per_token():
    # Same tokens per step (16384): the patch stage runs 2 samples of 4*2048 tokens, the
    # token stage 8 of 2048, through the same T=2048 positions: exactly 1/4 of the FLOPs.
    common = PAPER_370M + ["--mock-data", "--vocab-size", "32000"]
    token = loop_step_flops(common + ["--global-batch-size", "8"], 32000)
    patch = loop_step_flops(common + ["--patch-size", "4", "--patch-data-fraction", "0.667",
                                      "--global-batch-size", "2"], 32000)
    assert patch == pytest.approx(token / 4, rel=1e-12)


@pytest.mark.parametrize("parameters", [370e6, 22e9], ids=["370M (MHA)", "22B (GQA, TP=4, PP=2)"])
def test_loop_counts_what_the_planner_planned_for_its_own_commands(parameters):
    plan = compute_plan(PlanInputs(parameters=parameters, tokens=20 * parameters, patch_size=4))
    assert (plan.shape.num_query_groups != plan.shape.num_attention_heads) == (parameters > 1e9)
    (command,) = build_commands(plan)  # the two-stage runner's, which writes each stage's flags
    runner = load_tool("pretrain_two_stage")
    flags, passthrough = runner.build_parser(launch_defaults({})).parse_known_args(command.args)
    config = RunConfig(train_tokens=flags.train_tokens, patch_size=flags.patch_size,
                       patch_data_fraction=flags.patch_data_fraction,
                       global_batch_size=flags.global_batch_size, save=flags.save,
                       passthrough=tuple(passthrough))
    for name, stage in zip((PATCH_DIR, TOKEN_DIR), plan.stages):
        # The loop pads the tokenizer's vocabulary itself, from the command's TP.
        per_step = loop_step_flops(stage_argv(config, name, load=flags.save), plan.inputs.vocab_size)
        assert per_step == pytest.approx(stage.flops / stage.train_iters, rel=1e-12), stage.name
