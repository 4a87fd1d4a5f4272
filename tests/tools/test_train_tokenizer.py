"""tools/train_tokenizer.py: determinism, special ids, byte fallback, inputs, bad lines."""

import gzip
import json

import pytest
import sentencepiece


def train(tool_loader, *argv):
    return tool_loader("train_tokenizer").main([str(a) for a in argv])


@pytest.fixture
def small_corpus(builtin_corpus, tmp_path):
    lines = open(builtin_corpus.path, encoding="utf-8").readlines()[:40]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_deterministic_with_documented_ids_and_byte_fallback(tool_loader, small_corpus, tmp_path):
    for name in ("a", "b"):
        assert train(tool_loader, "--input", small_corpus, "--vocab-size", 600,
                     "--output-prefix", tmp_path / name) == 0
    for suffix in (".model", ".vocab"):
        assert (tmp_path / f"a{suffix}").read_bytes() == (tmp_path / f"b{suffix}").read_bytes()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "a.model"))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert sp.get_piece_size() == 600 and sp.id_to_piece(4) == "\n"
    unseen = "naïve 中文 \U0001F600\n  two  spaces\ttab"
    ids = sp.encode(unseen)
    assert sp.unk_id() not in ids and sp.decode(ids) == unseen


def test_unigram_txt_gzip_glob_and_sample_cap(tool_loader, tmp_path, small_corpus):
    texts = [json.loads(line)["text"] for line in open(small_corpus, encoding="utf-8")]
    (tmp_path / "a.txt").write_text("\n\n".join(texts[:20]), encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": t}) + "\n" for t in texts[20:])
    assert train(tool_loader, "--input", str(tmp_path / "*.txt"), tmp_path / "b.jsonl.gz",
                 "--json-keys", "body", "--vocab-size", 500, "--model-type", "unigram",
                 "--max-sentences", 300, "--output-prefix", tmp_path / "u") == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "u.model"))
    assert sp.decode(sp.encode(texts[25])) == texts[25]


def test_bad_line_is_an_error_unless_skipped(tool_loader, tmp_path, small_corpus, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(small_corpus.read_bytes() + b"{not json\n")
    assert train(tool_loader, "--input", bad, "--vocab-size", 600,
                 "--output-prefix", tmp_path / "x") == 1
    assert f"{bad}:41: malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.model").exists()
    assert train(tool_loader, "--input", bad, "--vocab-size", 600, "--skip-bad-lines",
                 "--output-prefix", tmp_path / "x") == 0


def test_vocab_size_the_corpus_cannot_give_is_refused(tool_loader, tmp_path, small_corpus,
                                                      capsys):
    assert train(tool_loader, "--input", small_corpus, "--vocab-size", 32000,
                 "--output-prefix", tmp_path / "x") == 1
    err = capsys.readouterr().err
    pieces = int(err.split("give only ")[1].split()[0])
    assert 600 < pieces < 32000, err
    assert f"ask for --vocab-size {pieces} or less" in err
    assert not (tmp_path / "x.model").exists() and not (tmp_path / "x.vocab").exists()
    # What the message offers works, and gives exactly that size.
    assert train(tool_loader, "--input", small_corpus, "--vocab-size", pieces,
                 "--output-prefix", tmp_path / "x") == 0
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "x.model"))
    assert sp.get_piece_size() == pieces


def test_vocab_size_below_the_characters_is_one_line(tool_loader, tmp_path, capsys):
    (tmp_path / "chars.txt").write_text("".join(chr(0x4e00 + i) for i in range(400)))
    assert train(tool_loader, "--input", tmp_path / "chars.txt", "--vocab-size", 340,
                 "--character-coverage", 1.0, "--output-prefix", tmp_path / "x") == 1
    err = capsys.readouterr().err
    assert "--vocab-size 340 is smaller than the" in err and "--character-coverage" in err
    assert len(err.strip().splitlines()) == 1


def test_truncated_gzip_input(tool_loader, tmp_path, small_corpus, capsys):
    whole = gzip.compress(small_corpus.read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    assert train(tool_loader, "--input", tmp_path / "cut.jsonl.gz", "--vocab-size", 600,
                 "--output-prefix", tmp_path / "x") == 1
    assert "cut.jsonl.gz: compressed file ends before its end-of-stream marker" in \
        capsys.readouterr().err
    assert not (tmp_path / "x.model").exists()
