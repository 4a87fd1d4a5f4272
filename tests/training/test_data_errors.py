"""pretrain_patch_gpt.py on hostile data inputs: one error line with the fix, no traceback."""

import os
import subprocess
import sys

from repo_tools import IN_PROCESS_READING, child_environment
from patch_megatron.llama_recipe import RECIPE_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 8 "
         "--micro-batch-size 2 --global-batch-size 4 --train-iters 2 --patch-size 4 "
         "--patch-data-fraction 0.5 --lr 1e-3 --eval-iters 0 --cpu "
         "--make-vocab-size-divisible-by 64 --tokenizer-type GPTSentencePieceTokenizer").split() + list(RECIPE_FLAGS) + list(IN_PROCESS_READING)


def run(extra):
    env = child_environment()
    return subprocess.run([sys.executable, os.path.join(REPO, "pretrain_patch_gpt.py"), *FLAGS,
                           *extra], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=240)


def error_lines(result):
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if "error:" in line]


def test_text_file_as_tokenizer_model(builtin_data_prefix, tmp_path):
    model = tmp_path / "tok.model"
    model.write_text("not a model\n")
    result = run(["--tokenizer-model", str(model), "--data-path", builtin_data_prefix])
    assert result.returncode == 2
    assert error_lines(result) == [
        f"pretrain_patch_gpt.py: error: tokenizer: --tokenizer-model {model}: not a "
        f"SentencePiece model file (INTERNAL: could not parse ModelProto from {model}). "
        f"GPTSentencePieceTokenizer needs the .model file that tools/train_tokenizer.py (or "
        f"SentencePiece) writes."]


def test_unwritable_index_cache_names_data_cache_path(builtin_data_prefix, sentencepiece_model,
                                                      tmp_path):
    import shutil

    for suffix in (".bin", ".idx"):
        shutil.copy(builtin_data_prefix + suffix, tmp_path / f"p{suffix}")
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder must go")
    result = run(["--tokenizer-model", sentencepiece_model, "--data-path", str(tmp_path / "p"),
                  "--data-cache-path", str(blocked / "cache")])
    assert result.returncode == 2
    lines = error_lines(result)
    assert len(lines) == 1 and "cannot write megatron's dataset index cache" in lines[0]
    assert "pass --data-cache-path with a writable folder" in lines[0]
    assert "path_to_cache" not in result.stderr
