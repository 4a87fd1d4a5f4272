"""Every flag is honoured, accepted without effect (listed), or refused with its reason.

The walk below goes through every option of ``pretrain_patch_gpt.py``'s parser:
a flag in neither table must be read by the code (``args.<dest>`` somewhere in
the package, the entry point or the tools), so that no flag is parsed and then
silently dropped.
"""

import os
import re
import warnings

import pytest

from patch_megatron.llama_recipe import RECIPE_FLAGS
from patch_megatron.training import build, megatron_lm_flags
from patch_megatron.training.arguments import ArgumentError, build_parser, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --mock-data --vocab-size 100 --cpu --lr 3e-4 "
        "--train-iters 5").split()


def _sources():
    texts = []
    roots = [os.path.join(REPO, "patch_megatron"), os.path.join(REPO, "tools")]
    for root in roots:
        for folder, _, files in os.walk(root):
            texts += [open(os.path.join(folder, f), encoding="utf-8").read()
                      for f in files if f.endswith(".py")]
    texts.append(open(os.path.join(REPO, "pretrain_patch_gpt.py"), encoding="utf-8").read())
    return "\n".join(texts)


def test_every_flag_is_honoured_or_in_a_table():
    source = _sources()
    tables = set(megatron_lm_flags.NO_OP) | set(megatron_lm_flags.REFUSED)
    unread = []
    for action in build_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        if set(action.option_strings) & tables:
            continue
        # Read as an attribute of the parsed flags (args.x, a.x, options.x, getattr(args, "x")).
        if not re.search(rf"\.{action.dest}\b|[\"']{action.dest}[\"']", source):
            unread.append(action.option_strings[0])
    assert unread == [], f"parsed but never read (silently ignored): {unread}"


def test_the_tables_do_not_overlap_and_help_shows_them():
    assert not set(megatron_lm_flags.NO_OP) & set(megatron_lm_flags.REFUSED)
    text = build_parser().format_help()
    assert "accepted without effect" in text and "Megatron-LM flags refused" in text
    for flag in list(megatron_lm_flags.NO_OP) + list(megatron_lm_flags.REFUSED):
        assert flag in text


@pytest.mark.parametrize("flag", sorted(megatron_lm_flags.REFUSED))
def test_refused_flags_name_why(flag):
    with pytest.raises(ArgumentError) as error:
        parse_args(BASE + [flag, "1"])
    assert str(error.value) == f"{flag}: {megatron_lm_flags.REFUSED[flag]}"


def test_no_op_flags_change_nothing_and_are_named():
    plain = parse_args(BASE + list(RECIPE_FLAGS))
    flags = []
    for flag in megatron_lm_flags.NO_OP:
        flags += [flag, "1"] if flag in ("--distributed-backend", "--attention-backend",
                                         "--timing-log-level") else [flag]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        noisy = parse_args(BASE + list(RECIPE_FLAGS) + flags)
    named = " ".join(str(w.message) for w in caught)
    assert all(flag in named for flag in megatron_lm_flags.NO_OP)
    assert vars(noisy) == vars(plain)  # the tables' entries are gone: nothing else differs
    assert build.model_config(noisy, 100) == build.model_config(plain, 100)


def test_log_params_norm_num_zeros_and_the_pytorch_profiler(tmp_path):
    import subprocess
    import sys

    from repo_tools import IN_PROCESS_READING, child_environment

    board = tmp_path / "tb"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "pretrain_patch_gpt.py"), *BASE[:-2], "--train-iters",
         "3", "--log-interval", "1", "--eval-iters", "0", "--log-params-norm",
         "--log-num-zeros-in-grad", "--profile", "--use-pytorch-profiler",
         "--profile-step-start", "1", "--profile-step-end", "2", "--tensorboard-dir", str(board),
         *RECIPE_FLAGS, *IN_PROCESS_READING],
        capture_output=True, text=True, env=child_environment(), cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if " iteration " in line]
    assert len(lines) == 3
    for line in lines:
        norm = float(re.search(r"params norm: ([0-9.]+)", line).group(1))
        zeros = float(re.search(r"num zeros: ([0-9.]+)", line).group(1))
        assert norm > 0 and zeros >= 0
        assert line.index("grad norm") < line.index("num zeros") < line.index("params norm")
    # torch.profiler recorded the profiled step and wrote one trace
    traces = [f for _, _, files in os.walk(board) for f in files if ".pt.trace.json" in f]
    assert len(traces) == 1
    with pytest.raises(ArgumentError, match="--tensorboard-dir"):
        parse_args(BASE + ["--profile", "--use-pytorch-profiler"])


def test_params_norm_counts_each_parameter_once(model_world):
    import torch

    from patch_megatron.model.config import PatchGPTConfig
    from patch_megatron.model.patch_gpt import build_model
    from patch_megatron.training.metrics import params_norm

    model = build_model(PatchGPTConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                                       vocab_size=64, seq_length=8,
                                       untie_embeddings_and_output_weights=False))
    expected = torch.sqrt(sum(p.detach().double().pow(2).sum() for p in model.parameters()))
    assert abs(params_norm([model]) - float(expected)) < 1e-9


@pytest.fixture
def model_world():
    from patch_megatron.parallel import initialize_world_of_one

    initialize_world_of_one(1234)


def test_check_only_validates_for_a_world_size_and_prints_the_plan(tmp_path):
    import subprocess
    import sys

    from repo_tools import child_environment

    flags = [sys.executable, os.path.join(REPO, "pretrain_patch_gpt.py"), *BASE[:-2],
             "--train-iters", "100", "--global-batch-size", "64", "--lr-warmup-samples", "640",
             "--tensor-model-parallel-size", "2"]
    ok = subprocess.run(flags + ["--check-only", "16"], capture_output=True, text=True,
                        env=child_environment(), cwd=str(tmp_path), timeout=120)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "------------------------ arguments ------------------------" in ok.stdout
    assert "normalization: LayerNorm" in ok.stdout and "activation: gelu" in ok.stdout
    assert "over 10 warmup steps, then linear" in ok.stdout
    assert "4 micro-batches of 2 per step on each of 8 data-parallel ranks" in ok.stdout
    assert "valid for 16 processes" in ok.stdout and " iteration " not in ok.stdout
    from patch_megatron.training.arguments import check_world_size

    args = parse_args(flags[2:] + ["--check-only", "6"])  # what the entry point checks
    with pytest.raises(ArgumentError, match="not divisible by micro-batch-size x data-parallel"):
        check_world_size(args, args.check_only)
