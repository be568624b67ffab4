"""Turn one table into a public/source pool plus N banks, each with its own train/test split.

Shaped like Flower Datasets' partitioners: one small interface, one class per way of
splitting. Every split is deterministic for a given seed.

The built-in split (`GroupPartitioner` on `addr_state`) is natural and non-IID: whole US
states go either to the public pool or to one bank, so banks differ the way real lenders'
regions do.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common.config import SplitConfig
from common.errors import ConfigError, DataError


@dataclass(frozen=True)
class BankData:
    """One bank's private rows, already split for training and testing."""

    name: str
    train: pd.DataFrame
    test: pd.DataFrame
    groups: tuple[str, ...] = ()

    @property
    def num_rows(self) -> int:
        return len(self.train) + len(self.test)


@dataclass(frozen=True)
class FederatedSplit:
    """The public/source pool (for pretraining) and the banks (private)."""

    public: pd.DataFrame
    banks: tuple[BankData, ...]
    public_groups: tuple[str, ...] = ()


def split_train_test(
    frame: pd.DataFrame, label: str, test_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded split, stratified by label when both parts can hold both classes."""
    from sklearn.model_selection import train_test_split  # heavy; only some paths split

    counts = frame[label].value_counts()
    n_test = math.ceil(test_fraction * len(frame))  # how scikit-learn sizes the test part
    can_stratify = len(counts) == 2 and counts.min() >= 2 and min(n_test, len(frame) - n_test) >= 2
    stratify = frame[label] if can_stratify else None
    train, test = train_test_split(
        frame, test_size=test_fraction, random_state=seed, stratify=stratify
    )
    return train.reset_index(drop=True), test.reset_index(drop=True)


class Partitioner(ABC):
    """Splits a labelled table into a public pool and `config.num_banks` banks."""

    def __init__(self, label: str, config: SplitConfig) -> None:
        self.label = label
        self.config = config

    @abstractmethod
    def split(self, frame: pd.DataFrame) -> FederatedSplit:
        """Return the public pool and the banks."""

    def _bank(self, index: int, rows: pd.DataFrame, groups: tuple[str, ...] = ()) -> BankData:
        name = f"bank-{index:02d}"
        n_test = math.ceil(self.config.test_fraction * len(rows))
        if n_test < 1 or len(rows) - n_test < 1:
            raise ConfigError(
                f"--banks {self.config.num_banks}: {name} would get only {len(rows)} rows, "
                "too few to split into train and test; use fewer banks"
            )
        train, test = split_train_test(
            rows, self.label, self.config.test_fraction, self.config.seed + 1 + index
        )
        return BankData(name=name, train=train, test=test, groups=groups)


class IidPartitioner(Partitioner):
    """Random rows: a baseline for data with no natural grouping."""

    def split(self, frame: pd.DataFrame) -> FederatedSplit:
        rng = np.random.default_rng(self.config.seed)
        order = rng.permutation(len(frame))
        n_public = round(len(frame) * self.config.public_fraction)
        public = frame.iloc[order[:n_public]].reset_index(drop=True)
        chunks = np.array_split(order[n_public:], self.config.num_banks)
        banks = tuple(
            self._bank(i, frame.iloc[chunk].reset_index(drop=True))
            for i, chunk in enumerate(chunks)
        )
        return FederatedSplit(public=public, banks=banks)


class GroupPartitioner(Partitioner):
    """Whole groups (e.g. US states) go to the public pool or to one bank.

    Groups are shuffled with the seed; the public pool takes groups until it holds
    `public_fraction` of the rows (or exactly `public_groups` when given); the rest are
    dealt largest first to the bank with the fewest rows, which keeps banks balanced.
    """

    def __init__(
        self,
        label: str,
        config: SplitConfig,
        column: str,
        public_groups: tuple[str, ...] | None = None,
    ) -> None:
        super().__init__(label, config)
        self.column = column
        self.public_groups = public_groups

    def split(self, frame: pd.DataFrame) -> FederatedSplit:
        if self.column not in frame.columns:
            raise DataError(f"partition column '{self.column}' is not in the table")
        keys = frame[self.column].astype("string").fillna("<missing>")
        sizes = keys.value_counts()
        groups = sorted(sizes.index)
        public = self._public_groups(groups, sizes, len(frame))
        rest = [g for g in groups if g not in public]
        if len(rest) < self.config.num_banks:
            raise ConfigError(
                f"--banks {self.config.num_banks}: column '{self.column}' has only "
                f"{len(rest)} groups left after the public pool; use fewer banks"
            )
        assignment: list[list[str]] = [[] for _ in range(self.config.num_banks)]
        loads = [0] * self.config.num_banks
        for group in sorted(rest, key=lambda g: (-int(sizes[g]), g)):
            target = int(np.argmin(loads))
            assignment[target].append(group)
            loads[target] += int(sizes[group])
        banks = tuple(
            self._bank(i, frame[keys.isin(members)].reset_index(drop=True), tuple(sorted(members)))
            for i, members in enumerate(assignment)
        )
        public_rows = frame[keys.isin(public)].reset_index(drop=True)
        return FederatedSplit(public=public_rows, banks=banks, public_groups=tuple(sorted(public)))

    def _public_groups(self, groups: list[str], sizes: pd.Series, total: int) -> set[str]:
        if self.public_groups is not None:
            unknown = set(self.public_groups) - set(groups)
            if unknown:
                raise ConfigError(
                    f"public groups {sorted(unknown)} are not values of column '{self.column}'"
                )
            return set(self.public_groups)
        rng = np.random.default_rng(self.config.seed)
        public: set[str] = set()
        rows = 0
        for index in rng.permutation(len(groups)):
            if rows >= self.config.public_fraction * total:
                break
            public.add(groups[index])
            rows += int(sizes[groups[index]])
        return public
