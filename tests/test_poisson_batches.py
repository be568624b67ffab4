"""The O(batch) sampler draws exactly Poisson batches, from the secret generator alone.

Each statistical test runs at a fixed seed and fails only if the sampler is wrong or the
seed lands in a tail of probability about 1e-3 or less (the thresholds below).
"""

import itertools
import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

import fedfin.client.dp_training as dp_training
from fedfin.client.dp_training import DpStepPlan, train_with_dp
from fedfin.client.poisson_batches import (
    distinct_by_permutation,
    distinct_by_redrawing,
    distinct_rows,
    poisson_batches,
    poisson_indices,
)
from fedfin.common.config import ModelConfig
from fedfin.common.model import build_model
from fedfin.common.schema import EncodedTable, FeatureSchema
from fedfin.common.synthetic import GROUP_COLUMN, LABEL, PUBLIC_GROUP, generate_credit_data

ROWS, RATE, DRAWS = 1000, 0.02, 10_000
P_VALUE_FLOOR = 1e-3


@pytest.fixture(scope="module")
def batches() -> list[torch.Tensor]:
    """DRAWS Poisson batches of a 1,000-row bank at q = 0.02 (mostly the redrawing path)."""
    generator = torch.Generator().manual_seed(20240514)
    return [poisson_indices(ROWS, RATE, generator) for _ in range(DRAWS)]


def test_batch_sizes_follow_binomial_rows_and_rate(batches: list[torch.Tensor]) -> None:
    sizes = np.array([len(b) for b in batches])
    mean, variance = ROWS * RATE, ROWS * RATE * (1 - RATE)
    assert abs(sizes.mean() - mean) < 4 * math.sqrt(variance / DRAWS)
    assert sizes.var(ddof=1) == pytest.approx(variance, rel=0.05)
    # Chi-square goodness of fit, the tails pooled so every bin expects >= 5 batches.
    expected = stats.binom.pmf(np.arange(ROWS + 1), ROWS, RATE) * DRAWS
    low = int(np.argmax(np.cumsum(expected) >= 5))
    high = ROWS - int(np.argmax(np.cumsum(expected[::-1]) >= 5))
    observed = np.bincount(np.clip(sizes, low, high), minlength=ROWS + 1)[low : high + 1]
    pooled = expected[low : high + 1].copy()
    pooled[0], pooled[-1] = expected[: low + 1].sum(), expected[high:].sum()
    assert stats.chisquare(observed, pooled * DRAWS / pooled.sum()).pvalue > P_VALUE_FLOOR


def test_every_row_joins_a_batch_with_probability_q(batches: list[torch.Tensor]) -> None:
    """Under Poisson sampling each row's count is Binomial(DRAWS, q), independently of the
    others, so the sum of standardised squares is chi-square with ROWS degrees of freedom."""
    counts = torch.bincount(torch.cat(batches), minlength=ROWS).double().numpy()
    expected, variance = DRAWS * RATE, DRAWS * RATE * (1 - RATE)
    statistic = float(((counts - expected) ** 2 / variance).sum())
    assert stats.chi2.sf(statistic, ROWS) > P_VALUE_FLOOR
    assert stats.chi2.cdf(statistic, ROWS) > P_VALUE_FLOOR  # not suspiciously even either


def test_a_batch_never_holds_a_row_twice(batches: list[torch.Tensor]) -> None:
    for batch in batches:
        assert batch.dtype == torch.long
        assert bool((batch[1:] > batch[:-1]).all())  # sorted and strictly increasing
        assert len(batch) == 0 or (int(batch[0]) >= 0 and int(batch[-1]) < ROWS)


def test_two_rows_join_together_with_probability_q_squared() -> None:
    """Inclusions are independent: every pair of a 20-row bank co-occurs at rate q².

    A batch of more than 5 rows (about 20% of them) takes the permutation path."""
    rows, rate, draws = 20, 0.2, 12_000
    generator = torch.Generator().manual_seed(7)
    batches = [poisson_indices(rows, rate, generator) for _ in range(draws)]
    joined = torch.zeros(draws, rows)  # joined[d, i]: row i is in batch d
    which = torch.repeat_interleave(torch.arange(draws), torch.tensor([len(b) for b in batches]))
    joined[which, torch.cat(batches)] = 1.0
    together = (joined.T @ joined).long()
    pairs = torch.triu_indices(rows, rows, offset=1)
    counts = together[pairs[0], pairs[1]].double().numpy()
    p = rate**2
    z = (counts - draws * p) / math.sqrt(draws * p * (1 - p))
    assert np.abs(z).max() < 4.5  # Bonferroni over 190 pairs at about 1e-3
    assert counts.mean() == pytest.approx(draws * p, rel=0.02)
    singles = torch.diagonal(together).double().numpy()  # and each row alone at rate q
    assert singles.mean() == pytest.approx(draws * rate, rel=0.01)


