"""Session fixtures of the converter tests (helpers in two_stage.py)."""

import os
import re
import socket
import subprocess

import pytest

from two_stage import PATCH_FLAGS, TOKEN_FLAGS, run_tool, run_training


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory):
    import json

    from patch_megatron.data.sentencepiece_training import train_sentencepiece

    texts = [json.__doc__, os.__doc__, re.__doc__, subprocess.__doc__, socket.__doc__] * 2
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "sp")
    return train_sentencepiece(texts, prefix, vocab_size=400, progress_every=0).model_path


@pytest.fixture(scope="session")
def vocab_size(tokenizer_model):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=tokenizer_model).get_piece_size()


@pytest.fixture(scope="session")
def two_stage_run(tmp_path_factory, vocab_size):
    """Directories and logs of the patch stage, the handoff and the token stage."""
    root = tmp_path_factory.mktemp("two_stage")
    patch, handoff, token = (str(root / n) for n in ("patch", "handoff", "token"))
    vocab = ["--vocab-size", str(vocab_size)]
    patch_log = run_training([*PATCH_FLAGS, *vocab, "--tensor-model-parallel-size", "2",
                              "--save", patch], nproc=2)
    code, err = run_tool("convert_patch_to_token", [
        "--load", patch, "--save", handoff, "--target-tensor-parallel-size", "1",
        "--target-pipeline-parallel-size", "2"])
    assert code == 0, err
    # --finetune: weights only, as the handoff means; test_plain_load_starts_the_token_stage
    # checks that plain --load does the same with the converter's weights-only checkpoint.
    token_log = run_training([*TOKEN_FLAGS, *vocab, "--pipeline-model-parallel-size", "2",
                              "--load", handoff, "--finetune", "--save", token], nproc=2)
    return dict(patch=patch, handoff=handoff, token=token, patch_log=patch_log,
                token_log=token_log, root=root)


@pytest.fixture(scope="session")
def world_of_one():
    from patch_megatron.conversion.cpu_world import ensure_world_of_one

    ensure_world_of_one()


