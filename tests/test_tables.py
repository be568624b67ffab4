"""read_table: CSV and Parquet in, one DataError naming the file for anything wrong."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfin.common.errors import DataError
from fedfin.common.tables import read_table

GOOD = pd.DataFrame(
    {
        "income": [52_000.0, 31_500.0, 78_250.0],
        "grade": ["A", "C", "B"],
        "default": [0, 1, 0],
    }
)


def assert_one_line_naming(error: pytest.ExceptionInfo[DataError], path: Path) -> None:
    message = str(error.value)
    assert str(path) in message
    assert "\n" not in message


def test_a_good_csv_loads_as_written(tmp_path: Path) -> None:
    path = tmp_path / "loans.csv"
    GOOD.to_csv(path, index=False)

    pd.testing.assert_frame_equal(read_table(path), GOOD)


@pytest.mark.parametrize("name", ["loans.parquet", "loans.pq"])
def test_a_good_parquet_file_loads_as_written(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    GOOD.to_parquet(path, index=False)

    pd.testing.assert_frame_equal(read_table(path), GOOD)


def test_a_path_given_as_a_string_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "loans.csv"
    GOOD.to_csv(path, index=False)

    assert len(read_table(str(path))) == len(GOOD)


def test_a_missing_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.csv"

    with pytest.raises(DataError, match="not found") as error:
        read_table(path)
    assert_one_line_naming(error, path)


def test_an_empty_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")

    with pytest.raises(DataError, match="empty") as error:
        read_table(path)
    assert_one_line_naming(error, path)


def test_a_csv_with_a_header_but_no_rows_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "header_only.csv"
    path.write_text("income,default\n")

    with pytest.raises(DataError, match="no rows") as error:
        read_table(path)
    assert_one_line_naming(error, path)


def test_a_directory_is_a_data_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "looks_like.csv"
    path.mkdir()

    with pytest.raises(DataError, match="directory") as error:
        read_table(path)
    assert_one_line_naming(error, path)


def test_a_file_that_is_neither_csv_nor_parquet_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "loans.xlsx"
    path.write_text("income,default\n1,0\n")

    with pytest.raises(DataError, match=r"unsupported file type '\.xlsx'") as error:
        read_table(path)
    assert_one_line_naming(error, path)


def test_a_csv_that_is_not_utf8_is_a_data_error_asking_for_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("city,default\nZürich,0\nSão Paulo,1\n".encode("latin-1"))

    with pytest.raises(DataError, match="UTF-8") as error:
        read_table(path)
    assert_one_line_naming(error, path)


def test_a_semicolon_delimited_csv_is_caught_as_a_single_column(tmp_path: Path) -> None:
    path = tmp_path / "excel_export.csv"
    path.write_text("income;default\n52000;0\n31500;1\n")

    with pytest.raises(DataError, match=r"only one column.*delimiter") as error:
        read_table(path)
    assert_one_line_naming(error, path)


def test_a_csv_with_an_unclosed_quote_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    path.write_text('income,grade\n52000,"A\n31500,B\n')

    with pytest.raises(DataError, match="cannot parse CSV") as error:
        read_table(path)
    assert_one_line_naming(error, path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "csv_renamed"])
def test_a_corrupt_parquet_file_is_a_data_error_naming_it(tmp_path: Path, damage: str) -> None:
    good = tmp_path / "good.parquet"
    pd.DataFrame({"income": np.arange(100.0), "default": np.arange(100) % 2}).to_parquet(good)
    payload = good.read_bytes()
    corrupt = {
        "truncated": payload[: len(payload) // 2],
        "garbage": b"PAR1" + bytes(range(256)) * 4 + b"PAR1",
        "csv_renamed": b"income,default\n1,0\n",
    }[damage]
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(corrupt)

    with pytest.raises(DataError, match="cannot read parquet file") as error:
        read_table(path)
    assert_one_line_naming(error, path)
