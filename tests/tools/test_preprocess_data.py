"""tools/preprocess_data.py: Megatron-LM's byte format, inputs, bad records, atomic output."""

import gzip
import json
import os
import struct

import numpy
import pytest
import sentencepiece

MAGIC = b"MMIDIDX\x00\x00"


def expected_idx(sequence_lengths, document_ends, dtype_code, itemsize):
    """The .idx bytes from megatron-core's documented layout, written out by hand."""
    pointers, offset = [], 0
    for length in sequence_lengths:
        pointers.append(offset)
        offset += length * itemsize
    out = MAGIC + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
    out += struct.pack("<Q", len(sequence_lengths)) + struct.pack("<Q", len(document_ends))
    out += b"".join(struct.pack("<i", n) for n in sequence_lengths)
    out += b"".join(struct.pack("<q", p) for p in pointers)
    out += b"".join(struct.pack("<q", d) for d in document_ends)
    return out


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    return str(path)


def run(tool_loader, capsys, *argv):
    code = tool_loader("preprocess_data").main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


TEXTS = ["Return the absolute value of the argument.", "x  = 1\n\ty = [2, 3]  # ok",
         "Unicode: caf\u00e9 \u00fc \u4e2d\u6587 \U0001F600"]


@pytest.mark.parametrize("append_eod", [True, False])
def test_bytes_match_megatron_format(tmp_path, tool_loader, capsys, sentencepiece_model,
                                     append_eod):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    flags = ["--append-eod"] if append_eod else []
    code, out, _ = run(tool_loader, capsys, "--input", source, "--output-prefix",
                       tmp_path / "out", "--tokenizer-type", "GPTSentencePieceTokenizer",
                       "--tokenizer-model", sentencepiece_model, "--workers", 1, *flags)
    assert code == 0, out
    # Expected ids straight from SentencePiece: encode_as_ids, plus EOS (= EOD).
    sp = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    docs = [sp.encode_as_ids(t) + ([sp.eos_id()] if append_eod else []) for t in TEXTS]
    assert sp.eos_id() == 3 and sp.get_piece_size() < 65500
    expected_bin = b"".join(struct.pack("<H", i) for d in docs for i in d)  # uint16 LE
    with open(tmp_path / "out_text_document.bin", "rb") as f:
        assert f.read() == expected_bin
    with open(tmp_path / "out_text_document.idx", "rb") as f:
        assert f.read() == expected_idx([len(d) for d in docs], [0, 1, 2, 3], 8, 2)
    assert "documents: 3" in out


def test_presplit_sentences_and_int32_dtype(tmp_path, tool_loader, capsys):
    # A list is one document of several sequences; empty sentences are dropped.
    # NullTokenizer with 70000 ids needs int32 (dtype code 4); EOD = 70000.
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": ["5 6", "69999"]},
                                                 {"text": "1 2 3"}])
    code, out, _ = run(tool_loader, capsys, "--input", source, "--output-prefix",
                       tmp_path / "n", "--tokenizer-type", "NullTokenizer", "--vocab-size",
                       70000, "--workers", 0, "--append-eod")
    assert code == 0
    ids = [5, 6, 69999, 70000, 1, 2, 3, 70000]
    with open(tmp_path / "n_text_document.bin", "rb") as f:
        assert f.read() == struct.pack("<8i", *ids)
    with open(tmp_path / "n_text_document.idx", "rb") as f:
        assert f.read() == expected_idx([2, 2, 4], [0, 2, 3], 4, 4)


def test_workers_give_identical_files(tmp_path, tool_loader, capsys, builtin_corpus,
                                      sentencepiece_model):
    outputs = []
    for workers in (0, 2):
        prefix = tmp_path / f"w{workers}"
        code, out, err = run(tool_loader, capsys, "--input", builtin_corpus.path,
                             "--output-prefix", prefix, "--tokenizer-type",
                             "GPTSentencePieceTokenizer", "--tokenizer-model",
                             sentencepiece_model, "--workers", workers, "--append-eod",
                             "--log-interval", 50)
        assert code == 0
        assert "docs/s" in err and "MB/s" in err  # the progress line
        assert f"documents: {builtin_corpus.documents}" in out
        outputs.append([open(f"{prefix}_text_document.{s}", "rb").read() for s in ("bin", "idx")])
    assert outputs[0] == outputs[1]


