"""Why a bank's model gave a score: integrated gradients, per feature name of the bank's data.

Attributions are in log-odds of default (the model's logit), where integrated gradients is
complete: a row's attributions add up to logit(application) - logit(reference), up to the
error of the path integral, which captum reports as the convergence delta.

The reference applicant is the application with every value missing: public medians for
numeric features and the unknown category for categoricals, which is what the model sees
when nothing is known (`Scorer.score_one` of all-None values). A positive attribution
raises the default risk above that reference; the largest ones are the reasons a score is
high. Categoricals enter the model through embeddings, so attributions are computed on the
embedded input and each categorical's embedding dimensions are summed into one number.

Reason codes name the features that push a score towards default most, for adverse-action
notices and for `fedfin score`/`serve`: a numeric feature as `<name>_high` or `<name>_low`
(its value above or below the reference applicant's public median), a categorical one by its
name (e.g. `int_rate_high`, `sub_grade`). They are stable: the same application gets the
same codes, and the set of codes is fixed by the schema.

Everything runs in float64 on a private copy of the model, inside the bank, offline.
"""

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from fedfin.client.scoring import Scorer, embeddings_of, sigmoid
from fedfin.common.atomic import write_atomically
from fedfin.common.errors import ConfigError
from fedfin.common.model import CreditModel

DEFAULT_STEPS = 32  # Gauss-Legendre: |convergence delta| about 1e-8 on Lending Club
DEFAULT_SAMPLE = 500
REASON_CODES = 4  # as many as a US adverse-action notice lists
_REASON_CHUNK = 4096  # rows per integrated-gradients batch when coding a whole table
_NO_PUSH = 1e-9  # an attribution this small does not push the score anywhere
SPACE = "log-odds of default"


@dataclass(frozen=True)
class Explanation:
    """One application's attributions, in log-odds, one per feature name."""

    features: tuple[str, ...]
    values: tuple[object, ...]  # as given in the application
    attributions: np.ndarray  # float64, (features,)
    logit: float
    reference_logit: float
    convergence_delta: float  # sum(attributions) - (logit - reference_logit)
    reason_codes: tuple[str, ...] = ()  # the top pushes towards default, as stable codes

    @property
    def probability(self) -> float:
        return sigmoid(self.logit)

    @property
    def reference_probability(self) -> float:
        return sigmoid(self.reference_logit)

    def ranked(self) -> list[tuple[str, object, float]]:
        """(feature, value, attribution), from the largest push towards default downwards."""
        order = np.argsort(-self.attributions, kind="stable")
        return [(self.features[i], self.values[i], float(self.attributions[i])) for i in order]

    def top_reasons(self, count: int) -> list[tuple[str, object, float]]:
        """The features that raise this application's risk most: why its score is high."""
        return [row for row in self.ranked() if row[2] > 0][:count]


@dataclass(frozen=True)
class FeatureImportance:
    """The bank model's global view: mean |attribution| over a seeded sample of its data."""

    features: tuple[str, ...]
    mean_abs: np.ndarray  # float64, (features,)
    mean: np.ndarray  # signed mean: on average raises (+) or lowers (-) risk
    rows: int
    seed: int
    max_convergence_delta: float

    def ranked(self) -> list[tuple[str, float, float]]:
        order = np.argsort(-self.mean_abs, kind="stable")
        return [(self.features[i], float(self.mean_abs[i]), float(self.mean[i])) for i in order]


class _FromEmbedded(nn.Module):
    """The model after its embedding lookups: [numeric, embeddings...] -> logit."""

    def __init__(self, model: CreditModel) -> None:
        super().__init__()
        self.mlp = model.encoder.mlp
        self.head = model.head

    def forward(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(embedded))


