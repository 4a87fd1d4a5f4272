"""tools/pretrain_two_stage.py end to end on CPU, and the examples' launch scripts against the
real parser."""

import os
import shlex
import subprocess
import sys

import pytest

from repo_tools import IN_PROCESS_READING, REPO_ROOT, load_tool
from patch_megatron.training.arguments import parse_args
from patch_megatron.training.log_reading import runner_seconds, runner_sections
from patch_megatron.llama_recipe import RECIPE_FLAGS

runner = load_tool("pretrain_two_stage")

# K=4, λ=2/3 of 384 tokens at 64 tokens per step: the patch stage runs 4 steps of 2 samples of
# 4x8 tokens, the token stage 2 steps of 8 samples of 8 tokens.
TINY = ("--train-tokens 384 --patch-size 4 --patch-data-fraction 0.6666666666666666 "
        "--global-batch-size 8 --num-layers 2 --hidden-size 32 --num-attention-heads 4 "
        "--ffn-hidden-size 64 --seq-length 8 --micro-batch-size 2 --mock-data --vocab-size 64 "
        "--eval-iters 0 --log-interval 1 --lr-warmup-iters 1 --cpu --lr 3e-4").split() + list(RECIPE_FLAGS) + list(IN_PROCESS_READING)
NODE_VARIABLES = ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def quiet_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    for name in NODE_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def with_flag(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = str(value)
    return argv


def latest(path):
    return int((path / "latest_checkpointed_iteration.txt").read_text())


def test_both_stages_run_on_cpu_and_a_rerun_skips_them(tmp_path, capfd, quiet_env):
    run = tmp_path / "run"
    assert runner.main([*TINY, "--save", str(run)]) == 0
    out = capfd.readouterr().out
    assert (latest(run / "patch"), latest(run / "token_init"), latest(run / "token")) == (4, 0, 2)
    for directory in ("patch/iter_0000004", "token_init/iter_0000000", "token/iter_0000002"):
        assert (run / directory / "common.pt").is_file(), directory
    assert out.count("patch loss:") == 4 and out.count("lm loss:") == 2
    assert f"loaded {run}/token_init/iter_0000000 (iteration 0); weights only" in out
    assert "Cost ratio (FLOPs): 0.5000" in out
    # What the quickstart and the benchmarks read back from the runner's output.
    sections, seconds = runner_sections(out), runner_seconds(out)
    assert list(sections) == ["patch stage", "handoff", "token stage"] == list(seconds)
    assert sections["patch stage"].count("patch loss:") == 4 and "lm loss:" not in sections["patch stage"]
    assert sections["token stage"].count("lm loss:") == 2 and "patch loss:" not in sections["token stage"]
    assert all(s > 0 for s in seconds.values())

    stamps = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert runner.main([*TINY, "--save", str(run)]) == 0
    again = capfd.readouterr().out
    assert again.count("skipped, done") == 3
    assert "loss:" not in again  # no stage ran
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == stamps


def test_dry_run_prints_the_plan_and_commands_of_every_node_and_runs_nothing(tmp_path, capsys,
                                                                              quiet_env,
                                                                              monkeypatch):
    for name, value in dict(GPUS_PER_NODE="2", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0",
                            MASTER_PORT="7000").items():
        monkeypatch.setenv(name, value)
    # B=32 spreads over micro-batch 2 x DP 4 in the patch stage too (B/K = 8)
    argv = with_flag(with_flag(TINY, "--global-batch-size", 32), "--train-tokens", 3 * 256 * 5)
    assert runner.main([*argv, "--save", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert "World: 4 processes (2 node(s) x 2) = TP 1 x PP 1 x DP 4" in out
    assert "[2/3] handoff: wait (node rank 0 converts" in out
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("    ")]
    patch, convert, token = commands
    for command, iterations, batch in ((patch, 10, 8), (token, 5, 32)):
        launcher = command[:command.index(os.path.join(REPO_ROOT, "pretrain_patch_gpt.py"))]
        assert launcher[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=2",
                                "--node-rank=1", "--master-addr=node0", "--master-port=7000"]
        stage = parse_args(command[len(launcher) + 1:]).stage
        assert (stage.train_iters, stage.global_batch_size, stage.tokens_per_step) == \
            (iterations, batch, 256)
    assert convert[convert.index("--iteration") + 1] == "10"


def test_bad_flags_exit_2_naming_the_fix_and_write_nothing(tmp_path, capsys, quiet_env):
    argv = with_flag(TINY, "--global-batch-size", 10)  # not a multiple of K=4
    assert runner.main([*argv, "--save", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "--global-batch-size 10 is not divisible by --patch-size 4" in err
    assert "e.g. 8 or 12" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# examples/pretrain_llama_*.sh in DRY_RUN mode.

# The paper's model table (docs/method.md §1): hidden, ffn, layers, heads.
PAPER_MODELS = {
    "370m": (1024, 2752, 24, 16),
    "780m": (1536, 4128, 24, 16),
    "1.3b": (2048, 5504, 24, 16),
    "2.7b": (2560, 6880, 32, 32),
}
TWO_MILLION_TOKENS = 1024 * 2048


def dry_run(script, tmp_path, **env):
    environment = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                   "CHECKPOINT_DIR": str(tmp_path / "ckpt"), **env}
    for name in NODE_VARIABLES:
        if name not in env:
            environment.pop(name, None)
    result = subprocess.run(["bash", os.path.join(REPO_ROOT, "examples", script)],
                            capture_output=True, text=True, env=environment, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


# The paper's budget split by hand: 2/3 of 360B tokens at 2M tokens per step.
PATCH_ITERS = round(360_000_000_000 * 2 / 3) // TWO_MILLION_TOKENS


@pytest.mark.parametrize("size, nodes", [
    ("370m", {}),
    ("780m", {}),
    ("1.3b", {"NNODES": "4", "NODE_RANK": "0", "MASTER_ADDR": "node0"}),
    ("2.7b", {"NNODES": "4", "NODE_RANK": "2", "MASTER_ADDR": "node0"}),  # waits for rank 0
])
def test_example_scripts_are_one_runner_command_with_the_papers_recipe(tmp_path, size, nodes):
    # Resuming, skipping and waiting are the runner's (tests/two_stage); the scripts are its flags.
    checkpoints = tmp_path / "ckpt"
    out = dry_run(f"pretrain_llama_{size}.sh", tmp_path, **nodes)
    steps = [line.split(": ", 1) for line in out.splitlines() if line.startswith("[")]
    assert [name.split("] ")[1] for name, _ in steps] == ["patch stage", "handoff", "token stage"]
    handoff_action = steps[1][1].split(" ")[0]
    assert handoff_action == ("run" if nodes.get("NODE_RANK", "0") == "0" else "wait")
    commands = [shlex.split(line) for line in out.splitlines() if line.startswith("    ")]
    pretrain = os.path.join(REPO_ROOT, "pretrain_patch_gpt.py")
    parsed = []
    for command in (commands[0], commands[2]):
        script = command.index(pretrain)
        launcher = dict(flag.split("=", 1) for flag in command[3:script])
        assert command[1:3] == ["-m", "torch.distributed.run"]
        assert launcher == {"--nproc-per-node": "8", "--nnodes": nodes.get("NNODES", "1"),
                            "--node-rank": nodes.get("NODE_RANK", "0"),
                            "--master-addr": nodes.get("MASTER_ADDR", "localhost"),
                            "--master-port": "6000"}
        parsed.append(parse_args(command[script + 1:]))
    for args in parsed:
        shape = (args.hidden_size, args.ffn_hidden_size, args.num_layers, args.num_attention_heads)
        assert shape == PAPER_MODELS[size]
        assert args.untie_embeddings_and_output_weights and args.init_method_std == 0.02
        assert (args.normalization, args.swiglu, args.position_embedding_type) == \
            ("RMSNorm", True, "rope")
        assert not args.add_bias_linear and args.hidden_dropout == args.attention_dropout == 0
        assert (args.lr, args.min_lr, args.lr_decay_style, args.lr_warmup_iters) == \
            (3e-4, 0.0, "cosine", 2000)
        assert (args.adam_beta1, args.adam_beta2, args.adam_eps) == (0.9, 0.95, 1e-8)
        assert (args.weight_decay, args.clip_grad, args.bf16) == (0.1, 1.0, True)
        assert args.stage.seq_length == 2048 and args.stage.tokens_per_step == TWO_MILLION_TOKENS
        assert args.tokenizer_type == "GPTSentencePieceTokenizer"
        assert (args.train_tokens, args.patch_data_fraction) == (360_000_000_000, 2 / 3)
    patch, token = parsed
    assert (patch.stage.name, patch.patch_size, patch.stage.train_iters) == ("patch", 4, PATCH_ITERS)
    assert patch.save == patch.load == str(checkpoints / "patch")  # resumes itself when re-run
    assert token.stage.name == "token" and token.save == str(checkpoints / "token")
    assert token.load == str(checkpoints / "token_init")
    convert = commands[1]
    assert convert[convert.index("--iteration") + 1] == str(PATCH_ITERS)
    assert convert[convert.index("--save") + 1] == token.load
