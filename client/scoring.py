"""Score applications inside the bank with the shared encoder and the bank's private head.

`Scorer.load` reads the model once. `score_frame` validates a table with the schema (the
same `FeatureSchema.transform` used in training) and runs the torch model in batches.
`score_one` is the real-time path for one application: the schema's per-column pandas work
costs milliseconds for one row, so the schema's statistics are precomputed into plain
arrays and dicts, and the model is folded into a few numpy matmuls (each categorical's
embedding is multiplied into the first layer ahead of time). Both paths give the same
probability to 1e-6 (tests/test_scoring.py). Nothing here opens a network connection.

A missing value (None/NaN/empty) is imputed exactly as in training (public median, unknown
category), alone or in a table, so a row's score never depends on the rows scored with it:
a column empty in every row of a table is imputed too (`FeatureSchema.validate` would refuse
it, which for one application would refuse any missing value). Nothing is imputed silently:
`row_notes` names each row's imputed features and its categories the model never saw
(scored as the unknown category), and `fedfin score`/`serve` report both.

`application_column_problems` is the one column rule of `fedfin score` (a table's columns)
and `fedfin serve` (an application's fields): every feature present; an id, the label and
any other column kept as they are and not used; the names results are written under refused.
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedfin.common.errors import CheckpointError, DataError
from fedfin.common.model import CreditModel
from fedfin.common.schema import _Z_CLIP, EncodedTable, FeatureSchema, _as_numeric

BATCH_ROWS = 65_536
PROBABILITY_COLUMN = "default_probability"
DECISION_COLUMN = "decision"
REASONS_COLUMN = "reason_codes"
IMPUTED_COLUMN = "imputed"
UNSEEN_COLUMN = "unseen_categories"
OUTPUT_COLUMNS = (
    PROBABILITY_COLUMN,
    DECISION_COLUMN,
    REASONS_COLUMN,
    IMPUTED_COLUMN,
    UNSEEN_COLUMN,
)
_UNSEEN = "\x00fedfin: no value\x00"  # fills a column empty in every row: no vocabulary has it


MISSING = "missing"
TAKEN = "taken"


def application_column_problems(
    columns: Iterable[object], schema: FeatureSchema
) -> list[tuple[str, str]]:
    """(column, MISSING or TAKEN) under the column rules shared by `score` and `serve`.

    Every feature of the model must be there (an empty value is fine: it is imputed); the
    label, an id and any other column are kept as given and never reach the model; a column
    named like a result (`OUTPUT_COLUMNS`) would be overwritten, so it is refused.
    """
    names = {str(c) for c in columns}
    problems = [(name, MISSING) for name in schema.feature_names if name not in names]
    problems += [(name, TAKEN) for name in OUTPUT_COLUMNS if name in names]
    return problems


def check_application_columns(
    columns: Iterable[object], schema: FeatureSchema, source: str
) -> None:
    """`application_column_problems` of a table as one `DataError` naming the first column."""
    problems = application_column_problems(columns, schema)
    if not problems:
        return
    name, kind = problems[0]
    if kind == TAKEN:
        raise DataError(f"{source}: already has a column '{name}'; rename it first")
    more = sum(k == MISSING for _, k in problems) - 1
    raise DataError(
        f"{source}: feature column '{name}' is missing" + (f" (and {more} more)" if more else "")
    )


@dataclass(frozen=True)
class RowNotes:
    """What a row's score rests on besides its values: imputed features, unseen categories."""

    imputed: tuple[str, ...] = ()
    unseen_categories: tuple[tuple[str, str], ...] = ()  # (feature, value as given)


_INV_SQRT2 = 1.0 / math.sqrt(2.0)


class FoldedModel:
    """The credit model as numpy arrays in float64, for one row at a time.

    Layer 1 of the encoder sees [numeric, embedding_1, ..., embedding_k]; its product with
    each embedding table is precomputed, so a category costs one row lookup.
    """

    def __init__(self, model: CreditModel, num_numeric: int) -> None:
        encoder = model.encoder
        layers = list(encoder.mlp)
        first = layers[0]
        if not isinstance(first, nn.Linear):
            raise CheckpointError(f"cannot fold an encoder that starts with {type(first).__name__}")
        weight = _array(first.weight)
        self.numeric_weight = np.ascontiguousarray(weight[:, :num_numeric].T)
        self.first_bias = _array(first.bias)
        self.category_tables: list[np.ndarray] = []
        offset = num_numeric
        for embedding in embeddings_of(model):
            table = _array(embedding.weight)
            width = table.shape[1]
            self.category_tables.append(table @ weight[:, offset : offset + width].T)
            offset += width
        self.steps = [_step(layer) for layer in [*layers[1:], *_head_layers(model)]]

    def logit(self, numeric: np.ndarray, categorical: np.ndarray) -> float:
        """Logit of default for one encoded row (numeric float32, categorical int64)."""
        hidden = numeric.astype(np.float64) @ self.numeric_weight + self.first_bias
        for table, index in zip(self.category_tables, categorical.tolist(), strict=True):
            hidden += table[index]
        for kind, a, b, eps in self.steps:  # plain ufuncs: numpy's .mean() wrapper costs µs
            if kind == "linear":
                hidden = hidden @ a + b
            elif kind == "layernorm":
                width = hidden.shape[0]
                centred = hidden - np.add.reduce(hidden) / width
                hidden = centred * (a / math.sqrt(float(centred @ centred) / width + eps)) + b
            else:
                hidden = 0.5 * hidden * (1.0 + _erf(hidden * _INV_SQRT2))
        return float(hidden[0])


