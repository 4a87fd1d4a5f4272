"""The two-stage runner's plan, steps and checks (no training processes; those are in
tests/tools/test_pretrain_two_stage.py)."""

import os
import sys

from dataclasses import replace

import pytest
import torch

from patch_megatron.model.shape import llama_shape
from patch_megatron import flops
from patch_megatron.two_stage.launch import StageStopped, run_steps
from patch_megatron.two_stage.plan import Launch, PATCH_DIR, RunConfig, TOKEN_DIR, TwoStageError, format_plan, launch_defaults, plan_two_stage, stage_argv
from patch_megatron.two_stage.progress import Step, next_steps
from patch_megatron.training.arguments import parse_args
from patch_megatron.llama_recipe import RECIPE_FLAGS

# A tiny model: T=8 positions, token-stage batch B=8 samples -> 64 tokens per step.
MODEL = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
         "--seq-length 8 --micro-batch-size 2 --mock-data --vocab-size 100 --eval-iters 0 "
         "--lr 3e-4").split() + list(RECIPE_FLAGS)
TWO_THIRDS = 2 / 3
STEP_TOKENS = 64


def config(tmp_path, *, tokens=3 * STEP_TOKENS * 10, K=4, lam=TWO_THIRDS, B=8, extra=(),
           launch=Launch()):
    return RunConfig(train_tokens=tokens, patch_size=K, patch_data_fraction=lam,
                               global_batch_size=B, save=str(tmp_path / "run"),
                               passthrough=tuple(MODEL) + tuple(extra), launch=launch)


def test_plan_splits_the_budget_with_equal_tokens_per_step(tmp_path):
    plan = plan_two_stage(config(tmp_path, extra=("--lr-warmup-iters", "3")))
    patch, token = plan.patch.plan, plan.token.plan
    assert (patch.name, patch.patch_size, patch.global_batch_size) == ("patch", 4, 2)  # B/K
    assert (token.name, token.patch_size, token.global_batch_size) == ("token", 1, 8)
    assert patch.tokens_per_step == token.tokens_per_step == STEP_TOKENS
    assert (patch.train_iters, token.train_iters) == (20, 10)  # 2/3 and 1/3 of 30 steps
    assert patch.lr_warmup_iters == token.lr_warmup_iters == 3  # each stage warms up
    assert token.data_start_token == patch.train_tokens  # the token stage reads the rest
    assert plan.trained_tokens == 3 * STEP_TOKENS * 10
    assert plan.data_parallel_size == 1
    assert plan.patch.save_dir == str(tmp_path / "run" / "patch")
    assert plan.token.save_dir == str(tmp_path / "run" / "token")


def test_cost_ratio_is_one_half_at_k4_two_thirds_from_the_real_flops(tmp_path):
    plan = plan_two_stage(config(tmp_path))
    shape = llama_shape(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                        vocab_size=128, max_position_embeddings=8,  # 100 padded to 128
                        untie_embeddings_and_output_weights=False)
    assert plan.shape == shape
    per_token_step = flops.training_flops_per_iteration(shape, 8, 8, patch_size=1)
    per_patch_step = flops.training_flops_per_iteration(shape, 8, 2, patch_size=4)
    assert plan.patch.flops == pytest.approx(20 * per_patch_step)
    assert plan.token.flops == pytest.approx(10 * per_token_step)
    assert plan.token_only_flops == pytest.approx(30 * per_token_step)
    assert plan.cost_ratio == pytest.approx(0.5, abs=1e-12)
    assert plan.paper_cost_ratio == pytest.approx(0.5)
    other = plan_two_stage(config(tmp_path, K=2, lam=0.5, tokens=2 * STEP_TOKENS * 10))
    assert other.cost_ratio == pytest.approx(0.75, abs=1e-12)


