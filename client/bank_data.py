"""Load a bank's own data and split it for training, validation and testing, inside the bank.

`data-path` is either one CSV/Parquet file (split here) or a directory holding `train.*`
and `test.*` files. A single file is split record by record with a keyed hash: each loan's
side depends only on its own values and the bank's secret split key, so adding or removing
one loan moves only that loan (neighbouring datasets give neighbouring training sets), and
no one without the key can tell which side a loan is on.

The validation slice is taken out of the training rows the same way, with a second keyed
hash (the same key, another BLAKE2b personalisation), so it is disjoint from the test rows
by construction and again a function of each loan alone. The bank uses it to choose the
model it serves (public or federated) and to recalibrate it (client/model_choice.py).
Validation rows are left out of DP training: the choice compares a model that trained on
the training rows with one that never saw the bank's data, and only rows neither model
trained on compare them fairly. Leaving them out costs no privacy: the training set is
still a neighbour-preserving function of the data (removing one loan removes at most that
loan from it), so every release keeps its (ε, δ). The choice and the calibration are local
decisions that are never released, so they are not charged.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedfin.common.errors import DataError
from fedfin.common.schema import EncodedTable, FeatureSchema
from fedfin.common.tables import TABLE_SUFFIXES, read_table

_FIELD_SEPARATOR = "\x1f"
_HASH_SCALE = float(2**64)
_VALIDATION_PERSON = b"fedfin-validate"  # BLAKE2b personalisation: a hash apart from the test one


@dataclass(frozen=True)
class BankSplits:
    """A bank's encoded rows: DP training, validation (model choice, calibration), test."""

    train: EncodedTable
    validation: EncodedTable
    test: EncodedTable


def _find(directory: Path, stem: str) -> Path:
    for suffix in TABLE_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise DataError(f"{directory}: no {stem}.csv or {stem}.parquet in the data directory")


def _keyed_mask(frame: pd.DataFrame, key: bytes, fraction: float, person: bytes) -> np.ndarray:
    """True where the keyed BLAKE2b of the row's values (column order fixed) falls under
    `fraction`: a function of that row alone (and the key), never of row order, of the other
    rows, or of a public seed."""
    columns = sorted(frame.columns, key=str)
    joined = pd.Series([""] * len(frame), index=frame.index, dtype=object)
    for number, column in enumerate(columns):
        values = frame[column].astype(object).map(str)  # missing values too: "nan"
        joined = values if number == 0 else joined + _FIELD_SEPARATOR + values
    threshold = fraction * _HASH_SCALE
    return np.fromiter(
        (
            int.from_bytes(
                hashlib.blake2b(row.encode(), digest_size=8, key=key, person=person).digest(),
                "big",
            )
            < threshold
            for row in joined.tolist()
        ),
        dtype=bool,
        count=len(frame),
    )


def keyed_test_mask(frame: pd.DataFrame, key: bytes, test_fraction: float) -> np.ndarray:
    """True for the rows on the test side (keyed BLAKE2b of each row's values)."""
    return _keyed_mask(frame, key, test_fraction, b"")


def keyed_validation_mask(
    frame: pd.DataFrame, key: bytes, validation_fraction: float
) -> np.ndarray:
    """True for the training-side rows that go to validation: a second keyed hash.

    Apply it to the rows left after the test split: a loan's side still depends on nothing
    but its own values and the key, and a test row can never be a validation row.
    """
    return _keyed_mask(frame, key, validation_fraction, _VALIDATION_PERSON)


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


def load_bank_splits(
    data_path: Path,
    schema: FeatureSchema,
    test_fraction: float,
    split_key: bytes,
    validation_fraction: float,
) -> BankSplits:
    """Validate against the encoder's schema, then encode; bad data raises one `DataError`.

    Columns are checked strictly, and the training split must hold both classes. The
    validation rows come out of the training table (`validation_fraction` of it, keyed).
    """
    (train, train_source), (test, test_source) = load_bank_tables(
        data_path, schema.label, test_fraction, split_key
    )
    encoded = schema.transform(train, train_source, strict_columns=True)
    validation = keyed_validation_mask(train, split_key, validation_fraction)
    encoded_train, encoded_validation = _rows(encoded, ~validation), _rows(encoded, validation)
    encoded_test = schema.transform(test, test_source, strict_columns=True)
    assert encoded_train.label is not None
    positives = int(encoded_train.label.sum())
    if positives in (0, len(encoded_train.label)):
        raise DataError(
            f"{train_source}: label column '{schema.label}' has only one class; "
            "a bank needs both defaults and non-defaults to train"
        )
    return BankSplits(encoded_train, encoded_validation, encoded_test)


def _rows(table: EncodedTable, mask: np.ndarray) -> EncodedTable:
    label = None if table.label is None else table.label[mask]
    return EncodedTable(table.numeric[mask], table.categorical[mask], label)


def load_bank_data(
    data_path: Path,
    schema: FeatureSchema,
    test_fraction: float,
    split_key: bytes,
    validation_fraction: float = 0.0,
) -> tuple[EncodedTable, EncodedTable]:
    """(training rows, test rows): `load_bank_splits` without the validation slice."""
    splits = load_bank_splits(data_path, schema, test_fraction, split_key, validation_fraction)
    return splits.train, splits.test
