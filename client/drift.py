"""Drift while scoring: do the applications, and the scores, still look like training time?

The reference is the bank's own: its non-test rows (the rows it trained, validated and
calibrated on) binned feature by feature (common/profile.py, common/psi.py's bin rule), and
the served model's default probabilities on those rows in decile bins. `fedfin choose-model`
writes it to the bank's state directory (`drift-reference.json`) for the model it chose;
it never leaves the bank. A reference is used only for the model version it was made for.

`DriftMonitor` counts what is scored into the same bins. Its window is every row scored
since it started (since `fedfin serve` started, or the whole `fedfin score` table): PSI over
a growing window settles as rows come, and a slow drift still shows. Below `MIN_ROWS` rows
PSI is mostly sampling noise (about 9 / rows for 10 bins), so verdicts wait until then.
Verdicts use the usual thresholds (PSI < 0.1 ok, < 0.25 watch, else act); each feature
(and the score) warns once when it first reaches watch and once when it reaches act.
"""

import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from fedfin.common.cells import MISSING_WORDS
from fedfin.common.errors import CheckpointError
from fedfin.common.profile import (
    DataProfile,
    NumericProfile,
    category_codes,
    fit_profile,
    numeric_profile,
    numeric_values,
)
from fedfin.common.psi import (
    MISSING_CODE,
    OK,
    THRESHOLDS_TEXT,
    UNSEEN_CODE,
    VERDICTS,
    categorical_counts,
    categorical_psi,
    numeric_counts,
    psi,
    psi_verdict,
    worst,
)

DRIFT_REFERENCE_FILE = "drift-reference.json"
SCORE = "default_probability"  # the score's entry among the features' in a report
MIN_ROWS = 200
WINDOW = "every row scored since the monitor started"
TOO_FEW = "too few rows"
_VERSION = 1

if TYPE_CHECKING:
    from fedfin.client.scoring import Scorer


@dataclass(frozen=True)
class DriftReference:
    """The bank's training-time bins of every feature and of the served model's score."""

    model_version: str
    inputs: DataProfile
    score: NumericProfile

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "model_version": self.model_version,
            "inputs": self.inputs.to_dict(),
            "score": asdict(self.score),
            "kept": "in the bank's state directory; never sent",
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DriftReference":
        if raw.get("version") != _VERSION:
            raise ValueError(f"unsupported drift reference version {raw.get('version')}")
        return cls(
            model_version=str(raw["model_version"]),
            inputs=DataProfile.from_dict(raw["inputs"]),
            score=NumericProfile.from_dict(raw["score"]),
        )


def fit_drift_reference(
    frame: pd.DataFrame,
    probabilities: np.ndarray,
    scorer_schema: Any,
    model_version: str,
    source: str,
) -> DriftReference:
    """Bins of the bank's training rows and of the served model's scores on them."""
    inputs = fit_profile(
        frame, scorer_schema, source, fitted_on=f"{source}: {len(frame)} of the bank's rows"
    )
    score = numeric_profile(SCORE, np.asarray(probabilities, dtype=np.float64))
    return DriftReference(model_version, inputs, score)


def write_drift_reference(
    state_dir: Path, encoder_dir: Path, data_path: Path, test_fraction: float
) -> DriftReference:
    """Score the bank's non-test rows with the model it serves now, and save the reference.

    Called by `choose-model` after it records its choice, so the reference is made with the
    served (calibrated) model; the rows are the same keyed split the bank trained with.
    """
    from fedfin.client.bank_data import load_bank_tables
    from fedfin.client.bank_state import BankState
    from fedfin.client.scoring import Scorer

    scorer = Scorer.load(state_dir, encoder_dir)
    (train, source), _ = load_bank_tables(
        data_path, scorer.schema.label, test_fraction, BankState(state_dir).split_key()
    )
    probabilities = scorer.score_frame(train, source)
    version = str(scorer.card.get("model_version", "unknown"))
    reference = fit_drift_reference(train, probabilities, scorer.schema, version, source)
    from fedfin.common.atomic import write_json_atomically

    write_json_atomically(state_dir / DRIFT_REFERENCE_FILE, reference.to_dict())
    return reference