Step = tuple[str, np.ndarray, np.ndarray, float]


def _array(parameter: torch.Tensor) -> np.ndarray:
    return parameter.detach().cpu().numpy().astype(np.float64)


def _erf(values: np.ndarray) -> np.ndarray:
    return torch.erf(torch.from_numpy(values)).numpy()


def embeddings_of(model: CreditModel) -> list[nn.Embedding]:
    """The encoder's embedding layers, one per categorical feature, in schema order."""
    layers = list(model.encoder.embeddings)
    if not all(isinstance(layer, nn.Embedding) for layer in layers):
        raise CheckpointError("encoder embeddings are not nn.Embedding layers")
    return layers  # type: ignore[return-value]


def _head_layers(model: CreditModel) -> list[nn.Module]:
    layers = model.head.layers
    return list(layers) if isinstance(layers, nn.Sequential) else [layers]


def _step(layer: nn.Module) -> Step:
    """One layer as plain arrays; any layer this fold does not know is refused, not guessed."""
    empty = np.zeros(0)
    if isinstance(layer, nn.Linear):
        bias = _array(layer.bias) if layer.bias is not None else np.zeros(layer.out_features)
        return "linear", np.ascontiguousarray(_array(layer.weight).T), bias, 0.0
    if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) == 1:
        return "layernorm", _array(layer.weight), _array(layer.bias), float(layer.eps)
    if isinstance(layer, nn.GELU) and layer.approximate == "none":
        return "gelu", empty, empty, 0.0
    raise CheckpointError(f"cannot fold model layer {layer!r} for fast scoring")


