"""EST's schedule, sampler, flags and FLOPs accounting (no model built)."""

import argparse

import pytest

from patch_megatron.model.shape import ModelShape, llama_shape
from patch_megatron import flops
from patch_megatron.est.arguments import add_est_args, est_config_from_args
from patch_megatron.est.control import SubnetworkTraining
from patch_megatron.est.sampler import LayerChoice, Layout, Subnetwork, sample_subnetwork
from patch_megatron.est.schedule import ESTConfig, StageRates

SHAPE = ModelShape(num_layers=8, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                   ffn_hidden_size=64, vocab_size=None)
HALF = StageRates(layers=0.5, heads=0.5, mlp_units=0.5)


def test_stages_follow_the_run_fractions():
    config = ESTConfig(enabled=True, stage_ends=(0.25, 0.5), layer_rates=(0.5, 1.0),
                       head_rates=(0.5, 0.75), mlp_rates=(0.25, 0.5))
    stages = [config.stage_index(i, 8) for i in range(1, 9)]
    assert stages == [0, 0, 1, 1, 2, 2, 2, 2]
    assert config.rates(1, 8) == StageRates(0.5, 0.5, 0.25)
    assert config.rates(3, 8) == StageRates(1.0, 0.75, 0.5)
    assert config.rates(8, 8).is_full
    assert ESTConfig(enabled=False).rates(1, 8).is_full
    text = config.describe(8)
    assert "iterations 1-2" in text and "iterations 5-8): full model" in text


