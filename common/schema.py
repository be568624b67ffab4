"""The feature schema: what a bank's table must contain and how it becomes model input.

Every preprocessing statistic (scaling, category vocabularies, imputation values) is
fitted on the public/source pool only and shipped as JSON beside the encoder. Private
data is validated and transformed with it, never used to fit it: no statistic of a
bank's data leaves the bank through preprocessing.

Column kinds follow `common.cells`: a column is numeric when every present value is a
number (numbers written as text count: "1,250", "$1,250.00", "12%" = 12, "(5)" = -5);
bool columns and text are categorical (booleans as "True"/"False"); a column of numbers
with a few other values ("twelve", "-", "1.250,00") is a `DataError`, never a category.
Blank cells and NA words are missing: the public median for numbers, the unknown bucket
for categories.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedfin.common.cells import MISSING_WORDS, category_text, clean_column, is_text, numbers_in_text
from fedfin.common.errors import CheckpointError, DataError
from fedfin.common.identifiers import identifier_reason

SCHEMA_VERSION = 1
UNKNOWN = "<unknown>"  # index 0 of every vocabulary: unseen and missing categories
_Z_CLIP = 6.0
_MAX_VOCABULARY = 200
_MIN_CATEGORY_COUNT = 5


@dataclass(frozen=True)
class NumericFeature:
    """A numeric column: impute the public median, optionally log1p, then standardise."""

    name: str
    fill_value: float
    mean: float
    std: float
    log_transform: bool


@dataclass(frozen=True)
class CategoricalFeature:
    """A categorical column: index into a vocabulary; index 0 is the unknown bucket."""

    name: str
    vocabulary: tuple[str, ...]

    @property
    def cardinality(self) -> int:
        return len(self.vocabulary) + 1


@dataclass(frozen=True)
class EncodedTable:
    """Model-ready arrays for one table."""

    numeric: np.ndarray  # float32, (rows, numeric features)
    categorical: np.ndarray  # int64, (rows, categorical features)
    label: np.ndarray | None  # float32 0/1, (rows,), absent when scoring


@dataclass(frozen=True)
class FeatureSchema:
    """Columns, label and all preprocessing statistics, fitted on public data only."""

    label: str
    positive_label: str
    negative_label: str
    numeric: tuple[NumericFeature, ...]
    categorical: tuple[CategoricalFeature, ...]
    missing_policy: str = (
        "numeric: public median; categorical: unknown bucket; all-missing column: error"
    )
    version: int = SCHEMA_VERSION
    ignored_columns: tuple[str, ...] = ()  # known non-features, e.g. the bank's region
    # Row identifiers found in the public pool (common.identifiers): column -> why.
    identifier_columns: tuple[tuple[str, str], ...] = ()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.numeric) + tuple(f.name for f in self.categorical)

    @property
    def fingerprint(self) -> str:
        """A short hash that ties an encoder checkpoint to the schema it was trained with."""
        import hashlib

        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    # --- fitting ----------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        label: str,
        positive_label: object | None = None,
        exclude: tuple[str, ...] = (),
        source: str = "public data",
    ) -> "FeatureSchema":
        """Infer column kinds and fit preprocessing on the public/source pool."""
        if label not in frame.columns:
            raise DataError(f"{source}: label column '{label}' is missing")
        positive, negative = _binary_label_values(frame[label], label, positive_label, source)
        numeric: list[NumericFeature] = []
        categorical: list[CategoricalFeature] = []
        identifiers: list[tuple[str, str]] = []
        for name in frame.columns:
            if name == label or name in exclude:
                continue
            column = clean_column(frame[name], str(name), source)
            reason = identifier_reason(str(name), column)
            if reason is not None:
                identifiers.append((str(name), reason))
                continue
            if column.isna().all():
                raise DataError(f"{source}: column '{name}' is entirely missing")
            if _is_numeric(column):
                numeric.append(_fit_numeric(name, column, source))
            else:
                categorical.append(_fit_categorical(name, column))
        if not numeric and not categorical:
            raise DataError(
                f"{source}: no feature columns besides label '{label}'"
                + (f" and row identifier '{identifiers[0][0]}'" if identifiers else "")
            )
        return cls(
            label=label,
            positive_label=positive,
            negative_label=negative,
            numeric=tuple(numeric),
            categorical=tuple(categorical),
            ignored_columns=tuple(exclude),
            identifier_columns=tuple(identifiers),
        )

    def identifier_notes(self) -> list[str]:
        """One line per row identifier left out of the features, for the user to see."""
        return [
            f"column '{name}' is not used as a feature: {reason} (a row identifier)"
            for name, reason in self.identifier_columns
        ]

    # --- using ------------------------------------------------------------------

    def validate(
        self,
        frame: pd.DataFrame,
        source: str,
        require_label: bool = True,
        strict_columns: bool = False,
    ) -> None:
        """Raise one `DataError` naming `source` and the column for the first problem found.

        `strict_columns` also refuses columns the schema does not know: a bank's training
        table should hold exactly what the encoder was built for, so a mislabelled or
        leaking column is caught rather than silently ignored.
        """
        if frame.empty:
            raise DataError(f"{source}: table has no rows")
        if strict_columns:
            known = {*self.feature_names, self.label, *self.ignored_columns}
            known |= {name for name, _ in self.identifier_columns}
            extra = [
                str(c)
                for c in frame.columns
                if str(c) not in known
                and not _is_identifier(str(c), frame[c], source)
            ]
            if extra:
                raise DataError(
                    f"{source}: column '{extra[0]}' is not in the encoder's schema; "
                    "remove it from the bank's data"
                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                )
        if require_label:
            if self.label not in frame.columns:
                raise DataError(f"{source}: label column '{self.label}' is missing")
            self.encode_label(frame[self.label], source)
        missing = [n for n in self.feature_names if n not in frame.columns]
        if missing:
            raise DataError(
                f"{source}: feature column '{missing[0]}' is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        for feature in self.numeric:
            column = frame[feature.name]
            if column.isna().all():
                raise DataError(f"{source}: column '{feature.name}' is entirely missing")
            values = _as_numeric(column, feature.name, source)
            if np.isinf(values).any():
                raise DataError(f"{source}: column '{feature.name}' contains Inf")
        for cat in self.categorical:
            if frame[cat.name].isna().all():
                raise DataError(f"{source}: column '{cat.name}' is entirely missing")

    def encode_label(self, column: pd.Series, source: str) -> np.ndarray:
        """Map the label to 1 (positive: default/bad) and 0; anything else is an error."""
        if column.isna().any():
            raise DataError(f"{source}: label column '{self.label}' has missing values")
        text = column.astype(str)
        unknown = sorted(set(text.unique()) - {self.positive_label, self.negative_label})
        if unknown:
            raise DataError(
                f"{source}: label column '{self.label}' has value '{unknown[0]}'; expected only "
                f"'{self.positive_label}' (positive) and '{self.negative_label}'"
            )
        return (text == self.positive_label).to_numpy(dtype=np.float32)

    def transform(
        self,
        frame: pd.DataFrame,
        source: str,
        require_label: bool = True,
        strict_columns: bool = False,
    ) -> EncodedTable:
        """Validate, then turn the table into model-ready arrays."""
        self.validate(frame, source, require_label=require_label, strict_columns=strict_columns)
        rows = len(frame)
        numeric = np.zeros((rows, len(self.numeric)), dtype=np.float32)
        for j, feature in enumerate(self.numeric):
            values = _as_numeric(frame[feature.name], feature.name, source)
            values = np.where(np.isnan(values), feature.fill_value, values)
            if feature.log_transform:
                values = np.sign(values) * np.log1p(np.abs(values))
            z = (values - feature.mean) / feature.std
            numeric[:, j] = np.clip(z, -_Z_CLIP, _Z_CLIP)
        categorical = np.zeros((rows, len(self.categorical)), dtype=np.int64)
        for j, cat in enumerate(self.categorical):
            index = {value: i + 1 for i, value in enumerate(cat.vocabulary)}
            column = frame[cat.name]
            if isinstance(column.dtype, pd.CategoricalDtype):  # map each category once
                names = category_text(pd.Series(column.cat.categories))
                lookup = np.array([index.get(str(v), 0) for v in names] + [0], dtype=np.int64)
                categorical[:, j] = lookup[column.cat.codes.to_numpy()]  # code -1: missing
                continue
            text = category_text(column)
            categorical[:, j] = text.map(index).fillna(0).to_numpy(dtype=np.int64)
        label = self.encode_label(frame[self.label], source) if require_label else None
        return EncodedTable(numeric=numeric, categorical=categorical, label=label)

    # --- persistence ------------------------------------------------------------

    def to_json(self) -> str:
        fields = asdict(self)
        if not self.identifier_columns:  # schemas without identifiers keep their fingerprint
            del fields["identifier_columns"]
        return json.dumps(fields, indent=2, sort_keys=True)

    def save(self, path: Path) -> None:
        from fedfin.common.atomic import write_atomically

        write_atomically(path, lambda tmp: tmp.write_text(self.to_json() + "\n"))

    @classmethod
    def from_json(cls, text: str) -> "FeatureSchema":
        raw = json.loads(text)
        if raw.get("version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported schema version {raw.get('version')}")
        return cls(
            label=raw["label"],
            positive_label=raw["positive_label"],
            negative_label=raw["negative_label"],
            numeric=tuple(NumericFeature(**f) for f in raw["numeric"]),
            categorical=tuple(
                CategoricalFeature(name=f["name"], vocabulary=tuple(f["vocabulary"]))
                for f in raw["categorical"]
            ),
            missing_policy=raw["missing_policy"],
            version=raw["version"],
            ignored_columns=tuple(raw.get("ignored_columns", ())),
            identifier_columns=tuple(
                (str(name), str(reason)) for name, reason in raw.get("identifier_columns", ())
            ),
        )

    @classmethod
    def load(cls, path: Path) -> "FeatureSchema":
        if not path.exists():
            raise CheckpointError(f"{path}: schema file not found")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not a valid fedfin schema ({exc})") from None


def _binary_label_values(
    column: pd.Series, label: str, positive_label: object | None, source: str
) -> tuple[str, str]:
    if column.isna().any():
        raise DataError(f"{source}: label column '{label}' has missing values")
    values = sorted(column.astype(str).unique())
    if len(values) != 2:
        raise DataError(
            f"{source}: label column '{label}' must have exactly 2 values, "
            f"found {len(values)}: {values[:5]}"
        )
    if positive_label is None:
        if values == ["0", "1"] or values == ["False", "True"]:
            positive_label = values[1]
        else:
            raise DataError(
                f"{source}: label column '{label}' has values {values}; "
                "pass --positive-label to say which one means default"
            )
    positive = str(positive_label)
    if positive not in values:
        raise DataError(
            f"{source}: --positive-label '{positive}' is not a value of label column '{label}'"
        )
    negative = values[0] if values[1] == positive else values[1]
    return positive, negative


def _is_identifier(name: str, column: pd.Series, source: str) -> bool:
    """A bank's own extra column that is a row identifier may stay in its table."""
    try:
        return identifier_reason(name, clean_column(column, name, source)) is not None
    except DataError:  # mixed numbers and words: not an identifier, so an unknown column
        return False


