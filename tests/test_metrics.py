"""fedfin's numpy metrics agree with scikit-learn's, ties included."""

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve

from common.metrics import credit_metrics


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
