"""Before any budget is spent: will DP federation beat the public model, and with what plan?

The model is first-order and empirical, and says so. One DP-SGD step of one bank adds
Gaussian noise of norm about σC√d to a clipped sum whose signal is B·|g| (B = qN expected
rows, |g| the norm of a bank's mean clipped gradient, measured on public data by
`common.gradient_signal`). Adam takes steps of a fixed size whatever their direction, so
what decides whether a step teaches or only wanders is the per-step noise-to-signal ratio
ρ = σC√d / (B|g|). The fraction of the non-private gain that DP leaves is modelled as

    retained = 1 / (1 + (ρ / τ)²)

The number of banks K is not in it: averaging K banks' updates divides their noise by √K in
theory, but the privacy-utility map measured no such gain (20 banks kept less of the gain
than 5, and fedfin about what each bank alone kept), because every bank's Adam steps are
noise-dominated before the server averages them.

with τ the ratio at which half the gain survives, fitted on measured federations (see
`NOISE_TOLERANCE`). σ comes from the bank's own calibration
(`common.accounting.calibrate_noise_multiplier`, the code the bank runs), so the plan
respects ε, δ, the noise floor and the minimum planned horizon. Nothing here reads private
data: only public gradients and public sizes.
"""

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from fedfin.common.accounting import calibrate_noise_multiplier
from fedfin.common.errors import ConfigError
from fedfin.common.gradient_signal import GradientSignal

BATCH_CANDIDATES = (64, 128, 256, 512, 1024, 2048, 4096)
ROUND_CANDIDATES = (3, 5, 10, 20)
MAX_SAMPLE_RATE = 0.1  # larger rates buy little amplification and cost slow accounting
# Per-step noise-to-signal at which half the non-private gain survives: fitted with the
# banks' measured signal on the privacy-utility map's 5-bank cells up to 100k loans
# (2.34, RMSE 0.05 of the retained fraction; benchmarks/results/plan_vs_map.md).
NOISE_TOLERANCE = 2.34
KEEP_PUBLIC_BELOW = 0.5  # retained fraction under which noise removes most of the gain
_NEAR_BEST = 0.98  # candidates within 2% of the best retained fraction: take the most steps


@dataclass(frozen=True)
class PlanQuestion:
    """Public facts the plan depends on: sizes, budget, and the banks' policy bounds."""

    bank_rows: int
    banks: int
    epsilon: float  # math.inf: non-private
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    local_epochs: float = 1.0
    min_noise_multiplier: float = 0.5
    max_noise_multiplier: float = 20.0
    min_planned_rounds: int = 3

    def __post_init__(self) -> None:
        if self.bank_rows < 2:
            raise ConfigError(f"--bank-rows must be at least 2, got {self.bank_rows}")
        if self.banks < 1:
            raise ConfigError(f"--num-banks must be at least 1, got {self.banks}")
        if not self.epsilon > 0:
            raise ConfigError(f"--epsilon must be positive, got {self.epsilon}")
        if not 0.0 < self.delta < 1e-2:
            raise ConfigError(f"--delta must be in (0, 0.01), got {self.delta}")


@dataclass(frozen=True)
class Candidate:
    """One plan and what the model predicts for it."""

    sample_rate: float  # 1/k, the banks' `sample-rate`
    rounds: int
    noise_multiplier: float  # 0 when non-private
    steps: int  # per bank, over all rounds
    expected_batch: float  # qN; also the public batch size the server should send
    step_noise_to_signal: float  # one bank, one step: σC√d / (B|g|)
    retained: float  # fraction of the non-private gain the noise leaves
    break_even_signal: float  # the |g| at which half the gain would survive this plan

    @property
    def batch_size(self) -> int:
        return max(1, round(self.expected_batch))


@dataclass(frozen=True)
class Recommendation:
    question: PlanQuestion
    best: Candidate | None
    verdict: str  # "federate" or "keep the public model"
    reason: str