def _is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def _as_numeric(column: pd.Series, name: str, source: str) -> np.ndarray:
    if _is_numeric(column):
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    text = category_text(column)
    if is_text(column):
        text = text.where(~text.isin(list(MISSING_WORDS)))
    if text.isna().all():  # nothing but missing values (pd.NA, None, blanks): imputed later
        return np.full(len(column), np.nan)
    converted = numbers_in_text(text, name, source) if is_text(column) else None
    if converted is None:
        bad = text.dropna()
        example = bad.iloc[0] if len(bad) else column.iloc[0]
        raise DataError(f"{source}: column '{name}' must be numeric, found '{example}'")
    return converted.to_numpy(dtype=np.float64, na_value=np.nan)


def _fit_numeric(name: str, column: pd.Series, source: str) -> NumericFeature:
    values = column.to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isinf(values).any():
        raise DataError(f"{source}: column '{name}' contains Inf")
    observed = values[~np.isnan(values)]
    fill = float(np.median(observed))
    skew = float(pd.Series(observed).skew()) if len(observed) > 2 else 0.0
    log_transform = bool(observed.min() >= 0 and math.isfinite(skew) and skew > 2.0)
    filled = np.where(np.isnan(values), fill, values)
    if log_transform:
        filled = np.log1p(filled)
    std = float(filled.std())
    return NumericFeature(
        name=name,
        fill_value=fill,
        mean=float(filled.mean()),
        std=std if std > 1e-12 else 1.0,
        log_transform=log_transform,
    )


def _fit_categorical(name: str, column: pd.Series) -> CategoricalFeature:
    counts = category_text(column).dropna().value_counts()
    frequent = counts[counts >= _MIN_CATEGORY_COUNT].index[:_MAX_VOCABULARY]
    return CategoricalFeature(name=name, vocabulary=tuple(sorted(str(v) for v in frequent)))
