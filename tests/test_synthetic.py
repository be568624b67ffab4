"""The synthetic generator: seeded bank-like credit data for scale tests."""

import numpy as np
import pandas as pd
import pytest

from fedfin.common.errors import ConfigError
from fedfin.common.synthetic import GROUP_COLUMN, LABEL, PUBLIC_GROUP, generate_credit_data


def spread_between_banks(frame: pd.DataFrame) -> float:
    """How far apart the banks' populations are: the spread of their mean log income."""
    banks = frame[frame[GROUP_COLUMN] != PUBLIC_GROUP]
    means = np.log(banks["annual_income"]).groupby(banks[GROUP_COLUMN]).mean()
    return float(means.std())


def test_the_same_seed_gives_the_same_data() -> None:
    pd.testing.assert_frame_equal(
        generate_credit_data(2_000, 3, seed=7), generate_credit_data(2_000, 3, seed=7)
    )


def test_another_seed_gives_other_data() -> None:
    first, second = generate_credit_data(2_000, 3, seed=7), generate_credit_data(2_000, 3, seed=8)

    assert not first.equals(second)


def test_it_generates_the_requested_rows_and_banks() -> None:
    frame = generate_credit_data(5_000, 4, seed=0)

    assert len(frame) == 5_000
    assert set(frame[GROUP_COLUMN]) == {PUBLIC_GROUP, "bank-00", "bank-01", "bank-02", "bank-03"}


def test_the_public_pool_takes_the_public_fraction() -> None:
    frame = generate_credit_data(5_000, 4, seed=0, public_fraction=0.3)

    assert (frame[GROUP_COLUMN] == PUBLIC_GROUP).sum() == 1_500


def test_both_classes_are_present_in_the_pool_and_in_every_bank() -> None:
    frame = generate_credit_data(10_000, 5, seed=0)

    assert set(frame[LABEL]) == {0, 1}
    for group, rows in frame.groupby(GROUP_COLUMN):
        assert set(rows[LABEL]) == {0, 1}, group


@pytest.mark.parametrize("rate", [0.05, 0.08, 0.2])
def test_the_overall_default_rate_is_the_requested_one(rate: float) -> None:
    frame = generate_credit_data(20_000, 5, seed=0, default_rate=rate)

    assert abs(frame[LABEL].mean() - rate) < 0.01


def test_a_large_shift_makes_banks_differ_far_more_than_no_shift() -> None:
    identical = generate_credit_data(20_000, 5, shift=0.0, seed=0)
    shifted = generate_credit_data(20_000, 5, shift=2.0, seed=0)

    assert spread_between_banks(shifted) > 5 * spread_between_banks(identical)


def test_no_shift_gives_banks_the_same_default_rate_up_to_noise() -> None:
    frame = generate_credit_data(50_000, 5, shift=0.0, seed=0)
    rates = frame.groupby(GROUP_COLUMN)[LABEL].mean()

    assert rates.max() - rates.min() < 0.02


def test_two_hundred_thousand_rows_can_be_generated() -> None:
    frame = generate_credit_data(200_000, 20, seed=0)

    assert len(frame) == 200_000
    assert frame[GROUP_COLUMN].nunique() == 21
    assert frame.notna().all().all()


@pytest.mark.parametrize(
    ("rows", "banks", "shift", "rate"),
    [
        (50, 5, 0.5, 0.08),
        (1_000, 0, 0.5, 0.08),
        (1_000, 5, -1.0, 0.08),
        (1_000, 5, 3.5, 0.08),
        (1_000, 5, 0.5, 1.0),
    ],
    ids=["too-few-rows", "no-banks", "negative-shift", "shift-too-large", "rate-of-one"],
)
def test_impossible_requests_are_config_errors(
    rows: int, banks: int, shift: float, rate: float
) -> None:
    with pytest.raises(ConfigError):
        generate_credit_data(rows, banks, shift=shift, default_rate=rate)
