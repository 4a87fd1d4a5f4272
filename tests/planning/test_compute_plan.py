"""Sizing, patch-level and EST accounting, stage schedules, and input errors."""

import math

import pytest

from patch_megatron.flops import flops_per_token
from patch_megatron.model.shape import padded_vocab_size
from patch_megatron.planning.commands import build_commands
from patch_megatron.planning.plan import PlanInputs, PlanningError, compute_plan
from patch_megatron.planning.shapes import SHAPE_TABLE


def _exact_fpt(plan):
    vocab = padded_vocab_size(plan.inputs.vocab_size, tensor_model_parallel_size=plan.shape.tensor_model_parallel_size)
    return flops_per_token(plan.shape.model_shape(vocab), plan.inputs.seq_length)


def test_compute_budget_is_spent_with_exact_architecture_flops():
    plan = compute_plan(PlanInputs(compute=1.21e20))
    assert plan.token_only_compute == pytest.approx(1.21e20, rel=1e-12)
    assert plan.tokens * _exact_fpt(plan) == pytest.approx(1.21e20, rel=1e-12)
    # Our per-token FLOPs exceed 6N at T=2048 (attention) for this size.
    assert plan.flops_per_token_token_stage > plan.six_n


@pytest.mark.parametrize("compute", [1.92e19, 1.21e20, 1.23e22])
def test_rule_sizing_picks_the_table_shape_closest_to_20_tokens_per_parameter(compute):
    plan = compute_plan(PlanInputs(compute=compute))
    ratios = {}
    for c in SHAPE_TABLE:
        vocab = padded_vocab_size(32000, tensor_model_parallel_size=c.tensor_model_parallel_size)
        ratios[c.name] = compute / flops_per_token(c.model_shape(vocab), 2048) / c.parameters(32000)
    assert plan.shape.name == min(ratios, key=lambda name: abs(math.log(ratios[name] / 20)))
    assert plan.tokens_per_parameter == pytest.approx(ratios[plan.shape.name])


def test_approach_1_budget_gives_the_400m_class_model():
    plan = compute_plan(PlanInputs(compute=1.92e19))
    assert plan.shape.name == "370M"
    assert plan.chinchilla_reference["rule_parameters"] == pytest.approx(400e6, rel=0.01)
    assert plan.chinchilla_reference["rule_tokens"] == pytest.approx(8.0e9, rel=0.01)


def test_fit_sizing_follows_the_fit():
    # The original Approach-3 fit asks for far more data per parameter than the refit.
    # At 1e24 FLOPs the fits' optima (41B vs 96B parameters) fall on different table shapes.
    hoffmann = compute_plan(PlanInputs(compute=1e24, sizing="fit", loss_fit="hoffmann2022"))
    refit = compute_plan(PlanInputs(compute=1e24, sizing="fit", loss_fit="besiroglu2024"))
    assert hoffmann.tokens_per_parameter > 2 * refit.tokens_per_parameter
    assert 10 < refit.tokens_per_parameter < 40
    # The chosen shape is no worse under the fit than its table neighbours.
    for plan, fit_name in ((hoffmann, "hoffmann2022"), (refit, "besiroglu2024")):
        i = SHAPE_TABLE.index(plan.shape)
        for neighbour in (SHAPE_TABLE[i - 1], SHAPE_TABLE[i + 1]):
            other = compute_plan(PlanInputs(compute=1e24, parameters=neighbour.parameters(32000),
                                         loss_fit=fit_name))
            assert other.shape == neighbour
            assert plan.predicted_loss <= other.predicted_loss


def test_patch_cost_factor_and_stages():
    plan = compute_plan(PlanInputs(compute=1e21, patch_size=4, patch_fraction=2 / 3))
    assert plan.patch_cost_factor == pytest.approx(2 / 3 / 4 + 1 / 3)  # 0.5
    assert plan.patch_compute == pytest.approx(0.5 * plan.token_only_compute)
    assert plan.more_data_tokens == pytest.approx(2 * plan.tokens)
    assert plan.more_data_predicted_loss < plan.predicted_loss
    patch, token = plan.stages
    assert (patch.patch_size, token.patch_size) == (4, 1)
    # Same tokens per step: the patch stage takes 1/K the samples of K·T tokens.
    assert patch.global_batch_size * 4 == token.global_batch_size == plan.global_batch_size
    step_tokens = plan.global_batch_size * 2048
    # The run's N steps cover the planned tokens; the patch stage takes floor(λ·N).
    assert plan.total_iters == math.ceil(plan.tokens / step_tokens)
    assert patch.train_iters == math.floor(2 / 3 * plan.total_iters)
    assert patch.train_iters + token.train_iters == plan.total_iters
    assert patch.tokens == patch.train_iters * step_tokens
    # Whole steps: the stages' FLOPs exceed the plan's by less than one step of each stage.
    slack = step_tokens * (plan.flops_per_token_patch_stage + plan.flops_per_token_token_stage)
    assert 0 <= patch.flops + token.flops - plan.patch_compute < slack
    assert plan.planned_compute == pytest.approx(plan.patch_compute)
    assert 1 <= patch.warmup_iters <= 2000 and patch.warmup_iters <= 0.05 * patch.train_iters


