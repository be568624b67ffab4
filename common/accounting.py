"""Privacy accounting for DP-SGD: ε from a list of DP events, and noise calibration.

A `DpEvent` is the plain data an auditor needs (noise multiplier, sample rate, steps,
clipping norm), the same triple Opacus keeps in `accountant.history`. ε is computed with
Opacus' tight PRV accountant by default (RDP overstates ε by 10-16%; GDP can understate
it and is never used for a budget). Events with the same noise and sample rate are
merged by adding their steps: the composition is the same and the maths is faster.
"""

import functools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedfin.common.errors import ConfigError

if TYPE_CHECKING:
    from opacus.accountants.accountant import IAccountant

ACCOUNTANTS = ("prv", "rdp")
_EPS_ERROR = 0.01
_SIGMA_TOLERANCE = 0.005  # relative: at most 0.5% more noise than the exact answer
SAMPLING_METHOD = "poisson"


@dataclass(frozen=True)
class DpEvent:
    """`steps` Poisson-sampled Gaussian steps at one noise multiplier and sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float

    def as_history(self) -> tuple[float, float, int]:
        """The (noise, sample rate, steps) triple of Opacus' `accountant.history`."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """The sample rate Opacus' DPDataLoader uses: one over the number of batches."""
    return 1.0 / math.ceil(num_examples / batch_size)


def merged_history(events: Iterable[DpEvent]) -> list[tuple[float, float, int]]:
    """Opacus history with identical (noise, sample rate) events merged."""
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        if event.steps > 0:
            key = (event.noise_multiplier, event.sample_rate)
            steps[key] = steps.get(key, 0) + event.steps
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def new_accountant(name: str) -> "IAccountant":
    # Opacus is imported here, not at the top: a ClientApp starts a fresh process for every
    # message, and evaluation messages never need an accountant.
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name == "prv":
        return PRVAccountant()
    if name == "rdp":
        return RDPAccountant()
    raise ConfigError(f"accountant must be one of {ACCOUNTANTS}, got '{name}'")


def epsilon_of_history(
    history: Sequence[tuple[float, float, int]], delta: float, name: str
) -> float:
    """ε of an Opacus-style history (an upper bound for PRV) at `delta`."""
    return _epsilon_of(tuple(history), delta, name)


@functools.lru_cache(maxsize=512)
def _epsilon_of(history: tuple[tuple[float, float, int], ...], delta: float, name: str) -> float:
    """Memoised: a round asks for the same ε several times (approval, trim check, charge),
    and each PRV computation costs a few hundred milliseconds."""
    if not history:
        return 0.0
    accountant = new_accountant(name)
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "prv":
            return float(accountant.get_epsilon(delta, eps_error=_EPS_ERROR))
        return float(accountant.get_epsilon(delta))


def epsilon_spent(events: Iterable[DpEvent], delta: float, name: str = "prv") -> float:
    """Cumulative ε of all `events` at `delta`."""
    return epsilon_of_history(merged_history(events), delta, name)


def calibrate_noise_multiplier(
    past: Sequence[DpEvent],
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    budget: float,
    min_noise_multiplier: float,
    max_grad_norm: float,
    max_noise_multiplier: float = 50.0,
    accountant: str = "prv",
) -> float | None:
    """The smallest noise multiplier (>= the policy's floor) that fits `rounds` more rounds.

    Returns None when even `max_noise_multiplier` does not fit one round: the budget is
    spent for any useful purpose.
    """

    def fits(sigma: float, n_rounds: int, name: str = accountant) -> bool:
        planned = DpEvent(sigma, sample_rate, steps_per_round * n_rounds, max_grad_norm)
        return epsilon_spent([*past, planned], delta, name) <= budget

    if fits(min_noise_multiplier, rounds):
        return min_noise_multiplier
    if not fits(max_noise_multiplier, 1):
        return None
    if not fits(max_noise_multiplier, rounds):
        return max_noise_multiplier  # spend what is left in fewer rounds; enforcement trims
    low, high = min_noise_multiplier, max_noise_multiplier
    if accountant != "rdp":
        # RDP overstates ε, so RDP-calibrated noise is enough for the tight accountant too:
        # it brackets the answer closely and cheaply before the (slower) tight bisection.
        rdp_high = _bisect(lambda sigma: fits(sigma, rounds, "rdp"), low, high, 1e-3)
        if fits(rdp_high, rounds):
            high = rdp_high
            # Walk down in steps of 1.25 until a σ does not fit (min_noise_multiplier did
            # not, above), so the bisection below brackets the smallest σ that fits.
            while fits(candidate := max(low, high / 1.25), rounds):
                high = candidate
    return _bisect(lambda sigma: fits(sigma, rounds), low, high, _SIGMA_TOLERANCE)


def _bisect(fits: Callable[[float], bool], low: float, high: float, tolerance: float) -> float:
    """Smallest sigma in (low, high] that fits, to a relative `tolerance`; `high` must fit."""
    while high / low > 1 + tolerance:
        middle = math.sqrt(low * high)
        if fits(middle):
            high = middle
        else:
            low = middle
    return high


def max_steps_within_budget(
    past: Sequence[DpEvent], event: DpEvent, delta: float, budget: float, accountant: str = "prv"
) -> int:
    """The most steps of `event` (up to its own) that keep cumulative ε within `budget`."""
    if epsilon_spent([*past, event], delta, accountant) <= budget:
        return event.steps
    low, high = 0, event.steps  # fits(low) holds, fits(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        trial = DpEvent(event.noise_multiplier, event.sample_rate, middle, event.max_grad_norm)
        if epsilon_spent([*past, trial], delta, accountant) <= budget:
            low = middle
        else:
            high = middle
    return low
