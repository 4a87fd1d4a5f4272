"""Stage datasets: sample layout, the λ split, determinism, resumption, errors."""

import numpy
import pytest
import torch

from patch_megatron.data.patch_dataset import DatasetTooSmallError
from patch_megatron.data.stage_datasets import build_stage_datasets

T, K, SEED = 32, 4, 1234
BUDGET = 60_000  # tokens for the whole run, below the corpus size (~ 330k tokens)


def build(prefix, tokenizer, cache, stage, **overrides):
    args = dict(data_path=[prefix], split="90,8,2", seq_length=T, patch_size=K, stage=stage,
                patch_data_fraction=2 / 3, train_token_budget=BUDGET, seed=SEED,
                data_cache_path=str(cache), tokenizer=tokenizer)
    args.update(overrides)
    return build_stage_datasets(**args)


@pytest.fixture(scope="module")
def stages(builtin_data_prefix, sp_tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {stage: build(builtin_data_prefix, sp_tokenizer, cache, stage)
            for stage in ("patch", "token")}


def test_patch_sample_layout(stages):
    ds = stages["patch"]
    assert ds.train_samples == -(-40_000 // (K * T))
    for i in (0, 7, ds.train_samples - 1):
        s = ds.train[i]
        assert s["tokens"].dtype == torch.int64 and s["tokens"].shape == (K * T,)
        assert s["labels"].shape == (K * T,) and s["loss_mask"].dtype == torch.float32
        assert torch.equal(s["position_ids"], torch.arange(T))
        # labels[i*K + k] is token k of patch i+1: labels = raw[K:], tokens = raw[:K*T].
        assert torch.equal(s["labels"][:-K], s["tokens"][K:])
    # Validation is token format (K=1) in the patch stage too.
    v = ds.valid[0]
    assert v["tokens"].shape == (T,) and torch.equal(v["labels"][:-1], v["tokens"][1:])


def test_token_stage_equals_megatron_gpt_sample(stages, sp_tokenizer):
    ds = stages["token"]
    s = ds.train[3]
    raw, _ = ds.train._query_document_sample_shuffle_indices(3)  # GPTDataset's own window
    assert torch.equal(s["tokens"], torch.from_numpy(raw[:-1]))
    assert torch.equal(s["labels"], torch.from_numpy(raw[1:]))
    # Round trip: the window decodes to text that occurs in the corpus.
    text = sp_tokenizer.detokenize(raw.tolist())
    assert len(text) > 20


def test_lambda_split_disjoint_and_covering(stages, builtin_data_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    patch = set(stages["patch"].train.stage_document_indices.tolist())
    token = set(stages["token"].train.stage_document_indices.tolist())
    assert patch and token and not patch & token
    indexed = IndexedDataset(builtin_data_prefix)  # keep it alive: its arrays are mmapped
    lengths = indexed.sequence_lengths
    patch_window, token_window = stages["patch"].stream_windows[builtin_data_prefix]
    assert sum(lengths[d] for d in patch) >= patch_window
    assert sum(lengths[d] for d in token) >= token_window
    # Every sample reads only its own stage's documents.
    for stage, owned in (("patch", patch), ("token", token)):
        train = stages[stage].train
        for i in range(0, stages[stage].train_samples, 17):
            _, documents = train._query_document_sample_shuffle_indices(i)
            assert set(documents.tolist()) <= owned


def test_no_budget_splits_all_train_documents(builtin_data_prefix, sp_tokenizer, tmp_path,
                                              stages):
    built = {stage: build(builtin_data_prefix, sp_tokenizer, tmp_path, stage,
                          train_token_budget=None) for stage in ("patch", "token")}
    patch = set(built["patch"].train.stage_document_indices.tolist())
    token = set(built["token"].train.stage_document_indices.tolist())
    n = len(stages["patch"].valid.dataset.sequence_lengths)
    assert not patch & token and patch | token == set(range(int(round(0.9 * n))))


def test_deterministic_and_resumable(stages, builtin_data_prefix, sp_tokenizer, tmp_path):
    # A fresh cache (rebuilt indices) and a warm one give the same stream.
    for cache in (tmp_path / "fresh", tmp_path / "fresh"):
        again = build(builtin_data_prefix, sp_tokenizer, cache, "patch")
        consumed = 11  # a resumed run skips consumed samples and continues
        for i in range(consumed, consumed + 5):
            assert torch.equal(again.train[i]["tokens"], stages["patch"].train[i]["tokens"])
    other = build(builtin_data_prefix, sp_tokenizer, tmp_path / "o", "patch", seed=SEED + 1)
    assert not torch.equal(other.train[0]["tokens"], stages["patch"].train[0]["tokens"])


def test_weighted_blend_needs_a_process_group(builtin_data_prefix, sp_tokenizer, tmp_path):
    if torch.distributed.is_initialized():
        pytest.skip("an earlier test of this session started torch.distributed in-process")
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        build_stage_datasets(["0.3", builtin_data_prefix, "0.7", builtin_data_prefix],
                             "90,8,2", T, K, "token", 0.5, BUDGET, SEED, str(tmp_path),
                             valid_samples=20, test_samples=5, tokenizer=sp_tokenizer)


def test_weighted_blend(builtin_data_prefix, sp_tokenizer, tmp_path, model_parallel_world_of_one):
    check_weighted_blend(builtin_data_prefix, sp_tokenizer, tmp_path)


def check_weighted_blend(builtin_data_prefix, sp_tokenizer, tmp_path):
    ds = build_stage_datasets(["0.3", builtin_data_prefix, "0.7", builtin_data_prefix],
                              "90,8,2", T, K, "token", 0.5, BUDGET, SEED, str(tmp_path),
                              valid_samples=20, test_samples=5, tokenizer=sp_tokenizer)
    assert len(ds.train) >= ds.train_samples and ds.train[0]["tokens"].shape == (T,)
    assert len(ds.valid) >= 20 and ds.valid[0]["tokens"].shape == (T,)
    with pytest.raises(ValueError, match="sample counts for every split"):
        build_stage_datasets(["1", builtin_data_prefix, "1", builtin_data_prefix], "90,8,2",
                             T, K, "token", 0.5, BUDGET, SEED, str(tmp_path),
                             tokenizer=sp_tokenizer)


def test_too_small_and_bad_arguments(builtin_data_prefix, sp_tokenizer, tmp_path):
    with pytest.raises(DatasetTooSmallError, match="fewer than one sample"):
        build(builtin_data_prefix, sp_tokenizer, tmp_path, "patch", seq_length=200_000)
    with pytest.raises(ValueError, match="patch stage has no data"):
        build(builtin_data_prefix, sp_tokenizer, tmp_path, "patch", patch_data_fraction=0.0)
    from patch_megatron.data.index_validation import DatasetFileError
    with pytest.raises(DatasetFileError, match="index file not found"):
        build(str(tmp_path / "missing"), sp_tokenizer, tmp_path, "token")
