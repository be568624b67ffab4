"""Turn one table into a public/source pool plus N banks, each with its own train/test split.

Shaped like Flower Datasets' partitioners: one small interface, one class per way of
splitting. Every split is deterministic for a given seed.

The built-in split (`GroupPartitioner` on `addr_state`) is natural and non-IID: whole US
states go either to the public pool or to one bank, so banks differ the way real lenders'
regions do. `GroupPartitioner`'s docstring gives the rule for any grouping column.
"""

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedfin.common.cells import category_text
from fedfin.common.config import SplitConfig
from fedfin.common.errors import ConfigError, DataError

MISSING_GROUP = "<missing>"
MIN_BANK_GROUP_ROWS = 50  # a group that starts a bank: at least this many rows ...
MIN_BANK_GROUP_CLASS_ROWS = 2  # ... and at least this many of each label value
MIN_PUBLIC_ROWS = 50  # the public pool must be able to pretrain (server/pretrain.py)


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
    partition_by: str | None = None  # the grouping column; None: random rows

    def placement(self) -> dict[str, dict[str, object]]:
        """Which groups and how many rows went to the public pool and to each bank."""
        parts: dict[str, dict[str, object]] = {
            "public": {"rows": len(self.public), "groups": list(self.public_groups)}
        }
        for bank in self.banks:
            parts[bank.name] = {"rows": bank.num_rows, "groups": list(bank.groups)}
        return parts

    def summary(self) -> str:
        """One line for people: the split, with each part's groups and rows."""
        how = f"split by '{self.partition_by}'" if self.partition_by else "random split"

        def part(name: str, groups: list[str] | tuple[str, ...], rows: int) -> str:
            shown = ", ".join(groups[:6]) + (
                f", +{len(groups) - 6} more" if len(groups) > 6 else ""
            )
            return f"{name} {rows} rows" + (f" ({shown})" if groups else "")

        parts = [part("public pool", self.public_groups, len(self.public))]
        parts += [part(b.name, b.groups, b.num_rows) for b in self.banks]
        return f"{how}: " + "; ".join(parts)

    def public_source(self, name: str) -> str:
        """How error messages name the public pool: the data and, when grouped, its groups."""
        if not self.partition_by:
            return f"{name} (public pool)"
        groups = ", ".join(self.public_groups[:6]) + (
            ", ..." if len(self.public_groups) > 6 else ""
        )
        return f"{name} (public pool: {self.partition_by} = {groups})"


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
            held = f" (groups {', '.join(groups)})" if groups else ""
            raise ConfigError(
                f"--banks {self.config.num_banks}: {name}{held} would get only {len(rows)} rows, "
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
    """Whole groups (US states, products, home ownership, ...) go to the public pool or to
    one bank. The rule, for any grouping column:

    - Missing values form one group, "<missing>"; numbers name groups without ".0".
    - A group can start a bank when it has at least 20 rows and at least 2 rows of each label
      value. Smaller or one-class groups (often "<missing>") never make a bank alone: they
      join the public pool or a bank that already has a group.
    - The public pool takes groups in a seeded random order until it holds
      `public_fraction` of the rows (or exactly `public_groups` when given), skipping any
      group the banks need: at least `num_banks` groups that can start a bank stay out.
    - The banks' first groups are the largest groups that can start a bank, one each; the
      remaining groups are dealt largest first to the bank with the fewest rows.
    Too few usable groups for the banks asked for is a `ConfigError` that names the column,
    its groups and sizes, and the most banks it allows. `FederatedSplit.placement()` says
    which groups and rows went where.
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
        if self.column == self.label:
            raise ConfigError(f"--partition-by '{self.column}' is the label column")
        keys = category_text(frame[self.column]).fillna(MISSING_GROUP).astype(str)
        sizes = keys.value_counts()
        groups = sorted(sizes.index)
        starters = self._bank_starters(frame, keys)
        public = self._public_groups(groups, sizes, starters, frame, keys)
        if public is None:
            raise self._too_few_groups(groups, sizes, starters, frame, keys)
        rest = [g for g in groups if g not in public]
        order = sorted(rest, key=lambda g: (-int(sizes[g]), g))
        seeds = [g for g in order if g in starters][: self.config.num_banks]
        if len(seeds) < self.config.num_banks:
            raise self._too_few_groups(groups, sizes, starters, frame, keys)
        assignment: list[list[str]] = [[seed] for seed in seeds]
        loads = [int(sizes[seed]) for seed in seeds]
        for group in order:
            if group in seeds:
                continue
            target = int(np.argmin(loads))
            assignment[target].append(group)
            loads[target] += int(sizes[group])
        banks = tuple(
            self._bank(i, frame[keys.isin(members)].reset_index(drop=True), tuple(sorted(members)))
            for i, members in enumerate(assignment)
        )
        public_rows = frame[keys.isin(public)].reset_index(drop=True)
        return FederatedSplit(
            public=public_rows,
            banks=banks,
            public_groups=tuple(sorted(public)),
            partition_by=self.column,
        )

    def _bank_starters(self, frame: pd.DataFrame, keys: pd.Series) -> set[str]:
        """Groups big enough, with both label values, to be a bank on their own."""
        counts = pd.crosstab(keys, frame[self.label].astype(str))
        enough = (counts.sum(axis=1) >= MIN_BANK_GROUP_ROWS) & (
            (counts >= MIN_BANK_GROUP_CLASS_ROWS).sum(axis=1) >= 2
        )
        return {str(g) for g in counts.index[enough]}

    def _public_groups(
        self,
        groups: list[str],
        sizes: pd.Series,
        starters: set[str],
        frame: pd.DataFrame,
        keys: pd.Series,
        num_banks: int | None = None,
    ) -> set[str] | None:
        """The public pool's groups, or None when no pool can pretrain and leave the banks
        `num_banks` groups that can start a bank."""
        num_banks = num_banks or self.config.num_banks
        total = len(frame)
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
        left_starters = len(starters)
        for index in rng.permutation(len(groups)):
            if rows >= self.config.public_fraction * total:
                break
            group = groups[index]
            if group in starters and left_starters - 1 < num_banks:
                continue  # the banks need it
            public.add(group)
            rows += int(sizes[group])
            left_starters -= group in starters
        labels = frame[self.label].astype(str)[keys.isin(public)].value_counts()
        enough_classes = len(labels) == 2 and labels.min() >= MIN_BANK_GROUP_CLASS_ROWS
        if rows < MIN_PUBLIC_ROWS or not enough_classes or left_starters < num_banks:
            return None
        return public

    def _too_few_groups(
        self,
        groups: list[str],
        sizes: pd.Series,
        starters: set[str],
        frame: pd.DataFrame,
        keys: pd.Series,
    ) -> ConfigError:
        listed = ", ".join(f"{g} {int(n)}" for g, n in sizes.head(10).items()) + (
            ", ..." if len(sizes) > 10 else ""
        )
        if self.public_groups is not None:
            most = len(starters - set(self.public_groups))
        else:
            most = next(
                (
                    k
                    for k in range(self.config.num_banks - 1, 0, -1)
                    if self._public_groups(groups, sizes, starters, frame, keys, k) is not None
                ),
                0,
            )
        advice = (
            f"use --banks {most} or fewer, or a column with more groups"
            if most >= 1
            else "group by a column with more, larger groups, or leave out --partition-by"
        )
        return ConfigError(
            f"--banks {self.config.num_banks} with --partition-by '{self.column}': its "
            f"{len(sizes)} groups (rows: {listed}) allow at most {most} bank(s): whole groups "
            "go to the public pool or one bank; a bank needs a group of at least "
            f"{MIN_BANK_GROUP_ROWS} rows with {MIN_BANK_GROUP_CLASS_ROWS}+ of each label value, "
            f"and the public pool {MIN_PUBLIC_ROWS}+ rows with both; {advice}"
        )
