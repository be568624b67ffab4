"""Credit-risk metrics: discrimination (AUC, KS) and calibration (log-loss, Brier)."""

import numpy as np
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score, roc_curve


def credit_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC, KS, log-loss and Brier score; AUC and KS are NaN when only one class is present."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1 - 1e-7)
    both_classes = 0 < labels.sum() < len(labels)
    if both_classes:
        auc = float(roc_auc_score(labels, p))
        fpr, tpr, _ = roc_curve(labels, p)
        ks = float(np.max(tpr - fpr))
    else:
        auc = ks = float("nan")
    return {
        "auc": auc,
        "ks": ks,
        "log-loss": float(log_loss(labels, p, labels=[0.0, 1.0])),
        "brier": float(brier_score_loss(labels, p)),
    }
