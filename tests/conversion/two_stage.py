"""Helpers of the converter tests: a real two-stage run (launched once per session), tools.

Patch stage (K=4) on 2 processes at TP=2 -> tools/convert_patch_to_token.py
(target PP=2, TP=1, so the vocabulary is re-padded) -> token stage on 2
processes at PP=2 loading the converted checkpoint. The checkpoints cover
TP=2, PP=2 and the converter's TP=1/PP=1 output; the tokenizer is a small
SentencePiece model whose size is the runs' vocabulary.
"""

import os
import subprocess
import sys

import torch

from patch_megatron.training import log_reading
from repo_tools import IN_PROCESS_READING, child_environment, free_port, load_tool
from patch_megatron.llama_recipe import RECIPE_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPE_FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --group-query-attention "
               "--num-query-groups 2 --ffn-hidden-size 48 --seq-length 8 --micro-batch-size 2 "
               "--make-vocab-size-divisible-by 64 --untie-embeddings-and-output-weights "
               "--mock-data --eval-iters 0 --log-interval 1 --lr-warmup-iters 0 --cpu "
               "--patch-data-fraction 0.5 --train-tokens 768").split() + list(RECIPE_FLAGS) + list(IN_PROCESS_READING)
PATCH_FLAGS = "--patch-size 4 --global-batch-size 4 --lr 1e-3".split()  # 3 iterations
TOKEN_FLAGS = "--patch-size 1 --global-batch-size 8 --lr 5e-4 --exit-interval 2".split()


def run_training(extra, nproc):
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", os.path.join(REPO, "pretrain_patch_gpt.py"),
               *SHAPE_FLAGS, *extra]
    env = child_environment()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def train_lines(stdout):
    """iteration -> (consumed samples, lr, loss) from the Megatron-style log."""
    return {i: (int(f["consumed samples"]), float(f["learning rate"]),
                float(f.get("patch loss", f.get("lm loss"))))
            for i, f in log_reading.training_lines(stdout).items()}


def run_tool(name, argv):
    """Run tools/<name>.py in-process; returns (exit code, stderr text)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = load_tool(name).main(argv)
    return code, err.getvalue()



def our_model(checkpoint_dir, iteration=None):
    """Our K=1 model (TP=1) holding a checkpoint's weights, loaded by megatron-core."""
    from patch_megatron.conversion.megatron_checkpoint import load_full_weights, open_checkpoint
    from patch_megatron.model.patch_gpt import build_model

    checkpoint = open_checkpoint(checkpoint_dir, iteration)
    model = build_model(checkpoint.description.model_config(patch_size=1), pre_process=True,
                        post_process=True, cpu=True)
    model.load_state_dict(load_full_weights(checkpoint), strict=False)
    model.eval()
    return model, checkpoint


def sample_tokens(vocab, batch=3, length=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)
