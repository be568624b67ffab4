"""The Lending Club generator: fitted to the real rows, shifted as documented, seeded, valid."""

from types import MappingProxyType

import numpy as np
import pandas as pd
import pytest

from fedfin.common.lending_club import LABEL, POSITIVE_LABEL, STATE_COLUMN, load_lending_club
from fedfin.common.lending_club_generator import (
    BANK_REGIONS,
    PUBLIC_REGIONS,
    REGIONS,
    LendingClubGenerator,
    ShiftConfig,
)
from fedfin.common.metrics import roc_auc
from fedfin.common.schema import FeatureSchema

ROWS = 60_000


@pytest.fixture(scope="module")
def real() -> pd.DataFrame:
    return load_lending_club()


@pytest.fixture(scope="module")
def generator() -> LendingClubGenerator:
    return LendingClubGenerator(seed=3)


@pytest.fixture(scope="module")
def public(generator: LendingClubGenerator) -> pd.DataFrame:
    return generator.public(ROWS)


def _in_regions(frame: pd.DataFrame, regions: tuple[str, ...]) -> pd.DataFrame:
    return frame[frame[STATE_COLUMN].isin([s for r in regions for s in REGIONS[r]])]


def _bad(frame: pd.DataFrame) -> np.ndarray:
    return (frame[LABEL].astype(str) == POSITIVE_LABEL).to_numpy()


def _common_numeric(real: pd.DataFrame) -> list[str]:
    """Numeric columns that are not almost always zero (the copula keeps rare events apart)."""
    numeric = [c for c in real.columns if c != LABEL and pd.api.types.is_numeric_dtype(real[c])]
    return [c for c in numeric if (real[c] != 0).mean() > 0.05]


def test_tables_have_the_real_columns_and_dtypes(real: pd.DataFrame, public: pd.DataFrame) -> None:
    assert list(public.columns) == list(real.columns)
    for column in real.columns:
        if pd.api.types.is_numeric_dtype(real[column]):
            assert pd.api.types.is_numeric_dtype(public[column]), column
        else:
            assert set(public[column].astype(str)) <= set(real[column].astype(str)), column


def test_public_marginals_follow_the_real_public_regions(
    real: pd.DataFrame, public: pd.DataFrame
) -> None:
    reference = _in_regions(real, PUBLIC_REGIONS)
    for column in [c for c in real.columns if pd.api.types.is_numeric_dtype(real[c])]:
        for q in (0.25, 0.5, 0.75, 0.9):
            want, got = reference[column].quantile(q), public[column].quantile(q)
            spread = reference[column].quantile(0.95) - reference[column].quantile(0.05)
            assert abs(got - want) <= 0.1 * max(spread, 1.0), (column, q, want, got)
    for column in ("term", "verification_status", "emp_length"):
        want = reference[column].astype(str).value_counts(normalize=True)
        got = public[column].astype(str).value_counts(normalize=True)
        assert (want - got.reindex(want.index, fill_value=0)).abs().max() < 0.03, column
    letters = public["sub_grade"].astype(str).str[0].value_counts(normalize=True)
    real_letters = reference["sub_grade"].astype(str).str[0].value_counts(normalize=True)
    assert (real_letters - letters.reindex(real_letters.index, fill_value=0)).abs().max() < 0.03


def test_rank_correlations_match_the_real_rows(real: pd.DataFrame, public: pd.DataFrame) -> None:
    columns = _common_numeric(real)
    want = _in_regions(real, PUBLIC_REGIONS)[columns].corr("spearman")
    got = public[columns].corr("spearman")
    assert float((want - got).abs().to_numpy().max()) < 0.15
    assert float((want - got).abs().to_numpy().mean()) < 0.03


