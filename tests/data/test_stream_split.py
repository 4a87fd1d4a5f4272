"""The λ split arithmetic: disjoint stages that cover the window."""

import numpy
import pytest

from patch_megatron.data.stream_split import (
    StreamWindow, stage_documents, stage_samples, stream_tokens_for_samples, window_for_prefix)


def test_stage_samples_split_the_budget():
    # B = 3 * 4 * 64 * 10 tokens, λ = 2/3: patch 2/3 of B in K*T=256-token samples.
    budget = 7680
    assert stage_samples("patch", budget, 2 / 3, 64, 4) == 20
    assert stage_samples("token", budget, 2 / 3, 64, 4) == 40
    assert stream_tokens_for_samples(20, 259) == 20 * 259 + 1


def test_window_shrinks_in_proportion_when_data_is_short():
    assert window_for_prefix(10_000, 0.5, 3000, 2000) == StreamWindow(3000, 2000)
    assert window_for_prefix(1000, 0.5, 3000, 2000) == StreamWindow(600, 400)
    assert window_for_prefix(1000, 0.25, None, None) == StreamWindow(250, 750)


@pytest.mark.parametrize("window", [StreamWindow(300, 500), StreamWindow(700, 10_000)])
def test_stage_documents_disjoint_and_covering(window):
    rng = numpy.random.default_rng(0)
    documents = numpy.arange(10, 110, dtype=numpy.int32)
    lengths = rng.integers(1, 20, size=documents.size)
    patch = stage_documents(documents, lengths, window, "patch", seed=5)
    token = stage_documents(documents, lengths, window, "token", seed=5)
    assert not set(patch) & set(token)
    length_of = dict(zip(documents.tolist(), lengths.tolist()))
    patch_tokens = sum(length_of[d] for d in patch)
    token_tokens = sum(length_of[d] for d in token)
    # Whole documents: each stage holds at least its tokens, less one document's worth.
    assert window.patch_tokens <= patch_tokens < window.patch_tokens + 20
    if window.patch_tokens + window.token_tokens >= lengths.sum():
        assert set(patch) | set(token) == set(documents.tolist())  # covers all data
    else:
        assert window.token_tokens <= token_tokens < window.token_tokens + 20
    # Same seed, same split; another seed, another stream order.
    assert numpy.array_equal(patch, stage_documents(documents, lengths, window, "patch", 5))
    assert not numpy.array_equal(patch, stage_documents(documents, lengths, window, "patch", 6))
