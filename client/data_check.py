"""`fedfin check-data`: how far a bank's table is from the public data the encoder learnt from.

Run inside the bank before any budget is spent: per feature the missing rate, the share of
values out of the public range (outside the public rows' 0.5%-99.5% quantiles), the share of
categories the public vocabulary lacks (unseen), and the PSI against the public profile
(common/psi.py: decile bins, empty bins floored at 1e-4); the label rate if the label is
there. Each feature gets a verdict: its PSI's (< 0.1 ok, < 0.25 watch, else act), raised to
watch when 5% or more of its values are out of range or unseen and to act at 25% or more.
The table's verdict is its worst feature's. The result stays in the bank: printed, written
as JSON and PNG to a directory the bank names; nothing is sent and nothing is charged.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedfin.common.errors import DataError
from fedfin.common.profile import (
    CategoricalProfile,
    DataProfile,
    NumericProfile,
    category_codes,
    numeric_values,
)
from fedfin.common.psi import (
    ACT,
    MISSING_CODE,
    OK,
    THRESHOLDS_TEXT,
    UNSEEN_CODE,
    VERDICTS,
    WATCH,
    categorical_counts,
    categorical_psi,
    numeric_counts,
    psi,
    psi_verdict,
    worst,
)
from fedfin.common.schema import FeatureSchema

SHARE_WATCH = 0.05  # out-of-range or unseen share that makes a feature at least "watch"
SHARE_ACT = 0.25  # ... and "act"
MIN_ROWS = 200  # below this, PSI of 10 bins is mostly sampling noise (about 9 / rows)
RULES_TEXT = (
    f"verdict per feature: {THRESHOLDS_TEXT}; raised to watch when >= {SHARE_WATCH:.0%} of "
    f"values are out of the public range (outside its 0.5%-99.5% quantiles) or unseen "
    f"categories, to act at >= {SHARE_ACT:.0%}; overall: the worst feature's"
)
CHECK_JSON = "data-check.json"
CHECK_PLOT = "data-check.png"


@dataclass(frozen=True)
class FeatureCheck:
    """One feature of the bank's table against the public profile."""

    name: str
    kind: str  # "numeric" or "categorical"
    missing_rate: float
    public_missing_rate: float
    out_of_range: float | None  # numeric: share of present values outside the public range
    unseen: float | None  # categorical: share of rows with a category the vocabulary lacks
    psi: float
    verdict: str
    why: str  # what set the verdict, for people


@dataclass(frozen=True)
class DataCheck:
    """The whole table: per-feature checks, label rates and the overall verdict."""

    source: str
    encoder: str
    rows: int
    label: str | None
    label_rate: float | None
    public_label_rate: float | None
    public_rows: int
    features: tuple[FeatureCheck, ...]

    @property
    def verdict(self) -> str:
        return worst([f.verdict for f in self.features])

    def worst_features(self, count: int = 3) -> list[FeatureCheck]:
        """The features to look at first: most serious verdict, then highest PSI."""
        flagged = [f for f in self.features if f.verdict != OK]
        flagged.sort(key=lambda f: (VERDICTS.index(f.verdict), f.psi), reverse=True)
        return flagged[:count]

    def summary_line(self) -> str:
        """One line: the verdict and the worst features (what simulate and the runner log)."""
        flagged = self.worst_features()
        detail = (
            "; worst: " + ", ".join(f"{f.name} {f.verdict} ({f.why})" for f in flagged)
            if flagged
            else "; every feature ok"
        )
        label = (
            f"; label rate {self.label_rate:.4f} (public {self.public_label_rate:.4f})"
            if self.label_rate is not None and self.public_label_rate is not None
            else ""
        )
        return f"data check {self.verdict.upper()}: {self.rows} rows{detail}{label}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "encoder": self.encoder,
            "rows": self.rows,
            "verdict": self.verdict,
            "rules": RULES_TEXT,
            "few_rows": self.rows < MIN_ROWS,
            "label": self.label,
            "label_rate": self.label_rate,
            "public_label_rate": self.public_label_rate,
            "public_rows": self.public_rows,
            "features": [_finite(asdict(f)) for f in self.features],
            "sent": "nothing: this check ran inside the bank and released nothing",
        }