@pytest.mark.parametrize("draw", [distinct_by_redrawing, distinct_by_permutation])
def test_each_way_of_picking_distinct_rows_is_uniform_over_subsets(draw: object) -> None:
    """All C(6, 3) = 20 subsets equally likely, whichever path `distinct_rows` takes."""
    assert callable(draw)
    generator = torch.Generator().manual_seed(11)
    draws = 10_000
    seen = Counter(tuple(draw(3, 6, generator).tolist()) for _ in range(draws))
    subsets = list(itertools.combinations(range(6), 3))
    assert set(seen) == set(subsets)
    observed = [seen[s] for s in subsets]
    assert stats.chisquare(observed).pvalue > P_VALUE_FLOOR


def test_distinct_rows_covers_the_extremes() -> None:
    generator = torch.Generator().manual_seed(0)
    assert distinct_rows(0, 10, generator).tolist() == []
    assert distinct_rows(10, 10, generator).tolist() == list(range(10))
    assert len(poisson_indices(0, 0.5, generator)) == 0
    assert len(poisson_indices(50, 1.0, generator)) == 50
    with pytest.raises(ValueError):
        distinct_rows(11, 10, generator)


def test_the_same_secret_seed_gives_the_same_batches_whatever_the_global_rng() -> None:
    def draw(seed: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed)
        return [poisson_indices(100_000, 1 / 1024, generator).tolist() for _ in range(20)]

    def seed_globals(seed: int) -> None:
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def next_globals() -> tuple[float, float, float]:
        return float(torch.rand(1)), float(np.random.rand()), random.random()

    seed_globals(1)
    first = draw(3)
    after_sampling = next_globals()
    seed_globals(1)
    assert after_sampling == next_globals()  # the global RNGs were never advanced
    seed_globals(2)
    assert draw(3) == first
    assert draw(4) != first


def test_batches_gather_the_same_rows_from_every_tensor() -> None:
    rows = 500
    ids = torch.arange(rows)
    tensors = (ids.double().unsqueeze(1).repeat(1, 3), ids.unsqueeze(1), ids.float())
    stream = poisson_batches(tensors, 0.1, torch.Generator().manual_seed(5))
    for _ in range(20):
        numeric, categorical, target = next(stream)
        assert numeric.shape[1:] == (3,) and categorical.shape[1:] == (1,)
        assert torch.equal(numeric[:, 0].long(), categorical[:, 0])
        assert torch.equal(target.long(), categorical[:, 0])
    empty = next(poisson_batches(tensors, 1e-9, torch.Generator().manual_seed(5)))
    assert [tuple(t.shape) for t in empty] == [(0, 3), (0, 1), (0,)]
    with pytest.raises(ValueError):
        next(poisson_batches((ids, ids[:-1]), 0.1, torch.Generator()))


# --- wired into DP-SGD ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bank() -> tuple[FeatureSchema, EncodedTable]:
    frame = generate_credit_data(1000, banks=1, seed=0)
    public = frame[frame[GROUP_COLUMN] == PUBLIC_GROUP]
    schema = FeatureSchema.fit(public, LABEL, "1", exclude=(GROUP_COLUMN,), source="synthetic")
    return schema, schema.transform(frame[frame[GROUP_COLUMN] != PUBLIC_GROUP], "bank")


def _train(bank: tuple[FeatureSchema, EncodedTable], plan: DpStepPlan, seed: int) -> list[float]:
    schema, table = bank
    model = build_model(schema, ModelConfig(), seed=0)
    history = train_with_dp(model, table, plan, [], torch.Generator().manual_seed(seed))
    assert history == [plan.event().as_history()]
    return torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()


def test_dp_training_is_a_function_of_the_secret_generator_alone(
    bank: tuple[FeatureSchema, EncodedTable],
) -> None:
    plan = DpStepPlan("full", 1.0, 1.0, 32, 1 / 20, 1e-3, 0, 6)
    torch.manual_seed(1)
    first = _train(bank, plan, seed=9)
    torch.manual_seed(2)
    assert _train(bank, plan, seed=9) == first
    assert _train(bank, plan, seed=10) != first


def test_empty_batches_still_take_a_noise_only_step(
    bank: tuple[FeatureSchema, EncodedTable], monkeypatch: pytest.MonkeyPatch
) -> None:
    """q is so small that (almost) every batch is empty: each step is still taken and counted."""
    empty: list[int] = []
    real = dp_training._noise_only_step

    def counting(*args: object) -> None:
        empty.append(1)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(dp_training, "_noise_only_step", counting)
    plan = DpStepPlan("fedrep", 1.0, 1.0, 32, 1 / 100_000, 1e-3, 2, 3)  # P(non-empty) < 1%
    schema, table = bank
    model = build_model(schema, ModelConfig(), seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    history = train_with_dp(model, table, plan, [], torch.Generator().manual_seed(1))
    assert len(empty) == plan.total_steps and history == [plan.event().as_history()]
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