@pytest.mark.parametrize("k, lam", [(1, 0.5), (4, 0.0)])
def test_no_patch_stage_is_token_only(k, lam):
    plan = compute_plan(PlanInputs(compute=1e20, patch_size=k, patch_fraction=lam))
    assert [s.name for s in plan.stages] == ["token-only"]
    assert plan.planned_compute == pytest.approx(plan.token_only_compute)
    assert [c.name for c in build_commands(plan)] == ["token-only"]


def test_est_factor_multiplies_the_planned_compute():
    base = compute_plan(PlanInputs(compute=1e21))
    est = compute_plan(PlanInputs(compute=1e21, est=True, est_flops_factor=0.75))
    assert est.planned_compute == pytest.approx(0.75 * base.planned_compute)
    assert any("EST" in a for a in est.assumptions)


def test_gpu_hours_budget():
    plan = compute_plan(PlanInputs(gpus=64, hours=24, gpu="A100", mfu=0.5))
    assert plan.token_only_compute == pytest.approx(64 * 24 * 3600 * 312e12 * 0.5)
    assert plan.hours(plan.token_only_compute) == pytest.approx(24)
    assert plan.data_parallel_size * plan.shape.tensor_model_parallel_size == 64
    custom = compute_plan(PlanInputs(gpus=8, hours=10, gpu="500"))
    assert custom.token_only_compute == pytest.approx(8 * 10 * 3600 * 500e12 * 0.40)
    assert any("assumed" in a for a in custom.assumptions)


def test_fixed_size_and_fixed_tokens():
    by_size = compute_plan(PlanInputs(parameters=1.3e9))
    assert by_size.shape.name == "1.3B"
    assert by_size.tokens == pytest.approx(20 * by_size.parameters)
    by_tokens = compute_plan(PlanInputs(tokens=2.6e10))
    assert by_tokens.shape.name == "1.3B"
    assert by_tokens.tokens == 2.6e10
    both = compute_plan(PlanInputs(parameters=370e6, tokens=360e9))
    assert both.token_only_compute == pytest.approx(360e9 * _exact_fpt(both))
    sized = compute_plan(PlanInputs(compute=1e21, parameters=1.3e9))
    assert sized.shape.name == "1.3B" and sized.token_only_compute == pytest.approx(1e21)


def test_batch_divides_over_data_parallel_ranks():
    plan = compute_plan(PlanInputs(gpus=24, hours=100, micro_batch_size=2))
    dp = plan.data_parallel_size
    assert plan.global_batch_size % (4 * 2 * dp) == 0
    for stage in plan.stages:
        assert stage.global_batch_size % (2 * dp) == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(compute=-1e21), "FLOP budget must be positive"),
    (dict(tokens=-5.0), "token budget must be positive"),
    (dict(compute=1e21, patch_fraction=1.0), r"λ must lie in \[0, 1\)"),
    (dict(compute=1e21, patch_fraction=-0.1), r"λ must lie in \[0, 1\)"),
    (dict(compute=1e21, patch_size=0), "K must be an integer >= 1"),
    (dict(gpus=8, hours=10, mfu=1.2), "MFU 1.2 is impossible"),
    (dict(gpus=8, hours=10, mfu=0.0), "MFU 0.0 is impossible"),
    (dict(gpus=8, hours=-1), "hours must be positive"),
    (dict(gpus=8, hours=10, gpu="B200"), "unknown GPU"),
    (dict(compute=1e21, parameters=1e9, tokens=2e10), "over-determine"),
    (dict(), "nothing to plan from"),
    (dict(hours=10), "--hours needs --gpus"),
    (dict(compute=1e21, est=True, est_flops_factor=1.5), "EST FLOPs factor"),
    (dict(compute=1e24, gpus=12), "multiple of"),
])
def test_bad_inputs_have_clear_errors(kwargs, message):
    with pytest.raises(PlanningError, match=message):
        compute_plan(PlanInputs(**kwargs))
