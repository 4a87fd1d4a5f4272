"""Chinchilla's published numbers and the loss fits' compute-optimal frontier."""

import math

import pytest

from patch_megatron.planning.chinchilla import (
    BESIROGLU_2024,
    HOFFMANN_2022,
    chinchilla_compute,
    rule_optimal_params_tokens,
)

# Hoffmann et al. 2022, Approach 1 table: (parameters, FLOPs, tokens).
APPROACH_1_ROWS = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
]


@pytest.mark.parametrize("params, flops, tokens", APPROACH_1_ROWS)
def test_rule_reproduces_approach_1_from_compute(params, flops, tokens):
    n, d = rule_optimal_params_tokens(flops)
    assert n == pytest.approx(params, rel=0.03)
    assert d == pytest.approx(tokens, rel=0.03)


@pytest.mark.parametrize("params, flops, tokens", APPROACH_1_ROWS)
def test_rule_reproduces_approach_1_from_model_size(params, flops, tokens):
    d = 20 * params
    assert d == pytest.approx(tokens, rel=0.03)
    assert chinchilla_compute(params, d) == pytest.approx(flops, rel=0.03)


def test_loss_formula_by_hand():
    # 1.69 + 406.4 / 1e9^0.34 + 410.7 / 2e10^0.28
    expected = 1.69 + 406.4 / math.exp(0.34 * math.log(1e9)) + 410.7 / math.exp(0.28 * math.log(2e10))
    assert HOFFMANN_2022.loss(1e9, 2e10) == pytest.approx(expected, rel=1e-12)
    assert HOFFMANN_2022.loss(1e9, 2e10) == pytest.approx(2.5786, abs=2e-3)


@pytest.mark.parametrize("fit", [HOFFMANN_2022, BESIROGLU_2024], ids=lambda f: f.name)
@pytest.mark.parametrize("compute", [1e19, 1e21, 1e24])
def test_frontier_is_the_minimum_of_the_fit_at_fixed_compute(fit, compute):
    n_opt, d_opt = fit.optimal_params_tokens(compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute, rel=1e-9)
    # Scan N over four decades around the optimum at C = 6ND.
    grid = [n_opt * 10 ** (i / 200) for i in range(-400, 401)]
    best = min(grid, key=lambda n: fit.loss(n, compute / (6 * n)))
    assert best == pytest.approx(n_opt, rel=0.012)  # grid spacing is 1.2%
    assert fit.loss(n_opt, d_opt) <= fit.loss(best, compute / (6 * best)) + 1e-12


def test_hoffmann_frontier_exponents_match_paper_approach_3():
    # The paper reports N_opt ∝ C^0.46, D_opt ∝ C^0.54 for Approach 3.
    (n1, d1), (n2, d2) = HOFFMANN_2022.optimal_params_tokens(1e20), HOFFMANN_2022.optimal_params_tokens(1e24)
    assert math.log(n2 / n1) / math.log(1e4) == pytest.approx(0.46, abs=0.01)
    assert math.log(d2 / d1) / math.log(1e4) == pytest.approx(0.54, abs=0.01)


@pytest.mark.parametrize("params, flops, tokens", APPROACH_1_ROWS)
def test_refit_frontier_agrees_with_approach_1(params, flops, tokens):
    # The 2024 refit's frontier lands near the paper's Approach-1 table,
    # which is why it is the default fit.
    n, d = BESIROGLU_2024.optimal_params_tokens(flops)
    assert n == pytest.approx(params, rel=0.1)
    assert d == pytest.approx(tokens, rel=0.1)
    # The original Approach-3 values favour far more data than 20 tokens/param.
    n3, d3 = HOFFMANN_2022.optimal_params_tokens(flops)
    assert d3 / n3 > 30


@pytest.mark.parametrize("fit", [HOFFMANN_2022, BESIROGLU_2024], ids=lambda f: f.name)
def test_frontier_inverses_are_consistent(fit):
    n, d = fit.optimal_params_tokens(3e22)
    assert fit.optimal_tokens_for_params(n) == pytest.approx(d, rel=1e-9)
    assert fit.optimal_params_for_tokens(d) == pytest.approx(n, rel=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError, match="compute must be positive"):
        rule_optimal_params_tokens(-1.0)
    with pytest.raises(ValueError, match="positive"):
        BESIROGLU_2024.loss(0, 1e9)
