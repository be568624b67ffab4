"""A binned profile of a table's features: the reference that PSI and range checks compare to.

Two profiles exist, with one shape. The public profile is fitted at pretrain time on the
same public rows as the schema and saved beside the encoder (`public_profile.json`): it is
a statistic of public data only, so it may travel with the encoder. A bank's drift
reference (client/drift.py) is fitted inside the bank on its own training rows and never
leaves its state directory.

Per numeric feature: decile bins of the present values (common/psi.py's bin rule), the share
missing, and the 0.5% and 99.5% quantiles: a value outside them is "out of range" (by
construction 1% of the reference's own values are). Per categorical feature: the share of
each category of the schema's vocabulary, of values outside it (unseen) and of missing ones.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedfin.common.cells import MISSING_WORDS, category_text
from fedfin.common.errors import CheckpointError
from fedfin.common.psi import (
    MISSING_CODE,
    UNSEEN_CODE,
    categorical_counts,
    numeric_counts,
    quantile_edges,
)
from fedfin.common.schema import FeatureSchema, _as_numeric

PUBLIC_PROFILE_FILE = "public_profile.json"
PROFILE_VERSION = 1
RANGE_QUANTILES = (0.005, 0.995)


@dataclass(frozen=True)
class NumericProfile:
    """Bins of one numeric feature: proportions of len(edges) + 1 value bins, then missing."""

    name: str
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    low: float  # RANGE_QUANTILES of the present values: outside them is out of range
    high: float

    @property
    def missing_rate(self) -> float:
        return self.proportions[-1]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "NumericProfile":
        return cls(
            name=str(raw["name"]),
            edges=tuple(float(e) for e in raw["edges"]),
            proportions=tuple(float(p) for p in raw["proportions"]),
            low=float(raw["low"]),
            high=float(raw["high"]),
        )


@dataclass(frozen=True)
class CategoricalProfile:
    """Proportions of each category of the vocabulary, then unseen, then missing."""

    name: str
    categories: tuple[str, ...]
    proportions: tuple[float, ...]

    @property
    def missing_rate(self) -> float:
        return self.proportions[-1]

    @property
    def unseen_rate(self) -> float:
        return self.proportions[-2]


@dataclass(frozen=True)
class DataProfile:
    """Every feature's profile, the rows it was fitted on and their label rate."""

    schema_fingerprint: str
    fitted_on: str
    rows: int
    label_rate: float | None
    numeric: tuple[NumericProfile, ...]
    categorical: tuple[CategoricalProfile, ...]
    version: int = PROFILE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DataProfile":
        if raw.get("version") != PROFILE_VERSION:
            raise ValueError(f"unsupported profile version {raw.get('version')}")
        return cls(
            schema_fingerprint=str(raw["schema_fingerprint"]),
            fitted_on=str(raw["fitted_on"]),
            rows=int(raw["rows"]),
            label_rate=None if raw["label_rate"] is None else float(raw["label_rate"]),
            numeric=tuple(NumericProfile.from_dict(f) for f in raw["numeric"]),
            categorical=tuple(
                CategoricalProfile(
                    name=f["name"],
                    categories=tuple(str(c) for c in f["categories"]),
                    proportions=tuple(float(p) for p in f["proportions"]),
                )
                for f in raw["categorical"]
            ),
        )

    def save(self, path: Path) -> None:
        from fedfin.common.atomic import write_json_atomically

        write_json_atomically(path, self.to_dict())


def numeric_values(frame: pd.DataFrame, name: str, source: str) -> np.ndarray:
    """A numeric feature as float64 (NaN missing), read by the schema's cell rules."""
    return _as_numeric(frame[name], name, source)


def category_codes(column: pd.Series, categories: tuple[str, ...]) -> np.ndarray:
    """Index into `categories`; UNSEEN_CODE for other values, MISSING_CODE for missing ones.

    A value in the vocabulary counts as that category even if it reads like an NA word
    ("n/a" is one of Lending Club's emp_length values); otherwise blanks and NA words are
    missing, as the cell rules say.
    """
    text = category_text(column)
    index = {value: i for i, value in enumerate(categories)}
    codes = text.map(index)
    missing = text.isna() | text.isin(list(MISSING_WORDS)) | text.eq("")
    result = np.where(missing.to_numpy(dtype=bool), MISSING_CODE, UNSEEN_CODE)
    known = codes.notna().to_numpy(dtype=bool)
    result[known] = codes[known].to_numpy(dtype=np.int64)
    return result.astype(np.int64)


def numeric_profile(name: str, values: np.ndarray) -> NumericProfile:
    """Decile bins, missing share and public range of one column of numbers (NaN missing)."""
    edges = quantile_edges(values)
    present = values[~np.isnan(values)]
    low, high = np.quantile(present, RANGE_QUANTILES) if present.size else (np.nan, np.nan)
    return NumericProfile(
        name=name,
        edges=edges,
        proportions=_shares(numeric_counts(values, edges)),
        low=float(low),
        high=float(high),
    )


def fit_profile(
    frame: pd.DataFrame,
    schema: FeatureSchema,
    source: str,
    fitted_on: str,
    label_rate: float | None = None,
) -> DataProfile:
    """Profile `frame`'s features with the bin rule of common/psi.py."""
    numeric = [
        numeric_profile(feature.name, numeric_values(frame, feature.name, source))
        for feature in schema.numeric
    ]
    categorical = []
    for cat in schema.categorical:
        codes = category_codes(frame[cat.name], cat.vocabulary)
        counts = categorical_counts(codes, len(cat.vocabulary))
        categorical.append(CategoricalProfile(cat.name, cat.vocabulary, _shares(counts)))
    return DataProfile(
        schema_fingerprint=schema.fingerprint,
        fitted_on=fitted_on,
        rows=len(frame),
        label_rate=label_rate,
        numeric=tuple(numeric),
        categorical=tuple(categorical),
    )


def fit_public_profile(
    public_rows: pd.DataFrame, schema: FeatureSchema, source: str
) -> DataProfile:
    """The public profile saved beside the encoder: same rows as the schema, with label rate."""
    label = schema.encode_label(public_rows[schema.label], source)
    return fit_profile(
        public_rows,
        schema,
        source,
        fitted_on=f"{source}: {len(public_rows)} public rows (the schema's fit rows)",
        label_rate=float(label.mean()),
    )


def load_public_profile(checkpoint_dir: Path, schema: FeatureSchema) -> DataProfile:
    """The public profile of a pretrained checkpoint; a clear `CheckpointError` without one."""
    path = checkpoint_dir / PUBLIC_PROFILE_FILE
    if not path.exists():
        raise CheckpointError(
            f"{checkpoint_dir}: no {PUBLIC_PROFILE_FILE} (a checkpoint pretrained before fedfin "
            "kept the public profile, or a federated round's encoder); pass the pretrained "
            "checkpoint (e.g. RUN/pretrained) or run `fedfin pretrain` again"
        )
    try:
        profile = DataProfile.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a valid fedfin public profile ({exc})") from None
    if profile.schema_fingerprint != schema.fingerprint:
        raise CheckpointError(
            f"{path}: profile does not belong to this encoder's schema (fingerprint mismatch)"
        )
    return profile


def _shares(counts: np.ndarray) -> tuple[float, ...]:
    total = counts.sum()
    return tuple(float(c / total) if total else 0.0 for c in counts)
