"""Load a bank's own data and split it for training and testing, inside the bank.

`data-path` is either one CSV/Parquet file (split here with the bank's seed) or a
directory holding `train.*` and `test.*` files.
"""

from pathlib import Path

import pandas as pd

from common.errors import DataError
from common.partition import split_train_test
from common.schema import EncodedTable, FeatureSchema
from common.tables import TABLE_SUFFIXES, read_table


def _find(directory: Path, stem: str) -> Path:
    for suffix in TABLE_SUFFIXES:
        candidate = directory / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    raise DataError(f"{directory}: no {stem}.csv or {stem}.parquet in the data directory")


def load_bank_tables(
    data_path: Path, label: str, test_fraction: float, seed: int
) -> tuple[tuple[pd.DataFrame, str], tuple[pd.DataFrame, str]]:
    """(train table, its source name), (test table, its source name)."""
    if data_path.is_dir():
        train_path, test_path = _find(data_path, "train"), _find(data_path, "test")
        return (read_table(train_path), str(train_path)), (read_table(test_path), str(test_path))
    frame = read_table(data_path)
    if label not in frame.columns:
        raise DataError(f"{data_path}: label column '{label}' is missing")
    train, test = split_train_test(frame, label, test_fraction, seed)
    return (train, f"{data_path} (train split)"), (test, f"{data_path} (test split)")


def load_bank_data(
    data_path: Path, schema: FeatureSchema, test_fraction: float, seed: int
) -> tuple[EncodedTable, EncodedTable]:
    """Validate against the encoder's schema, then encode; bad data raises one `DataError`.

    Columns are checked strictly, and the training split must hold both classes.
    """
    (train, train_source), (test, test_source) = load_bank_tables(
        data_path, schema.label, test_fraction, seed
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