def test_round_trip_text_ids_files_text(tmp_path, tool_loader, capsys, sp_tokenizer,
                                        sentencepiece_model):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    assert run(tool_loader, capsys, "--input", source, "--output-prefix", tmp_path / "r",
               "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model",
               sentencepiece_model, "--workers", 0)[0] == 0
    dataset = IndexedDataset(str(tmp_path / "r_text_document"))
    assert [sp_tokenizer.detokenize(dataset[i].tolist()) for i in range(len(dataset))] == TEXTS


def test_txt_blocks_keep_their_lines(tmp_path, tool_loader, capsys, sp_tokenizer,
                                     sentencepiece_model):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    (tmp_path / "a.txt").write_bytes(b"first line\r\n  second\n\n \n\nnext block\n")
    assert run(tool_loader, capsys, "--input", tmp_path / "a.txt", "--output-prefix",
               tmp_path / "t", "--tokenizer-type", "GPTSentencePieceTokenizer",
               "--tokenizer-model", sentencepiece_model, "--workers", 0)[0] == 0
    dataset = IndexedDataset(str(tmp_path / "t_text_document"))
    assert [sp_tokenizer.detokenize(dataset[i].tolist()) for i in range(len(dataset))] == \
        ["first line\n  second", "next block"]


def test_txt_gzip_directory_and_glob_inputs(tmp_path, tool_loader, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_text("1 2\n\n\n4 5\r\n\n")  # blocks "1 2" and "4 5"
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "6"}) + "\n\n")  # blank lines are ignored
    (folder / "ignored.csv").write_text("x")
    common = ["--tokenizer-type", "NullTokenizer", "--vocab-size", 100, "--workers", 0]
    assert run(tool_loader, capsys, "--input", folder, "--output-prefix", tmp_path / "d",
               *common)[0] == 0
    assert run(tool_loader, capsys, "--input", str(folder / "*.txt"), str(folder / "b.*"),
               "--output-prefix", tmp_path / "g", *common)[0] == 0
    for prefix in ("d", "g"):
        data = numpy.fromfile(tmp_path / f"{prefix}_text_document.bin", dtype=numpy.uint16)
        assert data.tolist() == [1, 2, 4, 5, 6]  # a.txt before b.jsonl.gz: sorted order


BAD_CASES = {
    "malformed_json": b'{"text": "fine"}\n{"text": "oops"\n{"text": "also fine"}\n',
    "missing_key": b'{"text": "fine"}\n{"body": "no text"}\n{"text": "also fine"}\n',
    "invalid_utf8": b'{"text": "fine"}\n{"text": "bad \xff byte"}\n{"text": "also fine"}\n',
    "empty_document": b'{"text": "fine"}\n{"text": ""}\n{"text": "also fine"}\n',
    "not_text": b'{"text": "fine"}\n{"text": 7}\n{"text": "also fine"}\n',
}


@pytest.mark.parametrize("kind", sorted(BAD_CASES))
def test_bad_record_stops_with_file_and_line(tmp_path, tool_loader, capsys,
                                             sentencepiece_model, kind):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(BAD_CASES[kind])
    argv = ["--input", source, "--output-prefix", tmp_path / "o", "--tokenizer-type",
            "GPTSentencePieceTokenizer", "--tokenizer-model", sentencepiece_model,
            "--workers", 1]
    code, _, err = run(tool_loader, capsys, *argv)
    assert code == 1
    assert f"{source}:2:" in err and "--skip-bad-lines" in err
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing written, no temp files
    code, out, _ = run(tool_loader, capsys, *argv, "--skip-bad-lines")
    assert code == 0
    assert "documents: 2" in out and f"skipped: {kind}=1" in out


def test_interrupted_run_leaves_no_valid_looking_output(tmp_path, monkeypatch,
                                                        sentencepiece_model, builtin_corpus):
    import importlib

    module = importlib.import_module("patch_megatron.data.preprocess")

    calls = {"n": 0}
    real_write = module._write_batch

    def write_then_interrupt(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_write(*args)

    monkeypatch.setattr(module, "_write_batch", write_then_interrupt)
    config = module.PreprocessConfig(
        inputs=[builtin_corpus.path], output_prefix=str(tmp_path / "o"),
        tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=sentencepiece_model,
        workers=1, log_interval=10**9)
    with pytest.raises(KeyboardInterrupt):
        module.preprocess(config)
    assert calls["n"] == 3
    assert os.listdir(tmp_path) == []


def test_huggingface_tokenizer_json(tmp_path, tool_loader, capsys):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>",
         "unk_token": "<unk>"}))
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS[:2]])
    code, out, err = run(tool_loader, capsys, "--input", source, "--output-prefix",
                         tmp_path / "h", "--tokenizer-type", "HuggingFaceTokenizer",
                         "--tokenizer-model", tmp_path / "tokenizer.json", "--workers", 0,
                         "--append-eod")
    assert code == 0, err
    eos = hf.token_to_id("</s>")
    expected = [i for t in TEXTS[:2] for i in hf.encode(t, add_special_tokens=False).ids + [eos]]
    assert numpy.fromfile(tmp_path / "h_text_document.bin", dtype=numpy.uint16).tolist() \
        == expected


