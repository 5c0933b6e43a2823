"""The scaling-law fits recover exponents they were given: isoFLOP curves made from a loss whose
compute-optimal size is known (N_opt = k C^a), and from Chinchilla's parametric loss
L(N, D) = E + A/N^alpha + B/D^beta, whose optimum grows as C^(beta/(alpha+beta)) (Hoffmann et al.
2022, eq. 4)."""

from __future__ import annotations

import numpy as np
import pytest
from nanorun.trainer.evaluation.scaling import compute_optimal, fit_power_law, isoflop_optimum

BUDGETS = [1e17, 1e18, 1e19, 1e20]


def test_a_parabola_in_log_params_has_its_minimum_where_it_was_put():
    n_opt = 3.0e8
    ns = n_opt * np.array([0.25, 0.5, 1.0, 2.0, 4.0])
    losses = 0.8 + 0.05 * np.log(ns / n_opt) ** 2
    tokens = 1e18 / (6 * ns)
    found = isoflop_optimum(1e18, ns, tokens, losses)
    assert found is not None
    assert found.params == pytest.approx(n_opt, rel=1e-6)
    assert found.tokens == pytest.approx(1e18 / (6 * n_opt), rel=1e-6)
    assert found.loss == pytest.approx(0.8, abs=1e-9)


def test_known_exponents_of_params_and_tokens_are_recovered():
    a = 0.46  # N_opt = k C^a, so D_opt = C / 6 N_opt grows as C^(1-a)
    points = []
    for c in BUDGETS:
        n_opt = 0.09 * c**a
        for factor in (0.2, 0.45, 1.0, 2.2, 5.0):
            n = n_opt * factor
            points.append((c, n, c / (6 * n), 1.0 - 0.02 * np.log10(c) + 0.04 * np.log(factor) ** 2))
    fit = compute_optimal(points)
    assert len(fit.optima) == len(BUDGETS)
    assert fit.params.exponent == pytest.approx(a, abs=1e-6)
    assert fit.tokens.exponent == pytest.approx(1 - a, abs=1e-6)
    assert fit.params.coefficient == pytest.approx(0.09, rel=1e-4)


def test_chinchilla_parametric_loss_gives_its_theoretical_exponent():
    # Hoffmann et al.'s fitted constants (their eq. 10): the optimum scales as C^(beta/(alpha+beta)).
    E, A, B, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    points = []
    for c in BUDGETS:
        for n in np.geomspace(c**0.5 / 300, c**0.5 * 3, 15):
            d = c / (6 * n)
            points.append((c, n, d, E + A / n**alpha + B / d**beta))
    fit = compute_optimal(points)
    assert fit.params.exponent == pytest.approx(beta / (alpha + beta), abs=0.01)
    assert fit.tokens.exponent == pytest.approx(alpha / (alpha + beta), abs=0.01)


def test_a_curve_without_a_minimum_inside_its_sizes_has_no_optimum():
    ns = np.array([1e8, 2e8, 4e8, 8e8])
    falling = 1.0 - 0.1 * np.log(ns / 1e8)  # still improving at the largest size: optimum not measured
    assert isoflop_optimum(1e18, ns, 1e18 / (6 * ns), falling + 0.001 * np.log(ns / 1e8) ** 2) is None
    assert isoflop_optimum(1e18, ns[:2], 1e18 / (6 * ns[:2]), falling[:2]) is None
    assert isoflop_optimum(1e18, ns, 1e18 / (6 * ns), -(np.log(ns / 3e8) ** 2)) is None  # a maximum


def test_power_law_needs_two_budgets():
    assert fit_power_law([1e18], [1e8]) is None
    law = fit_power_law([1e18, 1e20], [1e8, 1e9])
    assert law.exponent == pytest.approx(0.5)
    assert law(1e19) == pytest.approx(10**8.5)