def test_plan_numbers_are_what_the_real_parser_derives_from_the_commands(tmp_path):
    plan = plan_two_stage(config(tmp_path, extra=("--lr-warmup-fraction", "0.1")))
    steps = next_steps(plan, repo="REPO", python="python")
    patch_cmd, convert_cmd, token_cmd = (step.command for step in steps)
    for command, stage in ((patch_cmd, plan.patch), (token_cmd, plan.token)):
        assert command[:2] == ["python", os.path.join("REPO", "pretrain_patch_gpt.py")]
        assert parse_args(command[2:]).stage == stage.plan
    assert convert_cmd[1] == os.path.join("REPO", "tools", "convert_patch_to_token.py")
    assert convert_cmd[convert_cmd.index("--iteration") + 1] == "20"
    text = format_plan(plan)
    assert "patch stage (K=4)" in text and "Cost ratio (FLOPs): 0.5000" in text
    assert "λ/K + 1 - λ = 0.5000" in text


@pytest.mark.parametrize("changes, message", [
    (dict(B=10), "--global-batch-size 10 is not divisible by --patch-size 4"),
    (dict(K=1), "--patch-size 1 has no patch stage"),
    (dict(lam=1.0), "0 < λ < 1"),
    (dict(lam=0.0), "0 < λ < 1"),
    (dict(extra=("--train-iters", "5")), "--train-iters cannot be passed"),
    (dict(extra=("--load=ckpt",)), "--load cannot be passed"),
    (dict(extra=("--lr-decay-iters", "5")), "each stage decays over its own iterations"),
    (dict(tokens=60), "the patch stage's flags (global batch 2) are refused by "
                      "pretrain_patch_gpt.py: the patch stage gets no full step"),
    (dict(tokens=100), "the token stage gets no full step of 64 tokens"),
    (dict(extra=("--lr-warmup-iters", "15")), "warmup of 15 steps (120 samples) does not fit"),
    # B/K = 2 samples cannot spread over micro-batch 2 x DP 2
    (dict(launch=Launch(nproc_per_node=2)),
     "the patch stage's global batch of 2 samples is not divisible by micro-batch-size x "
     "data-parallel size = 2 x 2"),
    (dict(launch=Launch(nproc_per_node=3), extra=("--tensor-model-parallel-size", "2")),
     "3 processes (1 nodes x 3) cannot hold tensor x pipeline parallel size 2"),
    (dict(launch=Launch(nnodes=2, node_rank=2)), "0 <= --node-rank < --nnodes"),
])
def test_bad_plans_are_refused_with_the_fix(tmp_path, changes, message):
    with pytest.raises(TwoStageError) as error:
        plan_two_stage(config(tmp_path, **changes))
    assert message in str(error.value)
    assert not os.path.exists(tmp_path / "run")  # nothing was written


def test_batch_fix_names_the_multiple_to_use(tmp_path):
    with pytest.raises(TwoStageError, match=r"multiple of K x 4 = 16"):
        plan_two_stage(config(tmp_path, launch=Launch(nproc_per_node=2)))
    plan = plan_two_stage(config(tmp_path, B=16, tokens=3 * 128 * 10,
                                      launch=Launch(nproc_per_node=2)))
    assert plan.data_parallel_size == 2 and plan.patch.plan.global_batch_size == 4


def test_launch_commands_and_megatron_environment_defaults():
    one = Launch()
    assert one.command("pretrain.py", ["--x"], python="py") == ["py", "pretrain.py", "--x"]
    defaults = launch_defaults({"GPUS_PER_NODE": "8", "NNODES": "4", "NODE_RANK": "3",
                                          "MASTER_ADDR": "node0", "MASTER_PORT": "7000"})
    many = Launch(**defaults)
    assert many.world_size == 32
    assert many.command("pretrain.py", ["--x"], python="py") == [
        "py", "-m", "torch.distributed.run", "--nproc-per-node=8", "--nnodes=4", "--node-rank=3",
        "--master-addr=node0", "--master-port=7000", "pretrain.py", "--x"]
    assert launch_defaults({}) == dict(nproc_per_node=1, nnodes=1, node_rank=0,
                                                 master_addr="localhost", master_port=6000)
    with pytest.raises(TwoStageError, match="NNODES='two' is not a whole number"):
        launch_defaults({"NNODES": "two"})


