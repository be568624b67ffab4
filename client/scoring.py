"""Score applications inside the bank with the shared encoder and the bank's private head.

`Scorer.load` reads the model once. `score_frame` validates a table with the schema (the
same `FeatureSchema.transform` used in training) and runs the torch model in batches.
`score_one` is the real-time path for one application: the schema's per-column pandas work
costs milliseconds for one row, so the schema's statistics are precomputed into plain
arrays and dicts, and the model is folded into a few numpy matmuls (each categorical's
embedding is multiplied into the first layer ahead of time). Both paths give the same
probability to 1e-6 (tests/test_scoring.py). Nothing here opens a network connection.

One difference in validation is deliberate: a missing value (None/NaN) in one application
is imputed exactly as it would be in a batch (public median, unknown category), so a row's
score never depends on the rows scored with it. `FeatureSchema.validate` rejects a column
that is missing in every row, which for a one-row table would reject any missing value.
"""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from common.errors import CheckpointError, DataError
from common.model import CreditModel
from common.schema import _Z_CLIP, FeatureSchema, _as_numeric

BATCH_ROWS = 65_536
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
        from client.model_choice import served_model

        served = served_model(state_dir, encoder_dir)
        return cls(served.checkpoint.schema, served.model, served.card)

    # --- one application -------------------------------------------------------------

    def encode_one(
        self, application: Mapping[str, object], source: str = "application"
    ) -> tuple[np.ndarray, np.ndarray]:
        """The schema's transform for one row, without pandas for plain values."""
        if not isinstance(application, Mapping):
            raise DataError(f"{source}: expected a mapping of feature name to value")
        missing = [name for name in self.feature_names if name not in application]
        if missing:
            raise DataError(
                f"{source}: feature column '{missing[0]}' is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
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

    def logit_one(self, application: Mapping[str, object], source: str = "application") -> float:
        numeric, categorical = self.encode_one(application, source)
        return self._folded.logit(numeric, categorical)

    def score_one(self, application: Mapping[str, object], source: str = "application") -> float:
        """Probability of default for one application (a dict of feature name to value)."""
        return sigmoid(self.logit_one(application, source))

    # --- a table -----------------------------------------------------------------------

    def logits_frame(self, frame: pd.DataFrame, source: str = "applications") -> np.ndarray:
        encoded = self.schema.transform(frame, source, require_label=False)
        out = np.empty(len(frame), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(frame), BATCH_ROWS):
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


def _numeric_value(value: object, name: str, source: str) -> float:
    """As `FeatureSchema.transform` reads a numeric column; pandas only for unusual values."""
    if value is None:
        return math.nan
    if type(value) is float or type(value) is int:
        return float(value)
    return float(_as_numeric(pd.Series([value]), name, source)[0])


def _category_text(value: object) -> str | None:
    """As `FeatureSchema.transform` reads a categorical column: its string form, or missing."""
    if type(value) is str:
        return value
    if value is None:
        return None
    text = pd.Series([value]).astype("string").iloc[0]
    return None if pd.isna(text) else str(text)