def check_frame(
    frame: pd.DataFrame,
    schema: FeatureSchema,
    profile: DataProfile,
    source: str,
    encoder: str = "",
    label: str | None = None,
) -> DataCheck:
    """Check every feature of `frame` against the public `profile`; bad cells are a DataError.

    A feature column that is absent is an error; one that is entirely empty is reported
    (missing rate 100%, act), since saying so is the point of the check.
    """
    if frame.empty:
        raise DataError(f"{source}: table has no rows")
    absent = [n for n in schema.feature_names if n not in frame.columns]
    if absent:
        raise DataError(
            f"{source}: feature column '{absent[0]}' is missing"
            + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
        )
    checks = [_numeric_check(frame, p, source) for p in profile.numeric]
    checks += [_categorical_check(frame, p) for p in profile.categorical]
    label_rate = None
    if label is not None and label in frame.columns:
        label_rate = float(schema.encode_label(frame[label], source).mean())
    return DataCheck(
        source=source,
        encoder=encoder,
        rows=len(frame),
        label=label if label_rate is not None else None,
        label_rate=label_rate,
        public_label_rate=profile.label_rate,
        public_rows=profile.rows,
        features=tuple(checks),
    )


def _numeric_check(frame: pd.DataFrame, profile: NumericProfile, source: str) -> FeatureCheck:
    values = numeric_values(frame, profile.name, source)
    if np.isinf(values).any():
        raise DataError(f"{source}: column '{profile.name}' contains Inf")
    counts = numeric_counts(values, profile.edges)
    present = values[~np.isnan(values)]
    outside = (
        float(np.mean((present < profile.low) | (present > profile.high))) if present.size else 0.0
    )
    value = psi(profile.proportions, counts)
    verdict, why = _verdict(value, outside, "out of range")
    return FeatureCheck(
        name=profile.name,
        kind="numeric",
        missing_rate=float(np.isnan(values).mean()),
        public_missing_rate=profile.missing_rate,
        out_of_range=outside,
        unseen=None,
        psi=value,
        verdict=verdict,
        why=why,
    )


def _categorical_check(frame: pd.DataFrame, profile: CategoricalProfile) -> FeatureCheck:
    codes = category_codes(frame[profile.name], profile.categories)
    counts = categorical_counts(codes, len(profile.categories))
    unseen = float(np.mean(codes == UNSEEN_CODE))
    value = categorical_psi(profile.proportions, counts)
    verdict, why = _verdict(value, unseen, "unseen")
    return FeatureCheck(
        name=profile.name,
        kind="categorical",
        missing_rate=float(np.mean(codes == MISSING_CODE)),
        public_missing_rate=profile.missing_rate,
        out_of_range=None,
        unseen=unseen,
        psi=value,
        verdict=verdict,
        why=why,
    )


def _verdict(value: float, share: float, what: str) -> tuple[str, str]:
    """PSI's verdict, raised by the share of values out of range or unseen."""
    by_psi = psi_verdict(value)
    by_share = ACT if share >= SHARE_ACT else WATCH if share >= SHARE_WATCH else OK
    verdict = worst([by_psi, by_share])
    why = f"PSI {value:.3f}"
    if by_share != OK and VERDICTS.index(by_share) >= VERDICTS.index(by_psi):
        why = f"{share:.1%} {what}, PSI {value:.3f}"
    return verdict, why


# --- for people -----------------------------------------------------------------------------