# ---------------------------------------------------------------------------
# Where a previous run stopped: fake checkpoints hold what the runner reads
# (the latest file and the record in common.pt).

SHAPE = {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
         "num_query_groups": 4, "vocab_size": 128, "untie_embeddings_and_output_weights": True}


def fake_checkpoint(save_dir, iteration, record):
    from patch_megatron.training.checkpoint_record import to_common

    path = save_dir / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    torch.save(to_common(replace(record, iteration=iteration)), path / "common.pt")
    (save_dir / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def stage_records(plan, stage, **changes):
    from patch_megatron.training.checkpoint_record import CheckpointRecord

    flags = {"patch_size": stage.plan.patch_size, "patch_data_fraction": TWO_THIRDS,
             "train_tokens": plan.config.train_tokens,
             "global_batch_size": stage.plan.global_batch_size, "seq_length": 8}
    return CheckpointRecord(iteration=0, patch_size=stage.plan.patch_size, model_shape=SHAPE,
                            tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                            flags={**flags, **changes})


def handoff_records(plan, iteration):
    from patch_megatron.training.checkpoint_record import CheckpointRecord

    return CheckpointRecord(iteration=0, patch_size=1, model_shape=SHAPE,
                            tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                            weights_only=True, optimizer_format=None, has_rng=False,
                            data_position={"iteration": iteration, "patch_size": 4,
                                           "train_tokens": plan.config.train_tokens,
                                           "patch_data_fraction": TWO_THIRDS})


def actions(steps):
    return [step.action for step in steps]


def load_of(step):
    return step.command[step.command.index("--load") + 1]


def test_fresh_run_starts_every_step_and_each_stage_loads_its_own_directory(tmp_path):
    plan = plan_two_stage(config(tmp_path))
    steps = next_steps(plan, "REPO")
    assert actions(steps) == ["run", "run", "run"]
    assert load_of(steps[0]) == plan.patch.save_dir  # resumes itself when re-run
    assert load_of(steps[2]) == plan.handoff_dir  # the converted weights
    assert [s.expected_iteration for s in steps] == [20, None, 10]


def test_rerun_resumes_skips_and_continues_from_the_right_directory(tmp_path):
    plan = plan_two_stage(config(tmp_path))
    run = tmp_path / "run"
    fake_checkpoint(run / "patch", 12, stage_records(plan, plan.patch))
    steps = next_steps(plan, "REPO")
    assert actions(steps) == ["resume", "run", "run"] and "from iteration 12 of 20" in steps[0].note

    (run / "patch" / "latest_checkpointed_iteration.txt").write_text("20")
    fake_checkpoint(run / "patch", 20, stage_records(plan, plan.patch))
    fake_checkpoint(run / "token_init", 0, handoff_records(plan, 20))
    steps = next_steps(plan, "REPO")
    assert actions(steps) == ["skip", "skip", "run"] and load_of(steps[2]) == plan.handoff_dir

    fake_checkpoint(run / "token", 4, stage_records(plan, plan.token))
    steps = next_steps(plan, "REPO")
    assert actions(steps) == ["skip", "skip", "resume"] and load_of(steps[2]) == plan.token.save_dir

    fake_checkpoint(run / "token", 10, stage_records(plan, plan.token))
    assert actions(next_steps(plan, "REPO")) == ["skip", "skip", "skip"]


def test_other_nodes_wait_for_node_rank_0s_handoff(tmp_path):
    plan = plan_two_stage(config(tmp_path, B=16, tokens=3 * 128 * 10,
                                      launch=Launch(nnodes=2, node_rank=1)))
    steps = next_steps(plan, "REPO")
    assert actions(steps) == ["run", "wait", "run"]
    assert "--node-rank=1" in steps[0].command and "shared filesystem" in steps[1].note


@pytest.mark.parametrize("setup, message", [
    (lambda run, plan: fake_checkpoint(run / "patch", 5, stage_records(plan, plan.patch,
                                                                      train_tokens=999)),
     "belongs to another plan (train_tokens 999 there, 1920 now)"),
    (lambda run, plan: fake_checkpoint(run / "patch", 25, stage_records(plan, plan.patch)),
     "holds iteration 25, past the patch stage's planned 20"),
    (lambda run, plan: fake_checkpoint(run / "token_init", 0, handoff_records(plan, 20)),
     "has not reached its planned iteration 20"),
    (lambda run, plan: (fake_checkpoint(run / "patch", 20, stage_records(plan, plan.patch)),
                        fake_checkpoint(run / "token_init", 0, handoff_records(plan, 16))),
     "token_init belongs to another plan (iteration 16 there, 20 now)"),
])
def test_checkpoints_of_another_run_are_refused_and_kept(tmp_path, setup, message):
    plan = plan_two_stage(config(tmp_path))
    setup(tmp_path / "run", plan)
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(TwoStageError) as error:
        next_steps(plan, "REPO")
    assert message in str(error.value) and "new --save directory" in str(error.value)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


# ---------------------------------------------------------------------------
# Running: plain python commands stand in for the stages.

def writes_latest(save_dir, iteration, code=0):
    script = (f"import os, sys; os.makedirs({str(save_dir)!r}, exist_ok=True); "
              f"open(os.path.join({str(save_dir)!r}, 'latest_checkpointed_iteration.txt'), 'w')"
              f".write('{iteration}'); sys.exit({code})")
    return [sys.executable, "-c", script, "--save", str(save_dir)]


def test_run_steps_stops_when_a_stage_ends_early_or_fails(tmp_path):
    launch, out = Launch(), []
    done = Step("patch stage", "run", "", writes_latest(tmp_path / "a", 4), 4)
    run_steps([done], launch, print_fn=out.append)
    assert "[1/1] patch stage: run" in out[0]

    early = Step("patch stage", "run", "", writes_latest(tmp_path / "b", 2), 4)
    with pytest.raises(StageStopped, match="ended at iteration 2, before its planned 4"):
        run_steps([early], launch, print_fn=out.append)

    failed = Step("token stage", "run", "", writes_latest(tmp_path / "c", 1, code=3), 9)
    never = Step("never", "run", "", writes_latest(tmp_path / "d", 1), 1)
    with pytest.raises(StageStopped, match="token stage failed .exit code 3."):
        run_steps([failed, never], launch, print_fn=out.append)
    assert not (tmp_path / "d").exists()


def test_waiting_node_times_out_with_the_fix(tmp_path):
    wait = Step("handoff", "wait", "", ["convert", "--save", str(tmp_path / "init")])
    with pytest.raises(TwoStageError, match="filesystem all nodes share"):
        run_steps([wait], Launch(nnodes=2, node_rank=1), print_fn=lambda _: None,
                            handoff_wait_s=0)
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "latest_checkpointed_iteration.txt").write_text("0")
    run_steps([wait], Launch(nnodes=2, node_rank=1), print_fn=lambda _: None,
                        handoff_wait_s=0)


@pytest.mark.parametrize("flags", [["--tensorboard-dir", "tb"], ["--tensorboard-dir=tb"]])
def test_each_stage_writes_tensorboard_into_its_own_folder(tmp_path, flags):
    cfg = config(tmp_path, extra=tuple(flags))
    for stage in (PATCH_DIR, TOKEN_DIR):
        argv = stage_argv(cfg, stage, cfg.stage_dir(stage))
        assert parse_args(argv).tensorboard_dir == os.path.join("tb", stage)
