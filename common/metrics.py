"""Credit-risk metrics: discrimination (AUC, KS) and calibration (log-loss, Brier).

Plain numpy rather than scikit-learn: every Flower message starts a fresh ClientApp
process, and importing scikit-learn there cost about a second per evaluation.
Tests check these against scikit-learn's implementations.
"""

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


def ks_statistic(labels: np.ndarray, scores: np.ndarray) -> float:
    """Largest gap between the score distributions of defaulters and non-defaulters."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    cut = np.r_[s[1:] != s[:-1], True]  # evaluate only after the last of tied scores
    tpr = np.cumsum(y)[cut] / y.sum()
    fpr = np.cumsum(1 - y)[cut] / (1 - y).sum()
    return float(np.max(np.abs(tpr - fpr)))


def credit_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC, KS, log-loss and Brier score; AUC and KS are NaN when only one class is present."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    both_classes = 0 < y.sum() < len(y)
    auc = roc_auc(y, p) if both_classes else float("nan")
    ks = ks_statistic(y, p) if both_classes else float("nan")
    return {
        "auc": auc,
        "ks": ks,
        "log-loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "brier": float(np.mean((p - y) ** 2)),
    }
