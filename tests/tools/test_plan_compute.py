"""tools/plan_compute.py end to end, and its commands against pretrain_patch_gpt.py's parser."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_cli():
    spec = importlib.util.spec_from_file_location("plan_compute", REPO / "tools" / "plan_compute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plan_compute = _load_cli()


def _run_json(capsys, *argv):
    assert plan_compute.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_plan_for_gpu_hours(capsys):
    out = _run_json(capsys, "--gpus", "64", "--hours", "72", "--gpu", "H100", "--mfu", "0.4")
    assert out["token_only"]["compute"] == pytest.approx(64 * 72 * 3600 * 989e12 * 0.4)
    assert out["patch_level"]["cost_factor"] == pytest.approx(0.5)
    assert out["planned_hours"] == pytest.approx(36.0)
    (command,) = out["commands"]
    assert (command["name"], command["script"]) == ("two-stage run", "tools/pretrain_two_stage.py")
    args = command["args"]
    assert args[args.index("--nproc-per-node") + 1] == "8" and args[args.index("--nnodes") + 1] == "8"
    assert args[args.index("--save") + 1] == "runs/plan" and "--load" not in args
    assert "--train-iters" not in args  # the runner derives both stages' lengths


def test_text_table_names_the_assumptions(capsys):
    assert plan_compute.main(["--compute", "1.92e19"]) == 0
    text = capsys.readouterr().out
    assert "370M" in text and "Assumptions" in text
    assert "python tools/pretrain_two_stage.py --train-tokens " in text


@pytest.mark.parametrize("argv, message", [
    (["--compute=-1e20"], "FLOP budget must be positive"),
    (["--compute", "1e20", "--patch-fraction", "1.0"], "λ must lie in [0, 1)"),
    (["--compute", "1e20", "--patch-size", "0"], "K must be an integer >= 1"),
    (["--gpus", "8", "--hours", "5", "--mfu", "2"], "MFU 2.0 is impossible"),
])
def test_bad_inputs_exit_with_a_clear_error(capsys, argv, message):
    assert plan_compute.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, flag", [
    (["--compute", "inf"], "--compute"),
    (["--compute", "nan"], "--compute"),
    (["--gpus", "8", "--hours", "inf"], "--hours"),
    (["--compute", "1e20", "--mfu", "nan"], "--mfu"),
    (["--params=-inf"], "--params"),
])
def test_infinite_or_nan_numbers_exit_with_a_one_line_error(capsys, argv, flag):
    with pytest.raises(SystemExit) as exit_info:
        plan_compute.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: " in err and "is not a finite number" in err
    assert "Traceback" not in err


def _pretrain_commands(out):
    return [c for c in out["commands"] if c["script"] == "pretrain_patch_gpt.py"]


@pytest.fixture
def gpu_target(monkeypatch):
    # The emitted commands are for GPU clusters (--bf16); tell the parser not to
    # apply its CPU-mode restrictions, as it would on a GPU machine.
    from patch_megatron import cpu_mode

    monkeypatch.setenv(cpu_mode.ENV_FLAG, "0")


def test_the_runner_plans_what_the_planner_planned(capsys, gpu_target):
    # The emitted command, given to the real runner (--dry-run), must run the planner's stages.
    from repo_tools import load_tool
    from patch_megatron.training.arguments import parse_args

    out = _run_json(capsys, "--compute", "3e21", "--gpus", "16", "--patch-size", "4",
                    "--patch-fraction", "0.6667", "--params", "2.7e9")
    shape = out["shape"]
    stages = {s["name"]: s for s in out["stages"]}
    (command,) = out["commands"]
    argv = shlex.split(command["shell"])
    assert argv[:2] == ["python", "tools/pretrain_two_stage.py"] and argv[2:] == command["args"]
    runner = load_tool("pretrain_two_stage")
    assert runner.main(command["args"] + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    lines = [shlex.split(line) for line in printed.splitlines() if line.startswith("    ")]
    trainings = [line[line.index(next(a for a in line if a.endswith("pretrain_patch_gpt.py"))) + 1:]
                 for line in lines if any(a.endswith("pretrain_patch_gpt.py") for a in line)]
    assert len(lines) == 3 and len(trainings) == 2
    assert "--nproc-per-node=8" in lines[0] and "--nnodes=2" in lines[0]
    patch_stage, token_stage = (parse_args(argv).stage for argv in trainings)
    for name, stage in (("patch", patch_stage), ("token", token_stage)):
        args = parse_args(trainings[0 if name == "patch" else 1])
        assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads) \
            == (shape["num_layers"], shape["hidden_size"], shape["ffn_hidden_size"],
                shape["num_attention_heads"])
        assert args.seq_length == args.max_position_embeddings == 2048 and args.bf16
        assert args.tensor_model_parallel_size == shape["tensor_model_parallel_size"]
        assert args.patch_data_fraction == pytest.approx(0.6667)
        planned = stages[name]
        assert (stage.name, stage.patch_size, stage.global_batch_size, stage.train_iters,
                stage.lr_warmup_iters) == (planned["name"], planned["patch_size"],
                                           planned["global_batch_size"], planned["train_iters"],
                                           planned["warmup_iters"])
    # Same tokens per step in both stages: B/K samples of K·T tokens vs B of T.
    step_tokens = out["global_batch_size"] * 2048
    assert patch_stage.global_batch_size * 4 * 2048 == token_stage.global_batch_size * 2048 == step_tokens
    assert patch_stage.train_iters + token_stage.train_iters == out["total_iters"]
    # The token stage starts on data the patch stage did not read.
    assert patch_stage.data_start_token == 0
    assert patch_stage.train_iters * step_tokens <= token_stage.data_start_token


def test_gqa_token_only_command_parses_with_pretrain_parser(capsys, gpu_target):
    from patch_megatron.training.arguments import parse_args

    out = _run_json(capsys, "--params", "7e10", "--gpus", "256", "--patch-size", "1")
    (command,) = _pretrain_commands(out)
    args = parse_args(command["args"])
    assert args.group_query_attention
    assert args.num_query_groups == 8
    assert args.patch_size == 1 and args.patch_data_fraction == 0.0
    assert args.stage.train_iters == out["stages"][0]["train_iters"]