def sample_rates_for(bank_rows: int, batches: Sequence[int] = BATCH_CANDIDATES) -> list[float]:
    """Unit fractions 1/k (k >= 1/MAX_SAMPLE_RATE) with expected batches near the candidates."""
    k_min = round(1 / MAX_SAMPLE_RATE)
    return [1.0 / k for k in sorted({max(k_min, round(bank_rows / b)) for b in batches})]


@functools.lru_cache(maxsize=1024)
def _noise_for(
    sample_rate: float,
    steps_per_round: int,
    horizon: int,
    epsilon: float,
    delta: float,
    max_grad_norm: float,
    noise_bounds: tuple[float, float],
) -> float | None:
    """σ the bank would calibrate (RDP: a little above PRV's, so the plan errs safe).
    Memoised: σ does not depend on the bank's size or the number of banks."""
    return calibrate_noise_multiplier(
        [],
        sample_rate,
        steps_per_round,
        horizon,
        delta,
        epsilon,
        noise_bounds[0],
        max_grad_norm,
        max_noise_multiplier=noise_bounds[1],
        accountant="rdp",
    )


def evaluate(
    question: PlanQuestion,
    signal: GradientSignal,
    sample_rate: float,
    rounds: int,
    tolerance: float = NOISE_TOLERANCE,
) -> Candidate | None:
    """The predicted outcome of one plan, or None when the budget does not fit it."""
    steps_per_round = max(1, math.ceil(question.local_epochs / sample_rate - 1e-9))
    steps = steps_per_round * rounds
    expected_batch = sample_rate * question.bank_rows
    if math.isinf(question.epsilon):
        sigma = 0.0
    else:
        horizon = max(rounds, question.min_planned_rounds)
        found = _noise_for(
            sample_rate,
            steps_per_round,
            horizon,
            question.epsilon,
            question.delta,
            question.max_grad_norm,
            (question.min_noise_multiplier, question.max_noise_multiplier),
        )
        if found is None:
            return None
        sigma = found
    noise = sigma * question.max_grad_norm * math.sqrt(signal.dimension)
    break_even = noise / (expected_batch * tolerance)
    useful = expected_batch * signal.signal_norm
    if useful <= 0.0:
        return Candidate(
            sample_rate, rounds, sigma, steps, expected_batch, math.inf, 0.0, break_even
        )
    step_ratio = noise / useful
    retained = 1.0 / (1.0 + (step_ratio / tolerance) ** 2)
    return Candidate(
        sample_rate, rounds, sigma, steps, expected_batch, step_ratio, retained, break_even
    )


def recommend(
    question: PlanQuestion,
    signal: GradientSignal,
    sample_rates: Sequence[float] | None = None,
    rounds: Sequence[int] = ROUND_CANDIDATES,
    tolerance: float = NOISE_TOLERANCE,
) -> Recommendation:
    """The plan that keeps the most of the non-private gain (most steps among near-ties)."""
    rates = sample_rates if sample_rates is not None else sample_rates_for(question.bank_rows)
    candidates = [
        c
        for q in rates
        for r in rounds
        if (c := evaluate(question, signal, q, r, tolerance)) is not None
    ]
    if not candidates:
        return Recommendation(
            question, None, "keep the public model", "no plan fits the budget at any noise"
        )
    if signal.signal_norm <= 0.0:  # rank plans by the signal they need instead
        best = min(candidates, key=lambda c: (c.break_even_signal, -c.steps))
        return Recommendation(
            question,
            best,
            "keep the public model",
            "no gradient signal to go on (give --signal if the banks' is known); federation "
            f"would need |g| >= {best.break_even_signal:.3g}",
        )
    top = max(c.retained for c in candidates)
    near = [c for c in candidates if c.retained >= _NEAR_BEST * top]
    best = max(near, key=lambda c: (c.steps, c.retained))
    if best.retained < KEEP_PUBLIC_BELOW:
        return Recommendation(
            question,
            best,
            "keep the public model",
            f"noise would remove {1 - best.retained:.0%} of what federation could gain",
        )
    return Recommendation(
        question,
        best,
        "federate",
        f"noise leaves {best.retained:.0%} of the non-private gain",
    )