def load_drift_reference(state_dir: Path, model_version: str) -> tuple[DriftReference | None, str]:
    """The reference for this model version, or None and why there is none."""
    path = state_dir / DRIFT_REFERENCE_FILE
    if not path.exists():
        return None, f"no {DRIFT_REFERENCE_FILE} in {state_dir}: run `fedfin choose-model` first"
    try:
        reference = DriftReference.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a valid drift reference ({exc})") from None
    if reference.model_version != model_version:
        return None, (
            f"{path} was made for another model ({reference.model_version}); run "
            "`fedfin choose-model` again"
        )
    return reference, f"{path} ({reference.inputs.rows} training rows)"


def table_drift(
    state_dir: Path, scorer: "Scorer", frame: pd.DataFrame, probabilities: np.ndarray, source: str
) -> tuple[dict[str, Any] | None, str]:
    """`fedfin score`'s drift report of one scored table, or None and why there is none."""
    version = str(scorer.card.get("model_version", "unknown"))
    reference, note = load_drift_reference(state_dir, version)
    if reference is None:
        return None, note
    monitor = DriftMonitor(reference)
    monitor.add_frame(frame, probabilities, source)
    return {"source": source, **monitor.report()}, note


class DriftMonitor:
    """Running bin counts of scored rows and their PSI against the bank's reference."""

    def __init__(self, reference: DriftReference) -> None:
        self.reference = reference
        inputs = reference.inputs
        self._numeric = [p.name for p in inputs.numeric]
        self._numeric_edges = [np.asarray(p.edges) for p in inputs.numeric]
        self._categorical = [p.name for p in inputs.categorical]
        self._categorical_set = set(self._categorical)
        self._vocab = [{c: i for i, c in enumerate(p.categories)} for p in inputs.categorical]
        self._expected: dict[str, tuple[float, ...]] = {
            p.name: p.proportions for p in inputs.numeric
        }
        self._expected.update({p.name: p.proportions for p in inputs.categorical})
        self._expected[SCORE] = reference.score.proportions
        self._counts = {
            name: np.zeros(len(p), dtype=np.int64) for name, p in self._expected.items()
        }
        self.rows = 0
        self._warned: dict[str, str] = {}
        self._lock = threading.Lock()

    def add_frame(self, frame: pd.DataFrame, probabilities: np.ndarray, source: str) -> None:
        """Count a scored table (already validated by the scorer)."""
        counts = {}
        for name, edges in zip(self._numeric, self._numeric_edges, strict=True):
            counts[name] = numeric_counts(numeric_values(frame, name, source), edges)
        for profile in self.reference.inputs.categorical:
            codes = category_codes(frame[profile.name], profile.categories)
            counts[profile.name] = categorical_counts(codes, len(profile.categories))
        self._add(counts, probabilities, len(frame))

    def add_rows(
        self, rows: Sequence[Mapping[str, object]], probabilities: Sequence[float]
    ) -> None:
        """Count applications as `fedfin serve` parsed them (numbers or None, text or None)."""
        counts = {}
        for name, edges in zip(self._numeric, self._numeric_edges, strict=True):
            values = np.array(
                [math.nan if r.get(name) is None else float(r[name]) for r in rows],  # type: ignore[arg-type]
                dtype=np.float64,
            )
            counts[name] = numeric_counts(values, edges)
        for name, vocab in zip(self._categorical, self._vocab, strict=True):
            codes = np.array([_code(r.get(name), vocab) for r in rows], dtype=np.int64)
            counts[name] = categorical_counts(codes, len(vocab))
        self._add(counts, np.asarray(probabilities, dtype=np.float64), len(rows))

    def _add(self, counts: dict[str, np.ndarray], probabilities: np.ndarray, rows: int) -> None:
        score = numeric_counts(probabilities, self.reference.score.edges)
        with self._lock:
            for name, values in counts.items():
                self._counts[name] += values
            self._counts[SCORE] += score
            self.rows += rows

    def report(self) -> dict[str, Any]:
        """PSI and verdict per feature and for the score; verdicts wait for MIN_ROWS rows."""
        with self._lock:
            counts = {name: c.copy() for name, c in self._counts.items()}
            rows = self.rows
        enough = rows >= MIN_ROWS
        entries: dict[str, dict[str, Any]] = {}
        for name, expected in self._expected.items():
            measure = categorical_psi if name in self._categorical_set else psi
            value = measure(expected, counts[name]) if rows else math.nan
            entries[name] = {
                "psi": value if math.isfinite(value) else None,
                "verdict": psi_verdict(value) if enough else TOO_FEW,
            }
        score = entries.pop(SCORE)
        verdicts = [str(e["verdict"]) for e in entries.values()] + [str(score["verdict"])]
        return {
            "rows": rows,
            "window": WINDOW,
            "min_rows": MIN_ROWS,
            "verdict": worst(verdicts) if enough else TOO_FEW,
            "thresholds": THRESHOLDS_TEXT,
            "score": score,
            "features": entries,
            "reference": {
                "model_version": self.reference.model_version,
                "rows": self.reference.inputs.rows,
                "fitted_on": self.reference.inputs.fitted_on,
            },
        }

    def new_warnings(self) -> list[str]:
        """One line for each feature (or the score) that reached watch or act since the last
        call; each level of each is said once, however many rows keep it there."""
        report = self.report()
        if report["rows"] < MIN_ROWS:
            return []
        lines = []
        items = [(SCORE, report["score"]), *report["features"].items()]
        with self._lock:
            for name, entry in items:
                verdict = entry["verdict"]
                said = self._warned.get(name, OK)
                if VERDICTS.index(verdict) > VERDICTS.index(said):
                    self._warned[name] = verdict
                    what = "the score distribution" if name == SCORE else f"feature '{name}'"
                    lines.append(
                        f"drift: {what} reached {verdict.upper()} (PSI {entry['psi']:.3f} over "
                        f"{report['rows']} rows against the bank's training reference; "
                        f"{THRESHOLDS_TEXT})"
                    )
        return lines