@pytest.mark.parametrize("kwargs, message", [
    (dict(stage_ends=(0.5, 0.4)), "increase"),
    (dict(stage_ends=(0.5, 1.0)), "increase"),
    (dict(layer_rates=(0.5,)), "per sampled stage"),
    (dict(head_rates=(0.0, 0.5)), r"\(0, 1\]"),
    (dict(gqa_sampling="rows"), "GQA"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ESTConfig(enabled=True, **kwargs)


def test_masks_depend_only_on_seed_and_iteration():
    a = sample_subnetwork(HALF, SHAPE, Layout(), seed=5, iteration=7)
    assert a == sample_subnetwork(HALF, SHAPE, Layout(), seed=5, iteration=7)
    assert a != sample_subnetwork(HALF, SHAPE, Layout(), seed=5, iteration=8)
    assert a != sample_subnetwork(HALF, SHAPE, Layout(), seed=6, iteration=7)
    assert sample_subnetwork(StageRates(), SHAPE, Layout(), 5, 7).is_full


def test_resume_draws_the_same_masks():
    config = ESTConfig(enabled=True, stage_ends=(0.5,), layer_rates=(0.5,), head_rates=(0.5,),
                       mlp_rates=(0.5,), seed=11)
    first = SubnetworkTraining(config, SHAPE, Layout(2, 2), train_iters=20)
    seen = [first.subnetwork(i) for i in range(1, 21)]
    resumed = SubnetworkTraining(config, SHAPE, Layout(2, 2), train_iters=20)  # a fresh process
    assert [resumed.subnetwork(i) for i in range(9, 21)] == seen[8:]
    assert len({m for m in seen[:10]}) == 10  # a new subnetwork every sampled step


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 4), (2, 2), (4, 2)])
@pytest.mark.parametrize("mode", ["groups", "heads"])
def test_counts_are_equal_per_tp_rank_and_pipeline_stage(tp, pp, mode):
    per_stage, groups_per_rank, units_per_rank = 8 // pp, 4 // tp, 64 // tp
    for iteration in range(1, 30):
        mask = sample_subnetwork(StageRates(0.3, 0.5, 0.4), SHAPE, Layout(tp, pp), 1, iteration, mode)
        kept_per_stage = [sum(c is not None for c in mask.layers[s * per_stage:(s + 1) * per_stage])
                          for s in range(pp)]
        assert len(set(kept_per_stage)) == 1 and kept_per_stage[0] >= 1  # never an empty stage
        for choice in mask.layers:
            if choice is None:
                continue
            if choice.heads is None:  # one group per TP rank: "groups" mode cannot drop any
                assert mode == "groups" and groups_per_rank == 1
                continue
            heads_per_rank = [sum(r * groups_per_rank * 2 <= h < (r + 1) * groups_per_rank * 2
                                  for h in choice.heads) for r in range(tp)]
            units_per_rank_kept = [sum(r * units_per_rank <= u < (r + 1) * units_per_rank
                                       for u in choice.units) for r in range(tp)]
            assert len(set(heads_per_rank)) == 1 and len(set(units_per_rank_kept)) == 1
            groups = {h // 2 for h in choice.heads}
            if mode == "groups":  # whole groups: both query heads of every kept group
                assert all({2 * g, 2 * g + 1} <= set(choice.heads) for g in groups)
            else:  # every group stays, one of its two query heads kept
                assert groups == {0, 1, 2, 3} and len(choice.heads) == 4


def test_layouts_that_cannot_keep_equal_counts_are_refused():
    with pytest.raises(ValueError, match="whole query groups"):
        sample_subnetwork(HALF, SHAPE, Layout(8, 1), 1, 1)


def test_flops_of_a_sampled_step_match_a_hand_count():
    """h=16, heads=4 (d=4), groups=2, f=32, V=64, s=8, 4 layers; keep 2 layers, 1 group, 8 units."""
    model = llama_shape(num_layers=4, hidden_size=16, ffn_hidden_size=32, num_attention_heads=4,
                        vocab_size=64, num_query_groups=2)
    shape = model
    choice = LayerChoice(heads=(2, 3), units=(0, 3, 9, 12, 17, 20, 26, 31))
    kept = Subnetwork((None, choice, None, choice)).kept_fractions(shape)
    assert kept == flops.KeptFractions(layers=0.5, attention_heads=0.5, mlp_units=0.25, query_groups=0.5)
    s, h = 8, 16
    # Per kept layer: QKV rows = 2 queries + 1 key + 1 value head of 4 = 16 rows; 2 heads of d=4
    # in the scores and values; proj columns 8; SwiGLU 8 units (16 fc1 rows, 8 fc2 columns).
    qkv = 2 * s * h * 16
    attention = 2 * (2 * s * s * 8)
    proj = 2 * s * 8 * h
    mlp = 2 * s * h * 16 + 2 * s * 8 * h
    head = 2 * s * h * 64
    hand = 3 * (2 * (qkv + attention + proj + mlp) + head)
    assert flops.training_flops_per_sample(model, s, kept=kept) == hand
    # GQA "heads" mode keeps every K/V head: 2 of 4 query heads in 2 groups.
    inside = LayerChoice(heads=(0, 3), units=None)
    kept = Subnetwork((inside,) * 4).kept_fractions(shape)
    assert kept.query_groups == 1.0 and kept.attention_heads == 0.5 and kept.mlp_units == 1.0
    per_layer = 2 * s * h * (8 + 2 * 8) + 2 * (2 * s * s * 8) + 2 * s * 8 * h + 2 * s * h * 64 + 2 * s * 32 * h
    assert flops.training_flops_per_sample(model, s, kept=kept) == 3 * (4 * per_layer + head)


def test_summary_reports_flops_and_wall_clock_separately():
    config = ESTConfig(enabled=True, stage_ends=(0.5,), layer_rates=(0.5,), head_rates=(1.0,),
                       mlp_rates=(1.0,))
    control = SubnetworkTraining(config, SHAPE, Layout(), train_iters=8)
    for i in range(1, 9):
        sampled = i <= 4
        control.record(50.0 if sampled else 100.0, 100.0, 0.8 if sampled else 1.0, iteration=i)
    text = control.summary()
    assert "FLOPs saved 25.0%" in text and "wall-clock saved 10.0%" in text


def test_flags_are_off_by_default_and_parse():
    parser = add_est_args(argparse.ArgumentParser())
    config = est_config_from_args(parser.parse_args([]))
    assert not config.enabled
    args = parser.parse_args(["--est", "--est-stage-ends", "0.2,0.6", "--est-layer-rates", "0.5,1",
                              "--est-head-rates", "0.5,0.75", "--est-mlp-rates", "0.5,0.5",
                              "--est-gqa-sampling", "heads", "--est-seed", "9"])
    config = est_config_from_args(args)
    assert config == ESTConfig(enabled=True, stage_ends=(0.2, 0.6), layer_rates=(0.5, 1.0),
                               head_rates=(0.5, 0.75), mlp_rates=(0.5, 0.5), gqa_sampling="heads", seed=9)
    with pytest.raises(ValueError, match="--est flags"):
        est_config_from_args(parser.parse_args(["--est", "--est-stage-ends", "0.5"]))