def check_table(check: DataCheck) -> str:
    """The per-feature table `fedfin check-data` prints, then the verdict and the rules."""
    header = ("feature", "kind", "missing", "public", "out of range", "unseen", "PSI", "verdict")
    rows = [
        (
            f.name,
            f.kind,
            f"{f.missing_rate:.1%}",
            f"{f.public_missing_rate:.1%}",
            "" if f.out_of_range is None else f"{f.out_of_range:.1%}",
            "" if f.unseen is None else f"{f.unseen:.1%}",
            f"{f.psi:.3f}",
            f.verdict,
        )
        for f in check.features
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    if check.label_rate is not None and check.public_label_rate is not None:
        lines.append(
            f"label '{check.label}': default rate {check.label_rate:.4f} here, "
            f"{check.public_label_rate:.4f} in the public rows"
        )
    if check.rows < MIN_ROWS:
        lines.append(
            f"note: only {check.rows} rows; PSI over 10 bins carries sampling noise of about "
            f"{9 / check.rows:.2f} here, so small PSIs mean little"
        )
    lines.append(f"{check.summary_line()} (against {check.public_rows} public rows)")
    lines.append(RULES_TEXT)
    return "\n".join(lines)


def write_check_plot(path: Path, check: DataCheck) -> None:
    """PSI per feature as bars coloured by verdict, with the 0.1 and 0.25 lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedfin.common.atomic import write_atomically
    from fedfin.common.psi import ACT_PSI, WATCH_PSI

    colours = {OK: "tab:green", WATCH: "tab:orange", ACT: "tab:red"}
    features = sorted(check.features, key=lambda f: f.psi)
    height = max(3.0, 0.28 * len(features) + 1.2)
    figure, axes = plt.subplots(figsize=(7, height))
    shown = [min(f.psi, 2.0) for f in features]  # a huge PSI would flatten every other bar
    axes.barh([f.name for f in features], shown, color=[colours[f.verdict] for f in features])
    for limit, style in ((WATCH_PSI, ":"), (ACT_PSI, "--")):
        axes.axvline(limit, color="grey", linestyle=style, linewidth=0.9)
    for y, f in enumerate(features):
        if f.verdict != OK:
            axes.text(shown[y], y, f" {f.verdict} ({f.why})", va="center", fontsize="x-small")
    axes.set_xlabel("PSI against the public profile (bars capped at 2)")
    axes.set_title(
        f"{Path(check.source).name}: data check {check.verdict.upper()}, {check.rows} rows\n"
        f"lines at PSI {WATCH_PSI:g} (watch) and {ACT_PSI:g} (act); colour = verdict",
        fontsize="medium",
    )
    axes.set_xlim(0, max(max(shown, default=0.0) * 1.6, ACT_PSI * 1.6))
    figure.tight_layout()

    def save(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=110)

    write_atomically(path, save)
    plt.close(figure)


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
    }


def read_bank_table(path: Path) -> tuple[pd.DataFrame, str]:
    """A CSV/Parquet file, or a bank's data directory (its train and test tables together)."""
    from fedfin.client.bank_data import _find
    from fedfin.common.tables import read_table

    if path.is_dir():
        train, test = _find(path, "train"), _find(path, "test")
        return pd.concat([read_table(train), read_table(test)], ignore_index=True), str(path)
    return read_table(path), str(path)


def check_bank_data(encoder_dir: Path, data_path: Path, label: str | None = None) -> DataCheck:
    """Read the bank's data and the encoder's schema and public profile, and check one against
    the other. `label` None means the schema's label column, used only if it is there."""
    from fedfin.common.checkpoint import load_encoder_checkpoint
    from fedfin.common.profile import load_public_profile

    schema = load_encoder_checkpoint(encoder_dir).schema
    profile = load_public_profile(encoder_dir, schema)
    frame, source = read_bank_table(data_path)
    if label is not None and label not in frame.columns:
        raise DataError(f"{source}: --label column '{label}' is missing")
    return check_frame(frame, schema, profile, source, str(encoder_dir), label or schema.label)