class Explainer:
    """Integrated gradients (captum) through the bank's encoder and private head."""

    def __init__(self, scorer: Scorer, steps: int = DEFAULT_STEPS) -> None:
        from captum.attr import IntegratedGradients  # imported here: it takes seconds

        if steps < 2:
            raise ConfigError(f"integrated gradients needs at least 2 steps, got {steps}")
        self.scorer = scorer
        self.features = scorer.feature_names
        self.steps = steps
        model = copy.deepcopy(scorer.model).double().eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self._embeddings = embeddings_of(model)
        self._forward = _FromEmbedded(model)
        self._ig = IntegratedGradients(self._forward)
        self._groups = self._feature_groups()
        missing = dict.fromkeys(self.features)
        numeric, categorical = scorer.encode_one(missing, "reference applicant")
        self._reference = self._embed(numeric[None, :], categorical[None, :])
        self._reference_numeric = numeric.astype(np.float64)

    def _feature_groups(self) -> torch.Tensor:
        """(embedded width, features): which embedded columns belong to which feature."""
        schema = self.scorer.schema
        widths = [1] * len(schema.numeric) + [e.embedding_dim for e in self._embeddings]
        groups = torch.zeros(sum(widths), len(widths), dtype=torch.float64)
        start = 0
        for feature, width in enumerate(widths):
            groups[start : start + width, feature] = 1.0
            start += width
        return groups

    def _embed(self, numeric: np.ndarray, categorical: np.ndarray) -> torch.Tensor:
        cat = torch.from_numpy(np.ascontiguousarray(categorical))
        parts = [torch.from_numpy(numeric.astype(np.float64))]
        parts += [embedding(cat[:, j]) for j, embedding in enumerate(self._embeddings)]
        return torch.cat(parts, dim=1)

    def attribute(
        self, numeric: np.ndarray, categorical: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-feature attributions (rows, features), logits (rows,), convergence deltas."""
        inputs = self._embed(numeric, categorical)
        baselines = self._reference.expand_as(inputs)
        with torch.no_grad():
            logits = self._forward(inputs).numpy()
        attributions, delta = self._ig.attribute(
            inputs,
            baselines=baselines,
            n_steps=self.steps,
            method="gausslegendre",
            internal_batch_size=max(self.steps, 16_384),
            return_convergence_delta=True,
        )
        per_feature = (attributions.detach() @ self._groups).numpy()
        return per_feature, logits, delta.detach().numpy()

    def codes_of(self, attributions: np.ndarray, numeric: np.ndarray, count: int) -> list[str]:
        """Up to `count` reason codes: the features raising this row's risk most, largest first."""
        codes: list[str] = []
        numeric_count = len(self._reference_numeric)
        for j in np.argsort(-attributions, kind="stable")[:count].tolist():
            if attributions[j] <= _NO_PUSH:
                break
            name = self.features[j]
            if j < numeric_count:
                side = "high" if numeric[j] > self._reference_numeric[j] else "low"
                name = f"{name}_{side}"
            codes.append(name)
        return codes

    def reason_codes(
        self, numeric: np.ndarray, categorical: np.ndarray, count: int = REASON_CODES
    ) -> list[list[str]]:
        """Reason codes of every encoded row, in batches of integrated gradients."""
        out: list[list[str]] = []
        for start in range(0, len(numeric), _REASON_CHUNK):
            stop = start + _REASON_CHUNK
            attributions, _, _ = self.attribute(numeric[start:stop], categorical[start:stop])
            out += [
                self.codes_of(row, numeric[start + i], count) for i, row in enumerate(attributions)
            ]
        return out

    @property
    def reference_logit(self) -> float:
        with torch.no_grad():
            return float(self._forward(self._reference)[0])

    def explain_one(
        self, application: Mapping[str, object], source: str = "application"
    ) -> Explanation:
        """Attributions for one application (a dict), validated as `Scorer.score_one` does."""
        numeric, categorical = self.scorer.encode_one(application, source)
        values = tuple(application[name] for name in self.features)
        return self._explanations(numeric[None, :], categorical[None, :], [values])[0]

    def explain_rows(
        self, frame: pd.DataFrame, rows: Sequence[int], source: str = "applications"
    ) -> list[Explanation]:
        """Attributions for rows of a table (positions, 0-based); the whole table is validated."""
        for row in rows:
            if not 0 <= row < len(frame):
                raise ConfigError(f"{source}: row {row} does not exist ({len(frame)} rows)")
        encoded = self.scorer.encode_frame(frame, source)
        index = np.asarray(rows, dtype=np.int64)
        values = [tuple(frame.iloc[row][name] for name in self.features) for row in index.tolist()]
        return self._explanations(encoded.numeric[index], encoded.categorical[index], values)

    def _explanations(
        self, numeric: np.ndarray, categorical: np.ndarray, values: list[tuple[object, ...]]
    ) -> list[Explanation]:
        attributions, logits, deltas = self.attribute(numeric, categorical)
        reference = self.reference_logit
        return [
            Explanation(
                features=self.features,
                values=row_values,
                attributions=attributions[i],
                logit=float(logits[i]),
                reference_logit=reference,
                convergence_delta=float(deltas[i]),
                reason_codes=tuple(self.codes_of(attributions[i], numeric[i], REASON_CODES)),
            )
            for i, row_values in enumerate(values)
        ]

    def global_importance(
        self,
        frame: pd.DataFrame,
        sample: int = DEFAULT_SAMPLE,
        seed: int = 0,
        source: str = "bank data",
    ) -> FeatureImportance:
        """Mean |attribution| per feature over a seeded sample of the bank's rows."""
        if sample <= 0:
            raise ConfigError(f"global importance sample must be positive, got {sample}")
        encoded = self.scorer.schema.transform(frame, source, require_label=False)
        rows = len(encoded.numeric)
        chosen = np.sort(
            np.random.default_rng(seed).choice(rows, size=min(sample, rows), replace=False)
        )
        attributions, _, deltas = self.attribute(
            encoded.numeric[chosen], encoded.categorical[chosen]
        )
        return FeatureImportance(
            features=self.features,
            mean_abs=np.abs(attributions).mean(axis=0),
            mean=attributions.mean(axis=0),
            rows=len(chosen),
            seed=seed,
            max_convergence_delta=float(np.abs(deltas).max()),
        )


# --- for people: tables and charts -------------------------------------------------------


def format_value(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "(missing)"
    if isinstance(value, float | np.floating):
        return f"{float(value):.6g}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def reasons_table(explanation: Explanation, count: int) -> str:
    """The top reasons a score is high, for a credit officer."""
    header = ("rank", "feature", "value", "log-odds", "effect")
    reasons = explanation.top_reasons(count)
    rows = [
        (str(rank), name, format_value(value), f"{attribution:+.4f}", "raises risk")
        for rank, (name, value, attribution) in enumerate(reasons, start=1)
    ]
    lowering = [row for row in reversed(explanation.ranked()) if row[2] < 0][:3]
    lines = [
        f"default probability {explanation.probability:.4f} "
        f"(reference applicant {explanation.reference_probability:.4f})",
        _table(header, rows) if rows else "no feature raises the risk above the reference",
    ]
    if lowering:
        lines.append(
            "lowering the risk most: "
            + ", ".join(f"{name} = {format_value(v)} ({a:+.4f})" for name, v, a in lowering)
        )
    lines.append(
        f"attributions in {SPACE} (integrated gradients from the reference applicant: public "
        f"medians, unknown categories); convergence delta {explanation.convergence_delta:.2e}"
    )
    return "\n".join(lines)


def importance_table(importance: FeatureImportance) -> str:
    header = ("rank", "feature", "mean |log-odds|", "mean log-odds")
    rows = [
        (str(rank), name, f"{mean_abs:.4f}", f"{mean:+.4f}")
        for rank, (name, mean_abs, mean) in enumerate(importance.ranked(), start=1)
    ]
    return (
        _table(header, rows)
        + f"\nover {importance.rows} rows (seed {importance.seed}); max convergence delta "
        f"{importance.max_convergence_delta:.2e}"
    )


def explanation_frame(explanation: Explanation) -> pd.DataFrame:
    ranked = explanation.ranked()
    return pd.DataFrame(
        {
            "feature": [r[0] for r in ranked],
            "value": [format_value(r[1]) for r in ranked],
            "attribution_log_odds": [r[2] for r in ranked],
        }
    )


def importance_frame(importance: FeatureImportance) -> pd.DataFrame:
    ranked = importance.ranked()
    return pd.DataFrame(
        {
            "feature": [r[0] for r in ranked],
            "mean_abs_attribution_log_odds": [r[1] for r in ranked],
            "mean_attribution_log_odds": [r[2] for r in ranked],
        }
    )


def write_explanation_chart(path: Path, explanation: Explanation, count: int = 12) -> None:
    """Horizontal bars: the features that move this score most, red up, blue down."""
    ranked = sorted(explanation.ranked(), key=lambda r: abs(r[2]), reverse=True)[:count]
    ranked.reverse()
    labels = [f"{name} = {format_value(value)}" for name, value, _ in ranked]
    values = [a for _, _, a in ranked]
    title = (
        f"Default probability {explanation.probability:.1%} "
        f"(reference applicant {explanation.reference_probability:.1%})"
    )
    xlabel = f"contribution to {SPACE} (red raises the risk, blue lowers it)"
    _bar_chart(path, labels, values, title, xlabel, signed=True)


def write_importance_chart(path: Path, importance: FeatureImportance) -> None:
    ranked = list(reversed(importance.ranked()))
    _bar_chart(
        path,
        [name for name, _, _ in ranked],
        [mean_abs for _, mean_abs, _ in ranked],
        f"What drives this bank's model (mean |attribution| over {importance.rows} rows)",
        f"mean |contribution to {SPACE}|",
        signed=False,
    )


def _bar_chart(
    path: Path, labels: list[str], values: list[float], title: str, xlabel: str, signed: bool
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 0.9 + 0.32 * max(len(labels), 1)))
    colours = ["#c0392b" if v > 0 else "#2e86c1" for v in values] if signed else "#5d6d7e"
    axes.barh(range(len(values)), values, color=colours)
    axes.set_yticks(range(len(labels)), labels, fontsize="small")
    axes.axvline(0.0, color="black", linewidth=0.8)
    axes.set_xlabel(xlabel)
    axes.set_title(title, fontsize="medium")
    figure.tight_layout()

    def save(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=110)

    try:
        write_atomically(path, save)
    finally:
        plt.close(figure)
