"""Fill-in-the-middle samples (patch_megatron/data/fim.py): the rules of Bavarian et al. 2022 as
Megatron-LM applies them, checked on a character tokenizer and on the real data pipeline."""

import os
import re
import subprocess
import sys
import warnings

import numpy
import pytest
import torch

from patch_megatron.data import fim
from patch_megatron.data.fim import FIMConfig, rearrange, sample_generator
from repo_tools import IN_PROCESS_READING, REPO_ROOT, child_environment

PRE, MID, SUF, PAD, EOD, SPLIT = 1001, 1002, 1003, 1004, 0, ord("|")


class Characters:
    """One id per character (its code point): a segment's text is its ids."""

    vocab = {"<pre>": PRE, "<mid>": MID, "<suf>": SUF, "<pad>": PAD, "<eod>": EOD}
    unk = None

    def tokenize(self, text):
        return [ord(c) for c in text]

    def detokenize(self, ids):
        return "".join(chr(i) for i in ids)


def config(**changes):
    values = dict(rate=1.0, spm_rate=0.0, prefix_id=PRE, middle_id=MID, suffix_id=SUF,
                  pad_id=PAD, eod_id=EOD)
    values.update(changes)
    return FIMConfig(**values)


def ids(text):
    return numpy.array([EOD if c == "$" else ord(c) for c in text], dtype=numpy.int64)


def pieces(out):
    """The segments of a rearranged window, split at EOD, as (kind, prefix, middle, suffix)."""
    text = "".join({PRE: "<", MID: ">", SUF: "^", PAD: "_", EOD: "$"}.get(int(i), chr(int(i)))
                   for i in out)
    segments = []
    for segment in text.split("$"):
        psm = re.fullmatch(r"<([^<>^]*)\^([^<>^]*)>([^<>^_]*)_*", segment)
        spm = re.fullmatch(r"<\^([^<>^]*)>([^<>^_]*)_*", segment)
        # SPM reads as PSM with an empty prefix: its prefix and middle follow <mid> together.
        if spm:
            segments.append(("spm", "", spm[2], spm[1]))
        elif psm:
            segments.append(("psm", psm[1], psm[3], psm[2]))
        else:
            segments.append(("as is", None, segment, None))
    return segments


def test_rate_zero_leaves_the_window_as_read():
    window = ids("def f(x):$    return x$")
    out = rearrange(window, config(rate=0.0), Characters(), numpy.random.default_rng(0))
    assert numpy.array_equal(out, window) and out.dtype == window.dtype


@pytest.mark.parametrize("seed", range(5))
def test_psm_moves_the_middle_to_the_end_of_each_segment(seed):
    # Long enough for three segments' sentinels: the window is cut back to its length.
    segments = ["import os", "print(os.sep)", "x = 1 + 2"]
    window = ids("$".join(segments) + "$" + "y" * 12)
    out = rearrange(window, config(), Characters(), numpy.random.default_rng(seed))
    assert len(out) == len(window)
    found = pieces(out)
    for original, (kind, prefix, middle, suffix) in zip(segments, found):
        assert kind in ("psm", "spm") and prefix + middle + suffix == original
    assert list(out).count(EOD) == 3  # every EOD stays where a segment ends


@pytest.mark.parametrize("seed", range(5))
def test_spm_puts_the_suffix_first(seed):
    window = ids("abcdefghij$" + "k" * 8)
    out = rearrange(window, config(spm_rate=1.0), Characters(), numpy.random.default_rng(seed))
    assert list(out[:2]) == [PRE, SUF]
    body = "".join(chr(i) for i in out[2:out.tolist().index(EOD)])
    suffix, rest = body.split(chr(MID))
    # <pre><suf> suffix <mid> prefix middle: the segment's text with its end moved to the front.
    assert rest + suffix == "abcdefghij"


def test_the_window_keeps_its_length_padding_what_is_short():
    # A segment whose text re-encodes shorter (here: a piece the tokenizer drops) is padded.
    class Dropping(Characters):
        def tokenize(self, text):
            return [ord(c) for c in text if c != "z"]

    window = ids("zzzz")
    out = rearrange(window, config(), Dropping(), numpy.random.default_rng(1))
    assert len(out) == 4 and out[0] == PRE and out[-1] == PAD


def test_a_segment_is_cut_into_fragments_at_the_split_token():
    window = ids("aaaa|bbbb|cccc" + "$" * 10)
    out = rearrange(window, config(split_sample_id=SPLIT, fragment_rate=1.0), Characters(),
                    numpy.random.default_rng(3))
    first = out[:out.tolist().index(EOD)].tolist()
    fragments = [f for f in re.split(r"\|", "".join(chr(i) for i in first))]
    assert len(fragments) == 3
    for fragment, letter in zip(fragments, "abc"):
        assert fragment[0] == chr(PRE)
        rest = fragment.replace(chr(PRE), "").replace(chr(SUF), "").replace(chr(MID), "")
        assert sorted(rest) == [letter] * 4
    # Fragments left alone at rate 0; --fim-no-prefix leaves the ones starting with it alone.
    kept = rearrange(window, config(split_sample_id=SPLIT, fragment_rate=0.0), Characters(),
                     numpy.random.default_rng(3))
    assert numpy.array_equal(kept, window)
    spared = rearrange(ids("bbbb"), config(no_prefix="bb"), Characters(),
                       numpy.random.default_rng(3))
    assert numpy.array_equal(spared, ids("bbbb"))