@pytest.mark.parametrize("content", [b"a text file, not a model\n", bytes(range(256)) * 8],
                         ids=["text", "random-bytes"])
def test_bad_tokenizer_model_is_one_line(tmp_path, tool_loader, capsys, content):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    model = tmp_path / "tok.model"
    model.write_bytes(content)
    code, _, err = run(tool_loader, capsys, "--input", source, "--output-prefix",
                       tmp_path / "out", "--tokenizer-type", "GPTSentencePieceTokenizer",
                       "--tokenizer-model", model, "--workers", 1)
    assert code == 1
    # SentencePiece's own words inside the parentheses vary by release ("INTERNAL:" in 0.2.3,
    # "Internal:" in 0.2.0); ours around them do not.
    line = err.strip()
    assert "\n" not in line and "Traceback" not in err
    assert line.startswith(f"error: --tokenizer-model {model}: not a SentencePiece model file (")
    assert "could not parse ModelProto" in line
    assert line.endswith("). GPTSentencePieceTokenizer needs the .model file that "
                         "tools/train_tokenizer.py (or SentencePiece) writes.")
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "tok.model"]


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_gzip_input(tmp_path, tool_loader, capsys, sentencepiece_model,
                              builtin_corpus, workers):
    whole = gzip.compress(open(builtin_corpus.path, "rb").read())
    source = tmp_path / "cut.jsonl.gz"
    source.write_bytes(whole[:len(whole) // 2])
    argv = ["--input", source, "--output-prefix", tmp_path / "o", "--tokenizer-type",
            "GPTSentencePieceTokenizer", "--tokenizer-model", sentencepiece_model,
            "--workers", workers]
    for extra in ([], ["--skip-bad-lines"]):  # not a bad record: never skipped
        code, _, err = run(tool_loader, capsys, *argv, *extra)
        assert code == 1
        assert f"error: {source}: compressed file ends before its end-of-stream marker: it is " \
               f"truncated after the document at line " in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert sorted(os.listdir(tmp_path)) == ["cut.jsonl.gz"]
    source.write_bytes(b"not gzip at all" * 10)
    code, _, err = run(tool_loader, capsys, *argv)
    assert code == 1 and "compressed file is damaged or not gzip" in err


def test_gpt2_bpe_vocab_and_merge_files(tmp_path, tool_loader, capsys):
    bpe = os.path.join(os.path.dirname(__file__), "..", "fixtures", "megatron_lm", "gpt2_bpe")
    with open(os.path.join(bpe, "ids.json"), encoding="utf-8") as f:
        samples = json.load(f)["samples"][:2]  # with Megatron-LM's ids for them
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": s["text"]} for s in samples])
    code, out, err = run(tool_loader, capsys, "--input", source, "--output-prefix", tmp_path / "g",
                         "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                         os.path.join(bpe, "vocab.json"), "--merge-file",
                         os.path.join(bpe, "merges.txt"), "--workers", 0, "--append-eod")
    assert code == 0, err
    eod = 0  # <|endoftext|> is entry 0 of the fixture's vocabulary
    expected = [i for s in samples for i in s["ids"] + [eod]]
    assert numpy.fromfile(tmp_path / "g_text_document.bin", dtype=numpy.uint16).tolist() == expected


def test_tiktokenizer_vocabulary_with_its_flags(tmp_path, tool_loader, capsys):
    import inspect

    from patch_megatron.data.tokenizers import build_tokenizer
    from repo_tools import write_tiktoken_vocabulary

    vocabulary = str(tmp_path / "tiktoken.json")
    entries = write_tiktoken_vocabulary(vocabulary, inspect.getsource(json))
    flags = ["--tokenizer-type", "TikTokenizer", "--tokenizer-model", vocabulary,
             "--vocab-size", entries + 64, "--tiktoken-num-special-tokens", 64,
             "--tiktoken-pattern", "v1"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in TEXTS])
    code, _, err = run(tool_loader, capsys, "--input", source, "--output-prefix", tmp_path / "t",
                       "--workers", 2, "--append-eod", *flags)
    assert code == 0, err
    tokenizer = build_tokenizer("TikTokenizer", vocabulary, vocab_size=entries + 64,
                                tiktoken_pattern="v1", tiktoken_num_special_tokens=64)
    expected = [i for t in TEXTS for i in tokenizer.tokenize(t) + [tokenizer.eod]]
    written = numpy.fromfile(tmp_path / "t_text_document.bin", dtype=numpy.uint16).tolist()
    assert written == expected and tokenizer.eod == 2 and min(set(written) - {2}) >= 64


def test_megatron_lm_partition_flags_keep_the_output(tmp_path, tool_loader, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in ("1 2 3", "4 5", "6")])
    common = ["--input", source, "--tokenizer-type", "NullTokenizer", "--vocab-size", 10,
              "--workers", 0]
    code, _, err = run(tool_loader, capsys, *common, "--output-prefix", tmp_path / "a")
    assert code == 0, err
    code, _, err = run(tool_loader, capsys, *common, "--output-prefix", tmp_path / "b",
                       "--partitions", 2, "--keep-sequential-samples")
    assert code == 0, err
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"a_text_document{suffix}").read_bytes() == \
            (tmp_path / f"b_text_document{suffix}").read_bytes()
    with pytest.raises(SystemExit):
        run(tool_loader, capsys, *common, "--output-prefix", tmp_path / "c", "--keep-newlines")
    assert "add --split-sentences" in capsys.readouterr().err
    assert not (tmp_path / "c_text_document.bin").exists()


