"""fedfin's numpy metrics agree with scikit-learn's, ties included; the AUC interval is
DeLong's, and the reliability table accounts for every row."""

from itertools import pairwise

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve

from fedfin.common.metrics import (
    auc_confidence_interval,
    credit_metrics,
    paired_auc_difference,
    reliability_table,
)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_scikit_learn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(2000) < 0.1).astype(float)
    scores = np.round(np.clip(0.1 + 0.3 * labels + rng.normal(0, 0.2, 2000), 0.01, 0.99), 2)
    ours = credit_metrics(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert ours["auc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert ours["ks"] == pytest.approx(np.max(tpr - fpr), abs=1e-12)
    assert ours["log-loss"] == pytest.approx(log_loss(labels, scores), rel=1e-9)
    assert ours["brier"] == pytest.approx(brier_score_loss(labels, scores), rel=1e-9)


def test_one_class_gives_nan_discrimination_but_calibration_still() -> None:
    result = credit_metrics(np.zeros(10), np.full(10, 0.2))
    assert np.isnan(result["auc"]) and np.isnan(result["ks"])
    assert result["brier"] == pytest.approx(0.04)


def _pairwise_delong(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong's AUC and variance from its definition: every (defaulter, non-defaulter) pair."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = kernel.mean(axis=1), kernel.mean(axis=0)
    return float(kernel.mean()), float(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg))


@pytest.mark.parametrize("seed", [0, 1])
def test_the_auc_interval_is_delongs_and_covers_the_auc(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = (rng.random(400) < 0.08).astype(float)
    scores = np.round(np.clip(0.1 + 0.2 * labels + rng.normal(0, 0.2, 400), 0.01, 0.99), 2)
    low, high = auc_confidence_interval(labels, scores)
    auc, variance = _pairwise_delong(labels, scores)
    assert low < roc_auc_score(labels, scores) < high
    assert (low + high) / 2 == pytest.approx(auc, abs=1e-12)  # symmetric unless clipped
    assert high - low == pytest.approx(2 * 1.959963984540054 * np.sqrt(variance), rel=1e-9)
    metrics = credit_metrics(labels, scores)
    assert (metrics["auc-ci-low"], metrics["auc-ci-high"]) == pytest.approx((low, high))
    assert metrics["defaults"] == labels.sum() and metrics["rows"] == 400


def test_the_auc_interval_narrows_with_more_rows() -> None:
    rng = np.random.default_rng(3)
    widths = []
    for rows in (300, 3000, 30000):
        labels = (rng.random(rows) < 0.05).astype(float)
        scores = labels + rng.normal(0, 1.0, rows)
        low, high = auc_confidence_interval(labels, scores)
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]
    assert all(np.isnan(auc_confidence_interval(np.zeros(5), np.arange(5.0))))


def test_the_reliability_table_puts_every_row_in_one_bin_and_compares_rates() -> None:
    rng = np.random.default_rng(4)
    probabilities = rng.beta(1, 15, 1003)
    labels = (rng.random(1003) < probabilities).astype(float)
    table = reliability_table(labels, probabilities, bins=10)
    assert len(table) == 10 and sum(b.rows for b in table) == 1003
    assert sum(b.defaults for b in table) == labels.sum()
    assert all(a.high <= b.low for a, b in pairwise(table))
    for b in table:
        assert b.low <= b.mean_pd <= b.high and b.observed_rate == b.defaults / b.rows
    assert len(reliability_table(labels[:3], probabilities[:3], bins=10)) == 3


def _pairwise_components(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = scores[labels == 1], scores[labels == 0]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return kernel.mean(axis=1), kernel.mean(axis=0)


def test_the_paired_auc_difference_uses_delongs_covariance_of_shared_rows() -> None:
    rng = np.random.default_rng(4)
    labels = (rng.random(500) < 0.1).astype(float)
    base = labels * 0.5 + rng.normal(0, 1.0, 500)
    a, b = base + rng.normal(0, 0.3, 500), base + rng.normal(0, 0.3, 500)
    difference, error = paired_auc_difference(labels, a, b)
    assert difference == pytest.approx(roc_auc_score(labels, b) - roc_auc_score(labels, a))
    (pa, na), (pb, nb) = _pairwise_components(labels, a), _pairwise_components(labels, b)
    variance = np.var(pb - pa, ddof=1) / len(pa) + np.var(nb - na, ddof=1) / len(na)
    assert error == pytest.approx(np.sqrt(variance), rel=1e-9)
    # Shared rows make the difference far more certain than two independent intervals say.
    low_a, high_a = auc_confidence_interval(labels, a)
    assert error < 0.5 * (high_a - low_a) / (2 * 1.96) * np.sqrt(2)
    assert paired_auc_difference(labels, a, a) == (0.0, 0.0)
    assert all(np.isnan(paired_auc_difference(np.r_[1.0, np.zeros(9)], a[:10], b[:10])))
