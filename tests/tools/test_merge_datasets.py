"""tools/merge_datasets.py: merging equals preprocessing the concatenated input."""

import json
import os

import pytest


def test_merge_equals_preprocessing_concatenation(tool_loader, tmp_path, sentencepiece_model,
                                                  capsys):
    texts = ["first document", "second one\nwith two lines", "third", "fourth and last"]
    parts = {"a": texts[:2], "b": texts[2:], "ab": texts}
    preprocess = tool_loader("preprocess_data").main
    for name, docs in parts.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                                        for t in docs))
        assert preprocess(["--input", str(tmp_path / f"{name}.jsonl"), "--output-prefix",
                           str(tmp_path / name), "--tokenizer-type",
                           "GPTSentencePieceTokenizer", "--tokenizer-model",
                           sentencepiece_model, "--workers", "0", "--append-eod"]) == 0
    merge = tool_loader("merge_datasets").main
    assert merge(["--input", str(tmp_path / "a_text_document"),
                  str(tmp_path / "b_text_document.idx"),
                  "--output-prefix", str(tmp_path / "merged")]) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"merged{suffix}").read_bytes() == \
            (tmp_path / f"ab_text_document{suffix}").read_bytes()
    assert "merged 2 datasets: 4 documents" in capsys.readouterr().out


def test_merge_rejects_mixed_dtypes_and_missing_inputs(tool_loader, tmp_path, capsys,
                                                       builtin_data_prefix):
    (tmp_path / "n.jsonl").write_text(json.dumps({"text": "1 2 3"}) + "\n")
    assert tool_loader("preprocess_data").main(
        ["--input", str(tmp_path / "n.jsonl"), "--output-prefix", str(tmp_path / "n"),
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "70000", "--workers", "0"]) == 0
    merge = tool_loader("merge_datasets").main
    assert merge(["--input", builtin_data_prefix, str(tmp_path / "n_text_document"),
                  "--output-prefix", str(tmp_path / "m")]) == 1
    assert "different token dtypes" in capsys.readouterr().err
    assert merge(["--input", str(tmp_path / "nope"), "--output-prefix",
                  str(tmp_path / "m")]) == 1
    assert "index file not found" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "m.bin")


def test_prefix_that_was_trained_on_merges(tool_loader, tmp_path, capsys, builtin_data_prefix):
    import shutil

    for name in ("a", "b"):
        for suffix in (".bin", ".idx"):
            shutil.copy(builtin_data_prefix + suffix, tmp_path / f"{name}{suffix}")
    # What training leaves next to a prefix: megatron's index cache in PREFIX/cache/.
    os.makedirs(tmp_path / "a" / "cache" / "PatchGPTDataset_indices")
    merge = tool_loader("merge_datasets").main
    assert merge(["--input", str(tmp_path / "a"), str(tmp_path / "b"),
                  "--output-prefix", str(tmp_path / "ab")]) == 0
    assert "merged 2 datasets" in capsys.readouterr().out
    assert os.path.getsize(tmp_path / "ab.bin") == 2 * os.path.getsize(tmp_path / "a.bin")
    os.makedirs(tmp_path / "empty")
    assert merge(["--input", str(tmp_path / "empty"), "--output-prefix",
                  str(tmp_path / "m")]) == 1
    assert "a directory with no PREFIX.idx/.bin pairs in it, and no empty.idx next to it" in \
        capsys.readouterr().err
