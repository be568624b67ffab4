"""Load a bank's own data and split it for training and testing, inside the bank.

`data-path` is either one CSV/Parquet file (split here) or a directory holding `train.*`
and `test.*` files. A single file is split record by record with a keyed hash: each loan's
side depends only on its own values and the bank's secret split key, so adding or removing
one loan moves only that loan (neighbouring datasets give neighbouring training sets), and
no one without the key can tell which side a loan is on.
"""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError
from common.schema import EncodedTable, FeatureSchema
from common.tables import TABLE_SUFFIXES, read_table

_FIELD_SEPARATOR = "\x1f"
_HASH_SCALE = float(2**64)


def _find(directory: Path, stem: str) -> Path:
    for suffix in TABLE_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise DataError(f"{directory}: no {stem}.csv or {stem}.parquet in the data directory")


def keyed_test_mask(frame: pd.DataFrame, key: bytes, test_fraction: float) -> np.ndarray:
    """True for the rows on the test side: keyed BLAKE2b of each row's values, column order fixed.

    A row's side is a function of that row alone (and the key): never of row order, of the
    other rows, or of a public seed.
    """
    columns = sorted(frame.columns, key=str)
    joined = pd.Series([""] * len(frame), index=frame.index, dtype=object)
    for number, column in enumerate(columns):
        values = frame[column].astype(str)
        joined = values if number == 0 else joined + _FIELD_SEPARATOR + values
    threshold = test_fraction * _HASH_SCALE
    mask = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(row.encode(), digest_size=8, key=key).digest(), "big")
            < threshold
            for row in joined.tolist()
        ),
        dtype=bool,
        count=len(frame),
    )
    return mask


def load_bank_tables(
    data_path: Path, label: str, test_fraction: float, split_key: bytes
) -> tuple[tuple[pd.DataFrame, str], tuple[pd.DataFrame, str]]:
    """(train table, its source name), (test table, its source name)."""
    if data_path.is_dir():
        train_path, test_path = _find(data_path, "train"), _find(data_path, "test")
        return (read_table(train_path), str(train_path)), (read_table(test_path), str(test_path))
    frame = read_table(data_path)
    if label not in frame.columns:
        raise DataError(f"{data_path}: label column '{label}' is missing")
    test = keyed_test_mask(frame, split_key, test_fraction)
    return (
        (frame[~test].reset_index(drop=True), f"{data_path} (train split)"),
        (frame[test].reset_index(drop=True), f"{data_path} (test split)"),
    )


def load_bank_data(
    data_path: Path, schema: FeatureSchema, test_fraction: float, split_key: bytes
) -> tuple[EncodedTable, EncodedTable]:
    """Validate against the encoder's schema, then encode; bad data raises one `DataError`.

    Columns are checked strictly, and the training split must hold both classes.
    """
    (train, train_source), (test, test_source) = load_bank_tables(
        data_path, schema.label, test_fraction, split_key
    )
    encoded_train = schema.transform(train, train_source, strict_columns=True)
    encoded_test = schema.transform(test, test_source, strict_columns=True)
    assert encoded_train.label is not None
    positives = int(encoded_train.label.sum())
    if positives in (0, len(encoded_train.label)):
        raise DataError(
            f"{train_source}: label column '{schema.label}' has only one class; "
            "a bank needs both defaults and non-defaults to train"
        )
    return encoded_train, encoded_test
