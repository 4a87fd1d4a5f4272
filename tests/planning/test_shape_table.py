"""The shape table is valid for Megatron and names its sizes honestly."""

import pytest

from patch_megatron.planning.shapes import SHAPE_TABLE, nearest_shape, shape_by_name

VOCAB = 32000


@pytest.mark.parametrize("choice", SHAPE_TABLE, ids=lambda c: c.name)
def test_shape_is_launchable(choice):
    tp, pp = choice.tensor_model_parallel_size, choice.pipeline_model_parallel_size
    assert choice.num_attention_heads % tp == 0
    assert choice.num_query_groups % tp == 0
    assert choice.num_attention_heads % choice.num_query_groups == 0
    assert choice.hidden_size % choice.num_attention_heads == 0
    assert choice.ffn_hidden_size % tp == 0
    assert choice.num_layers % pp == 0
    assert choice.global_batch_tokens % 2048 == 0


def test_table_grows_monotonically():
    sizes = [c.parameters(VOCAB) for c in SHAPE_TABLE]
    assert sizes == sorted(sizes)


@pytest.mark.parametrize("name, params", [("370M", 370e6), ("780M", 780e6), ("1.3B", 1.3e9), ("2.7B", 2.7e9),
                                          ("7B", 6.7e9), ("13B", 13e9), ("70B", 69e9)])
def test_names_match_parameter_counts(name, params):
    assert shape_by_name(name).parameters(VOCAB) == pytest.approx(params, rel=0.04)


def test_paper_shapes_are_verbatim():
    # The patch-level paper's models (docs/method.md §1).
    for name, hidden, ffn, layers, heads in [("370M", 1024, 2752, 24, 16), ("780M", 1536, 4128, 24, 16),
                                             ("1.3B", 2048, 5504, 24, 16), ("2.7B", 2560, 6880, 32, 32)]:
        c = shape_by_name(name)
        assert (c.hidden_size, c.ffn_hidden_size, c.num_layers, c.num_attention_heads) == (hidden, ffn, layers, heads)


def test_nearest_shape():
    assert nearest_shape(1.25e9, VOCAB).name == "1.3B"
    assert nearest_shape(400e6, VOCAB).name == "370M"
    with pytest.raises(ValueError, match="unknown shape"):
        shape_by_name("3.14B")
