"""Partitioners: one table becomes a public pool plus N banks, each with a train/test split."""

import math

import numpy as np
import pandas as pd
import pytest

from fedfin.common.config import SplitConfig
from fedfin.common.errors import ConfigError, DataError
from fedfin.common.lending_club import LABEL, STATE_COLUMN
from fedfin.common.partition import (
    FederatedSplit,
    GroupPartitioner,
    IidPartitioner,
    split_train_test,
)
from fedfin.common.sources import DataSource


@pytest.fixture(scope="module")
def loans(lending_club_source: DataSource) -> pd.DataFrame:
    """Lending Club with a `row_id` column, so every row can be traced through a split."""
    frame = lending_club_source.frame
    return frame.assign(row_id=np.arange(len(frame)))


def split_by_state(loans: pd.DataFrame, num_banks: int = 5, seed: int = 0) -> FederatedSplit:
    config = SplitConfig(num_banks=num_banks, seed=seed)
    return GroupPartitioner(LABEL, config, STATE_COLUMN).split(loans)


def all_row_ids(split: FederatedSplit) -> np.ndarray:
    parts = [split.public] + [part for bank in split.banks for part in (bank.train, bank.test)]
    return np.concatenate([part["row_id"].to_numpy() for part in parts])


def bad_rate(frame: pd.DataFrame) -> float:
    return float((frame[LABEL] == "bad").mean())


def assert_same_split(first: FederatedSplit, second: FederatedSplit) -> None:
    pd.testing.assert_frame_equal(first.public, second.public)
    assert len(first.banks) == len(second.banks)
    for a, b in zip(first.banks, second.banks, strict=True):
        assert a.name == b.name
        assert a.groups == b.groups
        pd.testing.assert_frame_equal(a.train, b.train)
        pd.testing.assert_frame_equal(a.test, b.test)


# --- grouping by US state (the built-in, non-IID split) ----------------------------


def test_group_split_is_identical_for_the_same_seed(loans: pd.DataFrame) -> None:
    assert_same_split(split_by_state(loans, seed=0), split_by_state(loans, seed=0))


def test_group_split_differs_for_another_seed(loans: pd.DataFrame) -> None:
    first, second = split_by_state(loans, seed=0), split_by_state(loans, seed=1)

    assert first.public_groups != second.public_groups
    assert [b.groups for b in first.banks] != [b.groups for b in second.banks]


def test_no_state_is_in_two_banks_or_in_both_the_public_pool_and_a_bank(
    loans: pd.DataFrame,
) -> None:
    split = split_by_state(loans)
    owners: dict[str, str] = {state: "public" for state in split.public_groups}
    assert set(split.public[STATE_COLUMN]) == set(split.public_groups)

    for bank in split.banks:
        states = set(bank.train[STATE_COLUMN]) | set(bank.test[STATE_COLUMN])
        assert states == set(bank.groups)
        for state in states:
            assert state not in owners, f"{state} is in {owners.get(state)} and {bank.name}"
            owners[state] = bank.name

    assert len(owners) == loans[STATE_COLUMN].nunique()


def test_every_row_ends_up_exactly_once(loans: pd.DataFrame) -> None:
    split = split_by_state(loans)
    rows = len(split.public) + sum(bank.num_rows for bank in split.banks)

    assert rows == len(loans)
    np.testing.assert_array_equal(np.sort(all_row_ids(split)), loans["row_id"].to_numpy())


def test_the_public_pool_holds_about_the_public_fraction_of_rows(loans: pd.DataFrame) -> None:
    split = split_by_state(loans)

    assert 0.4 <= len(split.public) / len(loans) < 0.5


def test_banks_are_roughly_balanced(loans: pd.DataFrame) -> None:
    sizes = [bank.num_rows for bank in split_by_state(loans, num_banks=5).banks]

    assert max(sizes) <= 1.1 * min(sizes)


def test_banks_are_named_in_order(loans: pd.DataFrame) -> None:
    names = [bank.name for bank in split_by_state(loans, num_banks=3).banks]

    assert names == ["bank-00", "bank-01", "bank-02"]