class Scorer:
    """The bank's model, loaded once: default probabilities for applications."""

    def __init__(
        self, schema: FeatureSchema, model: CreditModel, card: dict[str, Any] | None = None
    ) -> None:
        self.schema = schema
        self.model = model.eval()
        self.card: dict[str, Any] = card or {}  # what is served and why (client/model_choice.py)
        self.feature_names = schema.feature_names
        self._folded = FoldedModel(model, len(schema.numeric))
        self._numeric_names = [f.name for f in schema.numeric]
        self._categorical_names = [c.name for c in schema.categorical]
        self._fill = np.array([f.fill_value for f in schema.numeric], dtype=np.float64)
        self._mean = np.array([f.mean for f in schema.numeric], dtype=np.float64)
        self._std = np.array([f.std for f in schema.numeric], dtype=np.float64)
        self._log = np.array([f.log_transform for f in schema.numeric], dtype=bool)
        self._any_log = bool(self._log.any())
        self._vocab: list[dict[str | None, int]] = [
            {value: i + 1 for i, value in enumerate(c.vocabulary)} for c in schema.categorical
        ]

    @classmethod
    def load(cls, state_dir: Path, encoder_dir: Path) -> "Scorer":
        """The model the bank chose to serve for this global encoder, calibrated; errors name
        the file. Without a choice for it: the encoder with the bank's private head, as is."""
        from fedfin.client.model_choice import served_model

        served = served_model(state_dir, encoder_dir)
        return cls(served.checkpoint.schema, served.model, served.card)

    # --- one application -------------------------------------------------------------

    def encode_one(
        self, application: Mapping[str, object], source: str = "application"
    ) -> tuple[np.ndarray, np.ndarray]:
        """The schema's transform for one row, without pandas for plain values."""
        if not isinstance(application, Mapping):
            raise DataError(f"{source}: expected a mapping of feature name to value")
        check_application_columns(application.keys(), self.schema, source)
        values = np.array(
            [_numeric_value(application[name], name, source) for name in self._numeric_names],
            dtype=np.float64,
        )
        infinite = np.isinf(values)
        if infinite.any():
            name = self._numeric_names[int(np.flatnonzero(infinite)[0])]
            raise DataError(f"{source}: column '{name}' contains Inf")
        missing_values = np.isnan(values)
        if missing_values.any():
            values = np.where(missing_values, self._fill, values)
        if self._any_log:
            values = np.where(self._log, np.sign(values) * np.log1p(np.abs(values)), values)
        z = (values - self._mean) / self._std
        numeric = np.minimum(np.maximum(z, -_Z_CLIP), _Z_CLIP).astype(np.float32)
        categorical = np.array(
            [
                vocab.get(_category_text(application[name]), 0)
                for name, vocab in zip(self._categorical_names, self._vocab, strict=True)
            ],
            dtype=np.int64,
        )
        return numeric, categorical

    def notes_one(self, application: Mapping[str, object]) -> RowNotes:
        """The features of one application that are imputed, and its unseen categories."""
        imputed = tuple(name for name in self.feature_names if _is_missing(application.get(name)))
        unseen = []
        for name, vocab in zip(self._categorical_names, self._vocab, strict=True):
            text = _category_text(application.get(name))
            if text is not None and text not in vocab:
                unseen.append((name, text))
        return RowNotes(imputed, tuple(unseen))

    def logit_one(self, application: Mapping[str, object], source: str = "application") -> float:
        numeric, categorical = self.encode_one(application, source)
        return self._folded.logit(numeric, categorical)

    def score_one(self, application: Mapping[str, object], source: str = "application") -> float:
        """Probability of default for one application (a dict of feature name to value)."""
        return sigmoid(self.logit_one(application, source))

    # --- a table -----------------------------------------------------------------------

    def encode_frame(self, frame: pd.DataFrame, source: str = "applications") -> EncodedTable:
        """The schema's transform, with a column empty in every row imputed, not refused."""
        check_application_columns(frame.columns, self.schema, source)
        if len(frame):
            fills: dict[str, object] = {}
            for feature in self.schema.numeric:
                if frame[feature.name].isna().all():
                    fills[feature.name] = feature.fill_value
            for cat in self.schema.categorical:
                if frame[cat.name].isna().all():
                    fills[cat.name] = _UNSEEN
            if fills:
                frame = frame.assign(**fills)
        return self.schema.transform(frame, source, require_label=False)

    def notes_frame(self, frame: pd.DataFrame) -> list[RowNotes]:
        """`notes_one` for every row of a table (already validated by `encode_frame`)."""
        rows = len(frame)
        imputed: list[list[str]] = [[] for _ in range(rows)]
        unseen: list[list[tuple[str, str]]] = [[] for _ in range(rows)]
        for name in self.feature_names:
            column = frame[name]
            missing = column.isna()
            if column.dtype == object or pd.api.types.is_string_dtype(column):
                missing |= column.astype("string").str.strip().eq("").fillna(False)
            for row in np.flatnonzero(missing.to_numpy(dtype=bool)):
                imputed[row].append(name)
        for name, vocab in zip(self._categorical_names, self._vocab, strict=True):
            text = frame[name].astype("string")
            empty = text.str.strip().eq("").fillna(False)
            known = [v for v in vocab if v is not None]
            new = (text.notna() & ~empty & ~text.isin(known)).to_numpy(dtype=bool)
            for row in np.flatnonzero(new):
                unseen[row].append((name, str(frame[name].iloc[row])))
        return [RowNotes(tuple(i), tuple(u)) for i, u in zip(imputed, unseen, strict=True)]

    def logits_frame(self, frame: pd.DataFrame, source: str = "applications") -> np.ndarray:
        encoded = self.encode_frame(frame, source)
        return self.logits_encoded(encoded)

    def logits_encoded(self, encoded: EncodedTable) -> np.ndarray:
        """Logits of an encoded table, in batches."""
        rows = len(encoded.numeric)
        out = np.empty(rows, dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, rows, BATCH_ROWS):
                stop = start + BATCH_ROWS
                logits = self.model(
                    torch.from_numpy(encoded.numeric[start:stop]),
                    torch.from_numpy(encoded.categorical[start:stop]),
                )
                out[start:stop] = logits.numpy()
        return out

    def score_frame(self, frame: pd.DataFrame, source: str = "applications") -> np.ndarray:
        """Probability of default for every row; the table is validated by the schema first."""
        logits = self.logits_frame(frame, source)
        return 1.0 / (1.0 + np.exp(-logits))


def sigmoid(logit: float) -> float:
    """Probability from log-odds, without overflow for large negative logits."""
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


def _is_missing(value: object) -> bool:
    """None, NaN, pandas' NA, or an empty string: what `score_one` imputes."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _numeric_value(value: object, name: str, source: str) -> float:
    """As `FeatureSchema.transform` reads a numeric column; pandas only for unusual values."""
    if value is None:
        return math.nan
    if type(value) is float or type(value) is int:
        return float(value)
    if isinstance(value, str) and not value.strip():
        return math.nan  # an empty value is missing, as an empty CSV cell is
    return float(_as_numeric(pd.Series([value]), name, source)[0])


def _category_text(value: object) -> str | None:
    """As `FeatureSchema.transform` reads a categorical column: its string form, or missing."""
    if type(value) is str:
        return value if value.strip() else None
    if value is None:
        return None
    text = pd.Series([value]).astype("string").iloc[0]
    return None if pd.isna(text) else str(text)