def test_default_rates_are_the_real_ones(
    real: pd.DataFrame, generator: LendingClubGenerator, public: pd.DataFrame
) -> None:
    assert abs(_bad(public).mean() - _bad(_in_regions(real, PUBLIC_REGIONS)).mean()) < 0.006
    banks = [generator.bank(i, 20_000) for i in range(8)]
    rates = [_bad(b).mean() for b in banks]
    real_rate = _bad(_in_regions(real, BANK_REGIONS)).mean()
    assert min(rates) > 0.02 and max(rates) < 0.12  # each bank shifts its own rate
    assert abs(float(np.mean(rates)) - real_rate) < 0.015


def test_the_label_is_learnable_like_the_real_one(
    generator: LendingClubGenerator, public: pd.DataFrame
) -> None:
    auc = roc_auc(_bad(public).astype(float), generator.default_probability(public, None))
    assert 0.70 < auc < 0.80  # the real teacher's in-sample AUC is about 0.75


def test_banks_are_shifted_from_the_public_source(
    generator: LendingClubGenerator, public: pd.DataFrame
) -> None:
    """Banks lend elsewhere, with their own grade/term mix and a tilted default mechanism:
    on a bank's rows, its own mechanism ranks loans better than the public one."""
    gains = []
    for index in range(6):
        bank = generator.bank(index, 30_000, "test")
        shift = generator.bank_shift(index)
        assert set(bank[STATE_COLUMN].astype(str)) == {shift.state}
        assert shift.state in [s for r in BANK_REGIONS for s in REGIONS[r]]
        bad = _bad(bank).astype(float)
        own = roc_auc(bad, generator.default_probability(bank, index))
        public_mechanism = roc_auc(bad, generator.default_probability(bank, None))
        gains.append(own - public_mechanism)
    assert min(gains) > 0.0 and float(np.mean(gains)) > 0.01
    grade_shifts = [generator.bank_shift(i).grade_shift for i in range(20)]
    assert max(grade_shifts) > 0.2 and min(grade_shifts) < -0.2


def test_no_shift_config_leaves_only_the_regional_difference() -> None:
    none = ShiftConfig(
        common_tilt=MappingProxyType({}),
        bank_tilt_sd=0.0,
        intercept_sd=0.0,
        grade_shift=0.0,
        term_shift=0.0,
    )
    generator = LendingClubGenerator(seed=0, shift=none)
    bank = generator.bank(0, 5_000)
    own = generator.default_probability(bank, 0)
    public_mechanism = generator.default_probability(bank, None)
    # The same teacher up to the intercept that gives each region its real default rate.
    logit = np.log(own / (1 - own)) - np.log(public_mechanism / (1 - public_mechanism))
    assert np.ptp(logit) < 1e-6


def test_the_same_seed_gives_the_same_rows_whatever_else_is_generated() -> None:
    first = LendingClubGenerator(seed=7).bank(2, 1_000)
    other = LendingClubGenerator(seed=7)
    other.bank(0, 500)
    other.public(700)
    pd.testing.assert_frame_equal(first, other.bank(2, 1_000))
    assert not LendingClubGenerator(seed=8).bank(2, 1_000).equals(first)
    assert not LendingClubGenerator(seed=7).bank(2, 1_000, "test").equals(first)


def test_generated_banks_pass_the_schema_fitted_on_the_public_source(
    public: pd.DataFrame, generator: LendingClubGenerator
) -> None:
    schema = FeatureSchema.fit(public, LABEL, POSITIVE_LABEL, exclude=(STATE_COLUMN,))
    bank = generator.bank(1, 5_000)
    encoded = schema.transform(bank, "bank 1", strict_columns=True)
    assert encoded.numeric.shape == (5_000, len(schema.numeric))
    assert (encoded.categorical > 0).mean() > 0.99  # categories the public source knows
    categorical = [c for c in bank.columns if isinstance(bank[c].dtype, pd.CategoricalDtype)]
    as_text = bank.astype(dict.fromkeys(categorical, str))
    again = schema.transform(as_text, "bank 1 as text", strict_columns=True)
    np.testing.assert_array_equal(encoded.categorical, again.categorical)
    np.testing.assert_array_equal(encoded.label, again.label)