@pytest.mark.parametrize("num_banks", range(2, 21))
def test_lending_club_splits_into_2_to_20_banks(loans: pd.DataFrame, num_banks: int) -> None:
    split = split_by_state(loans, num_banks=num_banks)

    assert len(split.banks) == num_banks
    assert all(len(bank.train) > 0 and len(bank.test) > 0 for bank in split.banks)
    assert len(all_row_ids(split)) == len(loans)


def test_more_banks_than_states_is_a_config_error(loans: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match=r"--banks 60 .*'addr_state'.* allow at most"):
        split_by_state(loans, num_banks=60)


def test_fewer_than_one_bank_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--banks"):
        SplitConfig(num_banks=0)


def test_named_public_groups_are_exactly_the_public_pool(loans: pd.DataFrame) -> None:
    partitioner = GroupPartitioner(LABEL, SplitConfig(), STATE_COLUMN, public_groups=("CA", "TX"))
    split = partitioner.split(loans)

    assert split.public_groups == ("CA", "TX")
    assert set(split.public[STATE_COLUMN]) == {"CA", "TX"}
    assert all("CA" not in bank.groups and "TX" not in bank.groups for bank in split.banks)


def test_a_public_group_that_does_not_exist_is_a_config_error(loans: pd.DataFrame) -> None:
    partitioner = GroupPartitioner(LABEL, SplitConfig(), STATE_COLUMN, public_groups=("XX",))

    with pytest.raises(ConfigError, match="XX"):
        partitioner.split(loans)


def test_a_missing_partition_column_is_a_data_error(loans: pd.DataFrame) -> None:
    partitioner = GroupPartitioner(LABEL, SplitConfig(), "region")

    with pytest.raises(DataError, match="'region'"):
        partitioner.split(loans)


# --- any grouping column: missing values, small and one-class groups ---------------------


def home_ownership(seed: int = 0) -> pd.DataFrame:
    """A Home-like column: unequal groups, a tiny one, a few missing values, ~20% defaults."""
    sizes = {"owner": 900, "rent": 400, "parents": 300, "other": 120, "ignore": 12}
    homes = [h for h, n in sizes.items() for _ in range(n)] + [None] * 6
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "Home": homes,
            "income": rng.normal(100, 20, len(homes)),
            "Status": np.where(rng.random(len(homes)) < 0.2, "bad", "good"),
            "row_id": np.arange(len(homes)),
        }
    )


def split_home(frame: pd.DataFrame, num_banks: int) -> FederatedSplit:
    return GroupPartitioner("Status", SplitConfig(num_banks=num_banks), "Home").split(frame)


@pytest.mark.parametrize("num_banks", [1, 2, 3])
def test_a_column_with_missing_values_and_unequal_groups_splits_every_row_once(
    num_banks: int,
) -> None:
    frame = home_ownership()
    split = split_home(frame, num_banks)

    assert len(split.banks) == num_banks
    np.testing.assert_array_equal(np.sort(all_row_ids(split)), frame["row_id"].to_numpy())
    placed = [g for part in split.placement().values() for g in part["groups"]]  # type: ignore[attr-defined]
    assert sorted(placed) == sorted(["owner", "rent", "parents", "other", "ignore", "<missing>"])


@pytest.mark.parametrize("num_banks", [1, 2, 3])
def test_small_or_missing_groups_never_make_a_bank_alone(num_banks: int) -> None:
    for bank in split_home(home_ownership(), num_banks).banks:
        assert set(bank.groups) - {"ignore", "<missing>"}, bank.groups
        assert bank.num_rows >= 50


def test_too_many_banks_for_a_grouping_column_names_the_column_its_groups_and_the_most_banks() -> (
    None
):
    with pytest.raises(ConfigError) as error:
        split_home(home_ownership(), 5)

    message = str(error.value)
    assert "'Home'" in message and "owner 900" in message and "<missing> 6" in message
    assert "use --banks 3 or fewer" in message and "\n" not in message
    split_home(home_ownership(), 3)  # the advice works


