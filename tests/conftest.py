"""Shared fixtures: a one-process megatron world, a real builtin corpus, a tiny SentencePiece
model, an English Punkt sentence model, tool loaders."""

import os

import pytest

from repo_tools import load_tool


@pytest.fixture
def model_parallel_world_of_one():
    """megatron's parallel state for this process alone, seeded afresh for each test."""
    from patch_megatron.parallel import initialize_world_of_one

    initialize_world_of_one(1234)


@pytest.fixture(scope="session")
def tool_loader():
    """``tool_loader("preprocess_data").main([...])`` runs a tool in-process."""
    return load_tool


@pytest.fixture(scope="session")
def builtin_corpus(tmp_path_factory):
    """About 1 MB of real text (stdlib docstrings and pydoc topics) as .jsonl."""
    from patch_megatron.data.builtin_corpus import build_builtin_corpus

    return build_builtin_corpus(str(tmp_path_factory.mktemp("corpus") / "builtin.jsonl"),
                                max_bytes=1_000_000)


@pytest.fixture(scope="session")
def sentencepiece_model(builtin_corpus, tmp_path_factory):
    """Path of a 1024-piece BPE SentencePiece model trained on ``builtin_corpus``."""
    import json

    from patch_megatron.data.sentencepiece_training import train_sentencepiece

    with open(builtin_corpus.path, encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line in lines]
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "sp1k")
    return train_sentencepiece(texts, prefix, vocab_size=1024, progress_every=0).model_path


@pytest.fixture(scope="session")
def sp_tokenizer(sentencepiece_model):
    """megatron-core GPTSentencePieceTokenizer for ``sentencepiece_model``."""
    from patch_megatron.data.tokenizers import build_tokenizer

    return build_tokenizer("GPTSentencePieceTokenizer", sentencepiece_model)


@pytest.fixture(scope="session")
def builtin_data_prefix(builtin_corpus, sentencepiece_model, tmp_path_factory):
    """``builtin_corpus`` preprocessed with EOD appended: a megatron data prefix."""
    from patch_megatron.data.preprocess import PreprocessConfig, preprocess

    prefix = str(tmp_path_factory.mktemp("data") / "builtin")
    summary = preprocess(PreprocessConfig(
        inputs=[builtin_corpus.path], output_prefix=prefix,
        tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=sentencepiece_model,
        append_eod=True, workers=0, log_interval=10**9), progress_stream=open(os.devnull, "w"))
    return summary.outputs[0]


@pytest.fixture(scope="session")
def punkt_data(tmp_path_factory):
    """An NLTK data folder holding ``tokenizers/punkt_tab/english/``: a Punkt model trained
    (Punkt learns unsupervised) on the language reference behind ``help()``; nltk's own
    models cannot be downloaded here. It is also put first on nltk's data path."""
    import nltk
    from nltk.tokenize.punkt import PunktTrainer, save_punkt_params
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("nltk_data")
    (root / "tokenizers" / "punkt_tab").mkdir(parents=True)
    nltk.data.path.insert(0, str(root))  # nltk writes only inside its data path
    trainer = PunktTrainer()
    trainer.train("\n\n".join(topics.values())[:300_000], finalize=True)
    save_punkt_params(trainer.get_params(), dir=str(root / "tokenizers" / "punkt_tab" / "english"))
    return str(root)
