"""Population stability index (PSI): how far one distribution of a feature is from another.

PSI = sum over bins of (actual - expected) * ln(actual / expected), with proportions per bin.
A bin empty on either side would make it infinite, so every proportion is floored at
`EMPTY_BIN_EPSILON` (1e-4) before the sum, on both sides, without renormalising. Verdicts
use the usual credit-scoring thresholds: PSI < 0.1 ok, 0.1 <= PSI < 0.25 watch, >= 0.25 act.

Bin rules (one place, used by `common.profile` for the public source and by the bank's own
training reference in `client.drift`): a numeric feature has up to 10 bins cut at the
deciles of the reference's present values (repeated cut points merged, so a feature with a
few distinct values has fewer bins), right-closed, plus one bin for missing values; a
categorical feature has one bin per category of the schema's vocabulary, one for present
values outside it (unseen) and one for missing values. For its PSI the categories are
merged, in vocabulary order, into at most 10 groups of at least a tenth of the reference
each (`categorical_psi`): PSI's sampling noise grows with the bins (about (bins - 1) *
(1/rows + 1/reference rows)), and 35 sub-grades over 300 applications would read as drift.
"""

import math
from collections.abc import Sequence

import numpy as np

EMPTY_BIN_EPSILON = 1e-4
WATCH_PSI = 0.1
ACT_PSI = 0.25
OK, WATCH, ACT = "ok", "watch", "act"
VERDICTS = (OK, WATCH, ACT)
QUANTILE_BINS = 10
UNSEEN_CODE, MISSING_CODE = -1, -2  # category codes of values outside the vocabulary, missing
THRESHOLDS_TEXT = (
    f"PSI < {WATCH_PSI:g} ok, {WATCH_PSI:g} <= PSI < {ACT_PSI:g} watch, PSI >= {ACT_PSI:g} act"
)


def psi(expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray) -> float:
    """PSI of `actual` against `expected`: proportions (or counts) over the same bins."""
    e = _proportions(np.asarray(expected, dtype=np.float64))
    a = _proportions(np.asarray(actual, dtype=np.float64))
    if e.shape != a.shape:
        raise ValueError(f"PSI needs the same bins on both sides, got {e.shape} and {a.shape}")
    e = np.maximum(e, EMPTY_BIN_EPSILON)
    a = np.maximum(a, EMPTY_BIN_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def category_groups(
    reference: Sequence[float] | np.ndarray, bins: int = QUANTILE_BINS
) -> np.ndarray:
    """A group number per category: consecutive categories merged until each group holds at
    least 1/bins of the reference; a last group short of that joins the one before it."""
    shares = np.asarray(reference, dtype=np.float64)
    target = shares.sum() / bins
    groups = np.zeros(len(shares), dtype=np.int64)
    group, held = 0, 0.0
    for i, share in enumerate(shares):
        groups[i] = group
        held += share
        if held >= target and i < len(shares) - 1:
            group, held = group + 1, 0.0
    if len(shares) and held < target and group > 0:
        groups[groups == group] = group - 1
    return groups


def categorical_psi(
    expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray
) -> float:
    """PSI of a categorical feature's bins (categories, then unseen, then missing), with the
    categories merged by `category_groups` of the reference's shares."""
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    groups = category_groups(e[:-2])
    width = int(groups.max()) + 1 if len(groups) else 0

    def merged(values: np.ndarray) -> np.ndarray:
        return np.append(np.bincount(groups, weights=values[:-2], minlength=width), values[-2:])

    return psi(merged(e), merged(a))


def psi_verdict(value: float) -> str:
    """ok / watch / act by the usual PSI thresholds; NaN (no rows yet) is ok."""
    if not math.isfinite(value) or value < WATCH_PSI:
        return OK
    return WATCH if value < ACT_PSI else ACT


def worst(verdicts: Sequence[str]) -> str:
    """The most serious verdict of several (ok when there are none)."""
    return max(verdicts, key=VERDICTS.index, default=OK)


def quantile_edges(values: np.ndarray, bins: int = QUANTILE_BINS) -> tuple[float, ...]:
    """Interior cut points at the reference's quantiles, repeats merged (at most bins - 1)."""
    present = values[~np.isnan(values)]
    if present.size == 0:
        return ()
    cuts = np.quantile(present, np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(cuts)
    edges = edges[edges < present.max()]  # a cut at the maximum would leave its top bin empty
    return tuple(float(e) for e in edges)


def numeric_counts(values: np.ndarray, edges: Sequence[float] | np.ndarray) -> np.ndarray:
    """Counts per bin: len(edges) + 1 right-closed bins of present values, then missing."""
    missing = np.isnan(values)
    present = values[~missing]
    index = np.searchsorted(np.asarray(edges, dtype=np.float64), present, side="left")
    counts = np.bincount(index, minlength=len(edges) + 1).astype(np.int64)
    return np.append(counts, int(missing.sum()))


def categorical_counts(codes: np.ndarray, categories: int) -> np.ndarray:
    """Counts per bin from codes: 0..categories-1 a category, then unseen, then missing."""
    index = np.where(
        codes == UNSEEN_CODE, categories, np.where(codes == MISSING_CODE, categories + 1, codes)
    )
    return np.bincount(index.astype(np.int64), minlength=categories + 2).astype(np.int64)


def _proportions(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)
