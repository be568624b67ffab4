"""Where the data comes from: the built-in Lending Club loans, synthetic banks, or a file.

A `DataSource` says how to read the table and how to split it into a public pool and
banks; the split itself is done by a partitioner from `common.partition`.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedfin.common import lending_club, synthetic
from fedfin.common.config import SplitConfig
from fedfin.common.errors import ConfigError, DataError
from fedfin.common.partition import FederatedSplit, GroupPartitioner, IidPartitioner, Partitioner
from fedfin.common.tables import read_table

BUILT_IN = ("lending-club", "synthetic")


@dataclass(frozen=True)
class DataSource:
    """A labelled table and how to split it."""

    name: str
    frame: pd.DataFrame
    label: str
    positive_label: str | None
    partition_by: str | None
    public_groups: tuple[str, ...] | None = None
    path: Path | None = None  # the file, resolved (None for built-in data)

    def identity(self) -> dict[str, Any]:
        """What names this data in a run's manifest or an encoder's provenance: the file's
        resolved path and content hash (so ./loans.csv and /abs/loans.csv are the same
        data, and an edited file is not), or the built-in data's name and rows."""
        if self.path is None:
            return {"data": self.name, "rows": len(self.frame)}
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return {"data": str(self.path), "data_sha256": digest.hexdigest(), "rows": len(self.frame)}

    @property
    def excluded_columns(self) -> tuple[str, ...]:
        """Columns that are not features: the grouping column identifies the bank."""
        return (self.partition_by,) if self.partition_by else ()

    def partitioner(self, config: SplitConfig) -> Partitioner:
        if self.partition_by is None:
            return IidPartitioner(self.label, config)
        return GroupPartitioner(self.label, config, self.partition_by, self.public_groups)

    def split(self, config: SplitConfig) -> FederatedSplit:
        return self.partitioner(config).split(self.frame)


def load_source(
    data: str,
    label: str | None = None,
    partition_by: str | None = None,
    positive_label: str | None = None,
    synthetic_rows: int = 20_000,
    synthetic_banks: int = 5,
    synthetic_shift: float = 0.5,
    seed: int = 0,
) -> DataSource:
    """Resolve `--data` (`lending-club`, `synthetic` or a CSV/Parquet path) to a `DataSource`."""
    if data == "lending-club":
        return DataSource(
            name=data,
            frame=lending_club.load_lending_club(),
            label=lending_club.LABEL,
            positive_label=lending_club.POSITIVE_LABEL,
            partition_by=partition_by or lending_club.STATE_COLUMN,
        )
    if data == "synthetic":
        frame = synthetic.generate_credit_data(
            synthetic_rows, synthetic_banks, synthetic_shift, seed=seed
        )
        return DataSource(
            name=data,
            frame=frame,
            label=synthetic.LABEL,
            positive_label="1",
            partition_by=synthetic.GROUP_COLUMN,
            public_groups=(synthetic.PUBLIC_GROUP,),
        )
    if label is None:
        raise ConfigError(f"--label is required with --data {data}")
    frame = read_table(Path(data))
    if label not in frame.columns:
        raise DataError(f"{data}: label column '{label}' is missing")
    if partition_by is not None and partition_by not in frame.columns:
        raise DataError(f"{data}: --partition-by column '{partition_by}' is missing")
    return DataSource(
        name=data,
        frame=frame,
        label=label,
        positive_label=positive_label,
        partition_by=partition_by,
        path=Path(data).resolve(),
    )
