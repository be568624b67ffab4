"""Read a bank's or a user's table (CSV or Parquet) with errors that name the file."""

from pathlib import Path

import pandas as pd

from common.errors import DataError

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def read_table(path: Path | str) -> pd.DataFrame:
    """Load a CSV or Parquet file; any problem becomes one `DataError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .csv or .parquet file")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}', use .csv or .parquet")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        frame = pd.read_csv(path, encoding="utf-8") if suffix == ".csv" else pd.read_parquet(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the CSV as UTF-8") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file has no columns") from None
    except pd.errors.ParserError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataError(f"{path}: cannot parse CSV ({first})") from None
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid, a ValueError.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read {suffix[1:]} file ({first})") from None
    if frame.empty:
        raise DataError(f"{path}: table has no rows")
    if len(frame.columns) < 2:
        raise DataError(
            f"{path}: only one column ('{frame.columns[0]}'); "
            "is the delimiter a comma (CSV) and is there a label column?"
        )
    return frame