def drift_summary(report: dict[str, Any], count: int = 3) -> list[str]:
    """Lines for people: the overall verdict, the score's PSI and the worst features."""
    rows = report["rows"]
    score = report["score"]
    head = (
        f"drift against the bank's training reference ({report['reference']['rows']} rows): "
        f"{report['verdict'].upper() if report['verdict'] != TOO_FEW else TOO_FEW} over {rows} "
        f"rows; score PSI {_psi_text(score['psi'])} ({score['verdict']})"
    )
    ranked = sorted(
        report["features"].items(), key=lambda item: item[1]["psi"] or 0.0, reverse=True
    )
    worst_lines = [
        f"  {name}: PSI {_psi_text(entry['psi'])} ({entry['verdict']})"
        for name, entry in ranked[:count]
    ]
    notes = []
    if rows < MIN_ROWS:
        notes.append(f"  fewer than {MIN_ROWS} rows: PSI is mostly sampling noise, no verdict")
    notes.append(f"  {THRESHOLDS_TEXT}; window: {WINDOW}")
    return [head, "  highest input PSI:", *worst_lines, *notes]


def _psi_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _code(value: object, vocab: Mapping[str, int]) -> int:
    if value is None:
        return MISSING_CODE
    text = str(value).strip()
    if text in vocab:
        return vocab[text]
    return MISSING_CODE if text in MISSING_WORDS else UNSEEN_CODE
