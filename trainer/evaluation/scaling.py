"""Scaling-law fits of a sweep's points (numpy only): the compute-optimal model per FLOP budget and
the power laws through those optima.

Approach 2 of Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models"
(arXiv:2203.15556, section 3.2): for each FLOP budget C, models of several sizes N are trained on
C FLOPs each (an isoFLOP curve); a parabola fitted to the loss against log N has its minimum at
the compute-optimal size N_opt(C), and the tokens D_opt(C) of that model follow from the same curve.
Straight lines through log N_opt and log D_opt against log C give the exponents of
N_opt ∝ C^a and D_opt ∝ C^b (Hoffmann et al. find a ≈ b ≈ 0.5).

    optima = [isoflop_optimum(c, ns, ds, losses) for c, (ns, ds, losses) in curves.items()]
    a = fit_power_law([o.flops for o in optima], [o.params for o in optima]).exponent
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Optimum:
    """The minimum of one isoFLOP curve."""

    flops: float
    params: float  # N_opt: the parameters at the parabola's minimum
    tokens: float  # D_opt: the tokens a model of N_opt parameters trains on within the budget
    loss: float  # the parabola's value there (val bpb)


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient × x^exponent, fitted as a line in log-log space."""

    exponent: float
    coefficient: float

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.asarray(x, dtype=float) ** self.exponent


def isoflop_optimum(
    flops: float, params: Sequence[float], tokens: Sequence[float], losses: Sequence[float]
) -> Optimum | None:
    """The compute-optimal point of one budget: a parabola in log N through the losses, and the
    tokens at its minimum from the line through log D against log N (on one budget, D ≈ C / 6N).

    None when the curve has no minimum to find: fewer than 3 sizes, a parabola that opens downwards,
    or a minimum outside the sizes trained (an extrapolated optimum is not a measurement)."""
    n = np.log(np.asarray(params, dtype=float))
    if len(n) < 3 or len(set(n.tolist())) < 3:
        return None
    a, b, c = np.polyfit(n, np.asarray(losses, dtype=float), 2)
    if a <= 0:
        return None
    x = -b / (2 * a)
    if not n.min() <= x <= n.max():
        return None
    slope, intercept = np.polyfit(n, np.log(np.asarray(tokens, dtype=float)), 1)
    return Optimum(
        flops=float(flops),
        params=float(np.exp(x)),
        tokens=float(np.exp(slope * x + intercept)),
        loss=float(a * x * x + b * x + c),
    )


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw | None:
    """Least squares of log y = exponent × log x + log coefficient; None with fewer than 2 distinct x."""
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    if len(set(lx.tolist())) < 2:
        return None
    exponent, intercept = np.polyfit(lx, ly, 1)
    return PowerLaw(float(exponent), float(np.exp(intercept)))


@dataclass(frozen=True)
class ComputeOptimal:
    """Every budget's optimum and the power laws through them (None where there are too few)."""

    optima: list[Optimum]
    params: PowerLaw | None  # N_opt ∝ C^a
    tokens: PowerLaw | None  # D_opt ∝ C^b


def compute_optimal(
    points: Sequence[tuple[float, float, float, float]],
) -> ComputeOptimal:
    """Points as (budget C, params N, tokens D, loss) → the optimum of each budget and the fits."""
    budgets = sorted({c for c, *_ in points})
    optima = []
    for budget in budgets:
        curve = sorted((n, d, loss) for c, n, d, loss in points if c == budget)
        found = isoflop_optimum(budget, *zip(*curve, strict=True)) if curve else None
        if found is not None:
            optima.append(found)
    cs = [o.flops for o in optima]
    return ComputeOptimal(
        optima,
        fit_power_law(cs, [o.params for o in optima]),
        fit_power_law(cs, [o.tokens for o in optima]),
    )