SENTENCES = ["The cat sat on the mat. It was happy, e.g. very glad.\n\nDr. Smith came at 5 "
             "p.m. today!  Was it late?", "One sentence only", "Yes. No. Maybe so."]


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_writes_one_sequence_per_punkt_sentence(
        tmp_path, tool_loader, capsys, sentencepiece_model, punkt_data, monkeypatch,
        keep_newlines):
    # As Megatron-LM's preprocess_data.py: NLTK_DATA's Punkt model cuts each document, each
    # sentence is tokenized alone and is one sequence; the EOD ends the document's last one.
    # One worker process: the model is found there too.
    from nltk.tokenize.punkt import PunktTokenizer

    monkeypatch.setenv("NLTK_DATA", punkt_data)
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in SENTENCES])
    flags = ["--keep-newlines"] if keep_newlines else []
    code, out, err = run(tool_loader, capsys, "--input", source, "--output-prefix",
                         tmp_path / "out", "--tokenizer-type", "GPTSentencePieceTokenizer",
                         "--tokenizer-model", sentencepiece_model, "--workers", 1,
                         "--append-eod", "--split-sentences", *flags)
    assert code == 0, err
    sp = sentencepiece.SentencePieceProcessor(model_file=sentencepiece_model)
    punkt = PunktTokenizer("english")
    docs = []
    for text in SENTENCES:
        if keep_newlines:  # each sentence runs to the next one's start
            starts = [start for start, _ in punkt.span_tokenize(text)]
            sentences = [text[a:b] for a, b in zip([0, *starts[1:]], [*starts[1:], len(text)])]
            assert "".join(sentences) == text
        else:
            sentences = punkt.tokenize(text)
        ids = [sp.encode_as_ids(sentence) for sentence in sentences]
        ids[-1] = ids[-1] + [sp.eos_id()]
        docs.append(ids)
    assert len(docs[0]) > 2 and [len(d) for d in docs[1:]] == [1, 3]
    lengths = [len(ids) for d in docs for ids in d]
    ends = [0]
    for d in docs:
        ends.append(ends[-1] + len(d))
    # Megatron-LM names sentence-split output PREFIX_{key}_sentence.
    assert (tmp_path / "out_text_sentence.idx").read_bytes() == \
        expected_idx(lengths, ends, dtype_code=8, itemsize=2)
    expected_bin = b"".join(struct.pack("<H", i) for d in docs for ids in d for i in ids)
    assert (tmp_path / "out_text_sentence.bin").read_bytes() == expected_bin
