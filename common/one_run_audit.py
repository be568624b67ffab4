"""The statistics of a one-run privacy audit (Steinke, Nasr and Jagielski 2023).

m canaries are each included with probability 1/2; after one training run the auditor
guesses "in" or "out" for r of them (abstaining on the rest) and counts the correct
guesses W. Their Theorem 3: if training is (ε, δ)-DP, for every v

    P[W >= v] <= f(v) + 2mδ · max_{i=1..m} (f(v - i) - f(v)) / i,
    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) >= v].

So the largest ε whose bound on P[W >= observed] is still at most β is ruled out with
confidence 1 - β: that is the lower bound. Pure maths on plain numbers, no torch, so the
bank's audit and its tests share one implementation and the numbers can be checked by hand.
"""

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from fedfin.common.errors import ConfigError

CONFIDENCE = 0.95
_EPSILON_CAP = 50.0  # beyond this, e^ε/(1+e^ε) is 1 in floating point


def binomial_tail(v: int, r: int, epsilon: float) -> float:
    """f(v) = P[Binomial(r, e^ε/(1+e^ε)) >= v]: what pure ε-DP allows for v correct guesses."""
    if v <= 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return float(binom.sf(v - 1, r, p))


def p_value(epsilon: float, delta: float, canaries: int, guesses: int, correct: int) -> float:
    """Theorem 3's bound on P[W >= correct] for an (ε, δ)-DP training run (capped at 1).

    The max runs over i = 1..m as in the theorem; for i > v it is (1 - f(v)) / i, below its
    value at i = v, so this equals the paper's Appendix D loop over i = 1..v.
    """
    _check(canaries, guesses, correct, delta)
    f_v = binomial_tail(correct, guesses, epsilon)
    if delta == 0.0 or correct == 0:
        return min(1.0, f_v)
    p = 1.0 / (1.0 + math.exp(-epsilon))
    shifts = np.arange(1, canaries + 1)
    # f(v - i) for i = 1..m; the tail of anything <= 0 correct guesses is 1.
    tails = np.where(correct - shifts <= 0, 1.0, binom.sf(correct - shifts - 1, guesses, p))
    alpha = float(np.max((tails - f_v) / shifts))
    return min(1.0, f_v + 2 * canaries * delta * alpha)


def epsilon_lower_bound(
    canaries: int,
    guesses: int,
    correct: int,
    delta: float,
    confidence: float = CONFIDENCE,
    tolerance: float = 1e-4,
) -> float:
    """The largest ε that `correct` of `guesses` right rules out at `confidence` (0 if none).

    The bound on P[W >= v] grows with ε, so bisection finds where it crosses 1 - confidence.
    """
    beta = 1.0 - confidence
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if p_value(0.0, delta, canaries, guesses, correct) > beta:
        return 0.0
    low, high = 0.0, _EPSILON_CAP
    if p_value(high, delta, canaries, guesses, correct) <= beta:
        return high
    while high - low > tolerance:
        middle = (low + high) / 2
        if p_value(middle, delta, canaries, guesses, correct) <= beta:
            low = middle
        else:
            high = middle
    return low


def perfect_guess_ceiling(
    canaries: int, guesses: int, delta: float, confidence: float = CONFIDENCE
) -> float:
    """The most this audit can ever show: every one of the `guesses` right."""
    return epsilon_lower_bound(canaries, guesses, guesses, delta, confidence)


@dataclass(frozen=True)
class GuessOutcome:
    guesses: int
    correct: int


def guess_from_scores(scores: np.ndarray, included: np.ndarray, per_side: int) -> GuessOutcome:
    """Guess "in" for the `per_side` highest scores and "out" for the lowest; abstain on the rest.

    The rule is fixed before the scores are seen (k is a parameter), as the theorem needs.
    """
    if scores.shape != included.shape or scores.ndim != 1:
        raise ConfigError("scores and inclusions must be two vectors of the same length")
    if not 1 <= per_side <= len(scores) // 2:
        raise ConfigError(f"guesses per side must be in [1, m/2], got {per_side}")
    order = np.argsort(scores, kind="stable")
    correct = int(included[order[-per_side:]].sum()) + int((~included[order[:per_side]]).sum())
    return GuessOutcome(2 * per_side, correct)


def _check(canaries: int, guesses: int, correct: int, delta: float) -> None:
    if not 0 <= correct <= guesses <= canaries:
        raise ConfigError(
            f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}"
        )
    if not 0.0 <= delta < 1.0:
        raise ConfigError(f"delta must be in [0, 1), got {delta}")


@dataclass(frozen=True)
class NoiseDiagnostics:
    """What the applied gradients say about the noise, and whether it looks like the claim.

    Thresholds: noise scale within ±`SCALE_TOLERANCE` of σC/B; |excess kurtosis| below
    `kurtosis_limit` (`KURTOSIS_LIMIT`, or 8 standard errors of a Gaussian sample's
    kurtosis, √(24/n), if larger); |step-to-step correlation| below `CORRELATION_LIMIT`.
    """

    scale_ratio: float  # std of the residual coordinates / (σC/B): 1 when honest
    excess_kurtosis: float  # 0 for Gaussian noise; unclipped gradients give heavy tails
    step_correlation: float  # mean correlation of consecutive steps' residuals: 0 when fresh
    kurtosis_limit: float

    @property
    def ok(self) -> bool:
        return (
            abs(self.scale_ratio - 1.0) <= SCALE_TOLERANCE
            and abs(self.excess_kurtosis) <= self.kurtosis_limit
            and abs(self.step_correlation) <= CORRELATION_LIMIT
        )


SCALE_TOLERANCE = 0.25
# Honest rounds measured -0.02..0.01 (clipped data is a small part of the update); a round
# without clipping 0.3 at σ 2.7 (claimed ε 8): see benchmarks/results/empirical_audit.md.
KURTOSIS_LIMIT = 0.1
CORRELATION_LIMIT = 0.1


def noise_diagnostics(
    residuals: np.ndarray, expected_std: float, removed_dimensions: int = 0
) -> NoiseDiagnostics:
    """Diagnostics of `residuals` (steps x coordinates, the canary subspace already removed).

    `removed_dimensions` is that subspace's dimension: the residual of d-dimensional noise
    keeps only d - m of its dimensions, so its mean squared coordinate is (1 - m/d) σ².

    What remains of an honest step is the noise plus one batch's clipped sum, whose norm is
    bounded by the batch size times C: far below the noise's σC·√d, so the residual should
    look like i.i.d. N(0, (σC/B)²) coordinates, fresh at every step.
    """
    if residuals.ndim != 2 or residuals.shape[0] < 2 or residuals.shape[1] < 10:
        raise ConfigError("noise diagnostics need at least 2 steps of at least 10 coordinates")
    centred = residuals - residuals.mean(axis=1, keepdims=True)
    variance = float(np.mean(centred**2))
    kept = 1.0 - (removed_dimensions + 1) / residuals.shape[1]  # + 1: the mean removed
    scale_ratio = math.sqrt(variance / kept) / expected_std
    excess_kurtosis = float(np.mean(centred**4) / variance**2 - 3.0)
    norms = np.linalg.norm(centred, axis=1)
    pairs = np.sum(centred[1:] * centred[:-1], axis=1) / (norms[1:] * norms[:-1])
    limit = max(KURTOSIS_LIMIT, 8 * math.sqrt(24 / centred.size))
    return NoiseDiagnostics(scale_ratio, excess_kurtosis, float(np.mean(pairs)), limit)
