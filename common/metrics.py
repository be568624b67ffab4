"""Credit-risk metrics: discrimination (AUC with its confidence interval, KS) and
calibration (log-loss, Brier, a reliability table).

Plain numpy rather than scikit-learn: every Flower message starts a fresh ClientApp
process, and importing scikit-learn there cost about a second per evaluation.
Tests check these against scikit-learn's implementations (neither scikit-learn nor scipy
has an AUC confidence interval; DeLong's is checked against its pairwise definition).
"""

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (as in the Mann-Whitney U statistic)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)] - 1
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = (first[group] + last[group]) / 2.0 + 1.0
    return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    ranks = _average_ranks(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_confidence_interval(
    labels: np.ndarray, scores: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """DeLong's two-sided confidence interval for the AUC, clipped to [0, 1].

    The AUC's variance comes from its structural components (each defaulter's share of
    non-defaulters ranked below it, and the reverse), ties counted as half (DeLong, DeLong
    and Clarke-Pearson 1988; midrank form of Sun and Xu 2014). NaN, NaN with one class only.
    """
    y = np.asarray(labels) == 1
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    auc, v_pos, v_neg = _delong_components(y, s)
    variance = (np.var(v_pos, ddof=1) if n_pos > 1 else 0.0) / n_pos + (
        np.var(v_neg, ddof=1) if n_neg > 1 else 0.0
    ) / n_neg
    z = NormalDist().inv_cdf(0.5 + level / 2)
    half = z * float(np.sqrt(variance))
    return max(0.0, float(auc) - half), min(1.0, float(auc) + half)


def _delong_components(y: np.ndarray, s: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUC and DeLong's structural components: per defaulter, the share of non-defaulters
    scored below it; per non-defaulter, the share of defaulters scored above it (ties half)."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    ranks = _average_ranks(s)
    auc = (ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    v_pos = (ranks[y] - _average_ranks(s[y])) / n_neg
    v_neg = 1.0 - (ranks[~y] - _average_ranks(s[~y])) / n_pos
    return float(auc), v_pos, v_neg


def paired_auc_difference(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray
) -> tuple[float, float]:
    """AUC(b) - AUC(a) on the same rows and DeLong's standard error of that difference.

    The two AUCs share their rows, so their errors are correlated: the variance of the
    difference uses the covariance of the structural components (DeLong et al. 1988).
    NaN, NaN with one class only.
    """
    y = np.asarray(labels) == 1
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos < 2 or n_neg < 2:
        return float("nan"), float("nan")
    auc_a, pos_a, neg_a = _delong_components(y, np.asarray(scores_a, dtype=np.float64))
    auc_b, pos_b, neg_b = _delong_components(y, np.asarray(scores_b, dtype=np.float64))
    variance = (
        float(np.var(pos_b - pos_a, ddof=1)) / n_pos + float(np.var(neg_b - neg_a, ddof=1)) / n_neg
    )
    return auc_b - auc_a, float(np.sqrt(max(0.0, variance)))


def ks_statistic(labels: np.ndarray, scores: np.ndarray) -> float:
    """Largest gap between the score distributions of defaulters and non-defaulters."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    cut = np.r_[s[1:] != s[:-1], True]  # evaluate only after the last of tied scores
    tpr = np.cumsum(y)[cut] / y.sum()
    fpr = np.cumsum(1 - y)[cut] / (1 - y).sum()
    return float(np.max(np.abs(tpr - fpr)))


def credit_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC (and its 95% DeLong interval), KS, log-loss, Brier, the number of rows and of
    defaults, the mean predicted probability and the observed default rate.

    AUC, its interval and KS are NaN when only one class is present. Exact counts: for a
    bank's own report only, never for a reply.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    both_classes = 0 < y.sum() < len(y)
    auc = roc_auc(y, p) if both_classes else float("nan")
    low, high = auc_confidence_interval(y, p) if both_classes else (float("nan"), float("nan"))
    ks = ks_statistic(y, p) if both_classes else float("nan")
    return {
        "auc": auc,
        "auc-ci-low": low,
        "auc-ci-high": high,
        "ks": ks,
        "log-loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "brier": float(np.mean((p - y) ** 2)),
        "rows": float(len(y)),
        "defaults": float(y.sum()),
        "mean-pd": float(np.mean(p)) if len(p) else float("nan"),
        "default-rate": float(np.mean(y)) if len(y) else float("nan"),
    }


@dataclass(frozen=True)
class ReliabilityBin:
    """Rows whose predicted default probability fell in [low, high]: predicted against observed."""

    low: float
    high: float
    rows: int
    defaults: int
    mean_pd: float
    observed_rate: float


def reliability_table(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = 10
) -> list[ReliabilityBin]:
    """Equal-count bins of predicted probability (rows sorted by it, then cut into `bins`).

    Equal counts, not equal widths: with a 5% default rate nearly every row has a predicted
    probability under 0.1, so fixed-width bins would put almost all of them in one. Every
    row lands in exactly one bin, so the counts add up to the rows.
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    order = np.argsort(p, kind="mergesort")
    table = []
    for chunk in np.array_split(order, min(bins, len(p))):
        if len(chunk) == 0:
            continue
        table.append(
            ReliabilityBin(
                low=float(p[chunk].min()),
                high=float(p[chunk].max()),
                rows=len(chunk),
                defaults=int(y[chunk].sum()),
                mean_pd=float(p[chunk].mean()),
                observed_rate=float(y[chunk].mean()),
            )
        )
    return table
