"""Read a bank's or a user's table (CSV or Parquet) with errors that name the file.

Cells are read by one rule for every file (`common.cells`): blanks and NA words are
missing, text numbers ("1,250", "$1,250.00", "12%") are numbers, booleans are the
categories True/False. A header must name every column once: a duplicated name is refused
(pandas would silently rename the second one `Income.1`), and an unnamed column is refused
unless it is a saved row index (unique whole numbers, as `DataFrame.to_csv()` writes by
default), which is dropped. A CSV may be compressed as banks' exports often are
(`loans.csv.gz`, `.csv.bz2`, `.csv.xz`), read by the same rule.
"""

import bz2
import csv
import gzip
import lzma
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pandas as pd

from fedfin.common.cells import clean_column
from fedfin.common.errors import DataError

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
_CSV_COMPRESSIONS: dict[str, Callable[..., IO[Any]]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
}


def table_suffix(path: Path) -> str | None:
    """`.csv` (also compressed: `.csv.gz`, `.csv.bz2`, `.csv.xz`), `.parquet` or `.pq`;
    None for anything else."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in TABLE_SUFFIXES:
        return suffixes[-1]
    if suffixes[-2:-1] == [".csv"] and suffixes[-1] in _CSV_COMPRESSIONS:
        return ".csv"
    return None


def read_table(path: Path | str) -> pd.DataFrame:
    """Load a CSV or Parquet file; any problem becomes one `DataError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .csv or .parquet file")
    suffix = table_suffix(path)
    if suffix is None:
        raise DataError(
            f"{path}: unsupported file type '{''.join(path.suffixes[-2:]).lower()}', use "
            ".csv (also .csv.gz, .csv.bz2, .csv.xz) or .parquet"
        )
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        header = _csv_header(path) if suffix == ".csv" else _parquet_header(path)
        _refuse_duplicate_names(header, path)
        frame = (
            pd.read_csv(path, encoding="utf-8", keep_default_na=True, na_values=["?"])
            if suffix == ".csv"
            else pd.read_parquet(path)
        )
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file has no columns") from None
    except pd.errors.ParserError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataError(f"{path}: cannot parse CSV ({first})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: cannot parse CSV header ({exc})") from None
    except (OSError, ValueError, EOFError, lzma.LZMAError) as exc:  # pyarrow: ArrowInvalid
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read {suffix[1:]} file ({first})") from None
    if frame.empty:
        raise DataError(f"{path}: table has no rows")
    if len(frame.columns) < 2:
        raise DataError(
            f"{path}: only one column ('{frame.columns[0]}'); "
            "is the delimiter a comma (CSV) and is there a label column?"
        )
    frame = _without_saved_index(frame, header, path)
    return pd.DataFrame(
        {
            str(name).strip(): clean_column(frame[name], str(name).strip(), str(path))
            for name in frame.columns
        }
    )


def _csv_header(path: Path) -> list[str]:
    opener = _CSV_COMPRESSIONS.get(path.suffix.lower())
    if opener is None:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            return next(csv.reader(handle), [])
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        return next(csv.reader(handle), [])


def _parquet_header(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def _refuse_duplicate_names(header: list[str], path: Path) -> None:
    counts = Counter(name.strip() for name in header if name.strip())
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        raise DataError(
            f"{path}: column '{repeated[0]}' appears {counts[repeated[0]]} times in the header"
            + (f" (and {len(repeated) - 1} more repeated names)" if len(repeated) > 1 else "")
            + "; give every column its own name"
        )


def _without_saved_index(frame: pd.DataFrame, header: list[str], path: Path) -> pd.DataFrame:
    """Drop a saved row index (an unnamed column of unique whole numbers); refuse any
    other column without a name."""
    unnamed = [i for i, name in enumerate(header) if not str(name).strip()]
    if not unnamed:
        return frame
    position = unnamed[0]
    column = frame.iloc[:, position]
    is_index = (
        len(unnamed) == 1
        and position == 0
        and pd.api.types.is_integer_dtype(column)
        and column.is_unique
    )
    if not is_index:
        raise DataError(
            f"{path}: column {position + 1} has no name in the header; name it or remove it"
        )
    return frame.drop(columns=frame.columns[position])