def test_a_two_valued_column_makes_one_bank_and_says_so_for_more() -> None:
    frame = home_ownership().assign(Home=lambda f: np.where(f.index % 4 == 0, "Yes", "No"))

    assert [b.groups for b in split_home(frame, 1).banks] in ([("Yes",)], [("No",)])
    with pytest.raises(ConfigError, match="allow at most 1 bank"):
        split_home(frame, 2)


def test_numbers_name_groups_without_a_decimal_point() -> None:
    frame = home_ownership().assign(Home=lambda f: (f.index % 4).astype(float))

    split = split_home(frame, 2)

    assert sorted(split.public_groups + sum((b.groups for b in split.banks), ())) == [
        "0",
        "1",
        "2",
        "3",
    ]


def test_the_split_says_which_groups_and_rows_went_where() -> None:
    split = split_home(home_ownership(), 2)

    placement = split.placement()
    assert set(placement) == {"public", "bank-00", "bank-01"}
    assert sum(int(p["rows"]) for p in placement.values()) == len(home_ownership())  # type: ignore[call-overload]
    line = split.summary()
    assert line.startswith("split by 'Home': public pool ") and "bank-01" in line
    assert "\n" not in line


# --- random rows (IID) --------------------------------------------------------------


def split_at_random(loans: pd.DataFrame, num_banks: int = 5, seed: int = 0) -> FederatedSplit:
    return IidPartitioner(LABEL, SplitConfig(num_banks=num_banks, seed=seed)).split(loans)


def test_iid_split_puts_every_row_exactly_once(loans: pd.DataFrame) -> None:
    split = split_at_random(loans)

    np.testing.assert_array_equal(np.sort(all_row_ids(split)), loans["row_id"].to_numpy())


def test_iid_split_gives_the_public_fraction_and_equal_banks(loans: pd.DataFrame) -> None:
    split = split_at_random(loans, num_banks=7)
    sizes = [bank.num_rows for bank in split.banks]

    assert len(split.public) == round(0.4 * len(loans))
    assert max(sizes) - min(sizes) <= 1


def test_iid_split_mixes_states_across_banks(loans: pd.DataFrame) -> None:
    split = split_at_random(loans)

    for bank in split.banks:
        assert bank.train[STATE_COLUMN].nunique() > 40


def test_iid_split_is_deterministic_for_a_seed_and_differs_for_another(
    loans: pd.DataFrame,
) -> None:
    assert_same_split(split_at_random(loans, seed=3), split_at_random(loans, seed=3))
    assert not split_at_random(loans, seed=3).public.equals(split_at_random(loans, seed=4).public)


def test_a_bank_too_small_to_split_is_a_config_error_not_a_crash(loans: pd.DataFrame) -> None:
    tiny = loans.head(60)

    with pytest.raises(ConfigError, match="use fewer banks"):
        split_at_random(tiny, num_banks=40)


# --- train/test split ------------------------------------------------------------------


def test_train_test_split_is_stratified_by_label(loans: pd.DataFrame) -> None:
    train, test = split_train_test(loans, LABEL, test_fraction=0.25, seed=0)

    assert len(test) == math.ceil(0.25 * len(loans))
    assert len(train) + len(test) == len(loans)
    assert abs(bad_rate(train) - bad_rate(test)) < 0.002


def test_every_bank_has_a_stratified_quarter_held_out_for_testing(loans: pd.DataFrame) -> None:
    for bank in split_by_state(loans).banks:
        assert len(bank.test) == math.ceil(0.25 * bank.num_rows)
        assert abs(bad_rate(bank.train) - bad_rate(bank.test)) < 0.005


def test_a_tiny_table_still_splits_when_it_cannot_be_stratified() -> None:
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "y": [0, 0, 1, 1]})

    train, test = split_train_test(frame, "y", test_fraction=0.25, seed=0)

    assert (len(train), len(test)) == (3, 1)
