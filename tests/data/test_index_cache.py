"""megatron's dataset index cache: never unpickled, never reused for other data, writable."""

import glob
import os
import pickle
import shutil

import numpy
import pytest

from patch_megatron.data.stage_datasets import build_stage_datasets
from patch_megatron.data.index_cache import DEFAULT_CACHE_FOLDER, FINGERPRINTS
from patch_megatron.data.index_validation import DatasetFileError

T, K, SEED, BUDGET = 32, 4, 1234, 60_000


def build(prefix, tokenizer, cache=None):
    return build_stage_datasets(
        [prefix], "90,8,2", T, K, "patch", 2 / 3, BUDGET, SEED,
        None if cache is None else str(cache), tokenizer=tokenizer)


@pytest.fixture
def prefix(builtin_data_prefix, tmp_path):
    for suffix in (".bin", ".idx"):
        shutil.copy(builtin_data_prefix + suffix, tmp_path / f"p{suffix}")
    return str(tmp_path / "p")


class MakesFolder:
    """A pickle that, when loaded, creates a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_planted_pickle_in_default_cache_is_refused_unread(prefix, sp_tokenizer, tmp_path):
    build(prefix, sp_tokenizer)  # megatron writes PREFIX/cache/PatchGPTDataset_indices
    folder = os.path.join(prefix, DEFAULT_CACHE_FOLDER)
    marker = str(tmp_path / "code-ran")
    for path in glob.glob(os.path.join(folder, "*shuffle_index.npy")):
        with open(path, "wb") as out:
            out.write(pickle.dumps(MakesFolder(marker)))
    with pytest.raises(DatasetFileError, match=r"shuffle_index\.npy: not a numpy \.npy array.*"
                                               r"delete the folder .*PatchGPTDataset_indices"):
        build(prefix, sp_tokenizer)
    assert not os.path.exists(marker)


def test_object_array_in_data_cache_path_is_refused(prefix, sp_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    build(prefix, sp_tokenizer, cache)
    target = sorted(glob.glob(str(cache / "*sample_index.npy")))[0]
    numpy.save(target, numpy.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetFileError, match="holds object entries, not plain numbers"):
        build(prefix, sp_tokenizer, cache)


def test_truncated_cache_file_is_refused(prefix, sp_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    build(prefix, sp_tokenizer, cache)
    target = sorted(glob.glob(str(cache / "*document_index.npy")))[0]
    with open(target, "r+b") as out:
        out.truncate(os.path.getsize(target) - 4)
    with pytest.raises(DatasetFileError, match="the cache file is damaged"):
        build(prefix, sp_tokenizer, cache)


def test_cache_of_other_data_is_refused(prefix, sp_tokenizer, builtin_corpus,
                                        sentencepiece_model, tmp_path):
    from patch_megatron.data.preprocess import PreprocessConfig, preprocess

    first = build(prefix, sp_tokenizer)
    assert os.path.isfile(os.path.join(prefix, DEFAULT_CACHE_FOLDER, FINGERPRINTS))
    assert build(prefix, sp_tokenizer).train[5]["tokens"].tolist() == \
        first.train[5]["tokens"].tolist()  # the same files: the cache is used
    # Preprocessing again into the same prefix, from other documents.
    with open(builtin_corpus.path, encoding="utf-8") as lines:
        rows = lines.readlines()
    (tmp_path / "other.jsonl").write_text("".join(rows[::-1][: len(rows) * 3 // 4]))
    out = str(tmp_path / "other")
    preprocess(PreprocessConfig(
        inputs=[str(tmp_path / "other.jsonl")], output_prefix=out,
        tokenizer_type="GPTSentencePieceTokenizer", tokenizer_model=sentencepiece_model,
        append_eod=True, workers=0, log_interval=10**9), progress_stream=open(os.devnull, "w"))
    for suffix in (".bin", ".idx"):
        os.replace(out + "_text_document" + suffix, prefix + suffix)
    with pytest.raises(DatasetFileError, match=r"index cache was built from other contents of "
                                               r".*p\.bin/\.idx.*delete the folder"):
        build(prefix, sp_tokenizer)
    shutil.rmtree(os.path.join(prefix, "cache"))  # the fix the message names
    assert len(build(prefix, sp_tokenizer).train) > 0


def test_unwritable_cache_names_data_cache_path(prefix, sp_tokenizer, tmp_path):
    # A file where megatron's default cache folder must go (root ignores chmod, so this
    # stands in for a read-only data folder: the same OSError path).
    open(os.path.join(prefix), "w").close()
    with pytest.raises(DatasetFileError, match="cannot write megatron's dataset index cache.*"
                                               "pass --data-cache-path with a writable folder"):
        build(prefix, sp_tokenizer)
    if os.geteuid() != 0:
        os.remove(prefix)
        os.chmod(tmp_path, 0o555)
        try:
            with pytest.raises(DatasetFileError, match="pass --data-cache-path"):
                build(prefix, sp_tokenizer)
        finally:
            os.chmod(tmp_path, 0o755)
    assert len(build(prefix, sp_tokenizer, tmp_path / "elsewhere").train) > 0