def test_each_sample_draws_from_its_own_generator():
    window = ids("the quick brown fox jumps over the lazy dog" + "$" * 6)
    draws = [rearrange(window, config(rate=0.5, spm_rate=0.5), Characters(),
                       sample_generator(1234, "ab12cd34ef", index)) for index in range(40)]
    again = [rearrange(window, config(rate=0.5, spm_rate=0.5), Characters(),
                       sample_generator(1234, "ab12cd34ef", index)) for index in range(40)]
    assert all(numpy.array_equal(a, b) for a, b in zip(draws, again))
    kinds = [pieces(d)[0][0] for d in draws]
    assert {"psm", "spm", "as is"} <= set(kinds)  # both forms and untouched samples occur


def test_tokens_missing_from_the_vocabulary_become_the_unknown_one_with_a_warning():
    class WithUnknown(Characters):
        unk = 7

    with pytest.warns(UserWarning, match=r"--fim-prefix-token '<fim_prefix>' is not in the "
                                         r"tokenizer's vocabulary: as in Megatron-LM it becomes "
                                         r"the unknown token \(id 7\)"):
        assert fim.token_id(WithUnknown(), "--fim-prefix-token", "<fim_prefix>") == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fim.token_id(Characters(), "--fim-pad-token", "<pad>") == PAD
    with pytest.raises(ValueError, match="has no unknown token to stand for it"):
        fim.token_id(Characters(), "--fim-prefix-token", "<fim_prefix>")


def test_stage_datasets_serve_fim_windows(builtin_data_prefix, sp_tokenizer, tmp_path):
    from patch_megatron.data.stage_datasets import build_stage_datasets

    # Real pieces of the model stand in for the sentinels (it has no FIM tokens of its own).
    pre, mid, suf = (fim.token_id(sp_tokenizer, "--fim-x-token", piece)
                     for piece in ("▁the", "▁of", "▁and"))
    fim_config = FIMConfig(rate=1.0, spm_rate=0.0, prefix_id=pre, middle_id=mid, suffix_id=suf,
                           pad_id=sp_tokenizer.eod, eod_id=sp_tokenizer.eod)

    def build(fim_config):
        return build_stage_datasets(
            [builtin_data_prefix], "90,8,2", 32, 4, "patch", 2 / 3, 60_000, 1234,
            str(tmp_path), tokenizer=sp_tokenizer, fim=fim_config)

    plain, rearranged, again = build(None), build(fim_config), build(fim_config)
    for i in (0, 5, 11):
        window, _ = plain.train._query_document_sample_shuffle_indices(i)
        fim_window, _ = rearranged.train._query_document_sample_shuffle_indices(i)
        assert len(fim_window) == len(window) and fim_window.dtype == window.dtype
        if window[0] != sp_tokenizer.eod:
            assert fim_window[0] == pre  # the first segment starts with the prefix sentinel
        # The same sample is rearranged the same way by a dataset built afresh (a resume).
        sample, repeat = rearranged.train[i], again.train[i]
        assert all((sample[k] == repeat[k]).all() for k in sample)
        assert (sample["tokens"] == torch.from_numpy(fim_window[:128])).all()
    assert (rearranged.valid[0]["tokens"] != plain.valid[0]["tokens"]).any()  # every split


def test_a_run_trains_on_fim_samples(builtin_data_prefix, sentencepiece_model, tmp_path):
    # Megatron-LM's --fim-data flags on the real pipeline; the SentencePiece model lacks the FIM
    # tokens, which the run names (they become its unknown piece, as in Megatron-LM).
    flags = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 16 "
             "--micro-batch-size 2 --global-batch-size 4 --train-iters 3 --lr 3e-4 --cpu "
             "--patch-size 4 --patch-data-fraction 0.667 --split 90,10,0 --eval-iters 1 "
             "--log-interval 1 "
             "--tokenizer-type GPTSentencePieceTokenizer --fim-data --fim-rate 0.9").split()
    def train(readers):
        return subprocess.run(
            [sys.executable, os.path.join(REPO_ROOT, "pretrain_patch_gpt.py"), *flags,
             *readers, "--data-path", builtin_data_prefix, "--tokenizer-model",
             sentencepiece_model, "--data-cache-path", str(tmp_path / "cache")],
            capture_output=True, text=True, env=child_environment(PYTHONWARNINGS="default"),
            timeout=240, cwd=REPO_ROOT)

    result = train(IN_PROCESS_READING)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--fim-prefix-token '<fim_prefix>'", "--fim-eod-token '<|endoftext|>'"):
        assert f"{flag} is not in the tokenizer's vocabulary" in result.stderr
    losses = re.findall(r"patch loss: (\S+)", result.stdout)
    assert len(losses) == 3
    # Two reader processes read the very same FIM samples (each sample's own generator).
    readers = train(["--num-workers", "2"])
    assert readers.returncode == 0, readers.stderr[-3000:]
    assert re.findall(r"patch loss: (\S+)", readers.stdout) == losses
