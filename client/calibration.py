"""Recalibrate a bank's served model on its own rows: Platt scaling of the model's logit.

A model's ranking can be good while its probabilities are off: at ε = 1 the DP-trained
private heads predicted 1.4-1.7% default on Lending Club banks where about 5% of loans
defaulted. Platt scaling fits `p = sigmoid(slope * logit + intercept)` by logistic
regression of the label on the model's logit, which moves the probabilities and keeps the
ranking (AUC) when the slope is positive; a fit whose slope is not positive is replaced by
a pure shift. Two parameters suit a bank with a few dozen defaults, where isotonic
regression would be a staircase of a few steps.

Which rows it is fitted on is the caller's choice (client/model_choice.py fits it on all of
the bank's non-test rows and says why).

The calibration is fitted inside the bank on its private rows, kept in its state directory
and never released. If it (or anything computed from it) were ever sent, it would have to go
through a DP mechanism and be charged in the ledger like any other release.
"""

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfin.common.errors import CheckpointError
from fedfin.common.model import CreditModel

_MAX_NEWTON_STEPS = 100


@dataclass(frozen=True)
class PlattCalibration:
    """Calibrated log-odds = slope * model log-odds + intercept."""

    slope: float = 1.0
    intercept: float = 0.0
    rows: int = 0  # how many rows it was fitted on (0: the identity, nothing fitted)
    method: str = "platt"

    def logits(self, logits: np.ndarray) -> np.ndarray:
        return self.slope * np.asarray(logits, dtype=np.float64) + self.intercept

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        return _sigmoid(self.logits(logits))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PlattCalibration":
        try:
            slope, intercept = float(raw["slope"]), float(raw["intercept"])
            rows = int(raw.get("rows", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"not a valid calibration ({exc})") from None
        if not (np.isfinite(slope) and np.isfinite(intercept)) or slope <= 0:
            raise CheckpointError(f"not a valid calibration (slope {slope}, intercept {intercept})")
        return cls(slope, intercept, rows)


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> PlattCalibration:
    """Logistic regression of the label on the logit, with Platt's smoothed targets.

    The targets (N+ + 1)/(N+ + 2) and 1/(N- + 2) in place of 1 and 0 keep the fit finite
    when the rows separate perfectly or hold a single class (Platt 1999).
    """
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(x) == 0:
        return PlattCalibration()
    positives = float(y.sum())
    negatives = float(len(y) - positives)
    target = np.where(y == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
    slope, intercept = _newton(np.column_stack([x, np.ones_like(x)]), target, np.array([1.0, 0.0]))
    if not slope > 0:  # a falling map would reverse the ranking: shift only
        (intercept,) = _newton(np.ones((len(x), 1)), target, np.array([0.0]), offset=x)
        slope = 1.0
    return PlattCalibration(float(slope), float(intercept), len(x))


def _newton(
    design: np.ndarray, target: np.ndarray, start: np.ndarray, offset: np.ndarray | None = None
) -> np.ndarray:
    """Maximise the Bernoulli log-likelihood of `target` under sigmoid(design @ w + offset):
    Newton steps, each halved until the likelihood does not fall (plain Newton can overshoot
    from a start far off, e.g. a model that predicts a seventh of the defaults)."""
    w = start.astype(np.float64)
    base = np.zeros(len(target)) if offset is None else offset

    def log_likelihood(weights: np.ndarray) -> float:
        z = design @ weights + base
        return float(np.sum(target * z - np.logaddexp(0.0, z)))

    current = log_likelihood(w)
    for _ in range(_MAX_NEWTON_STEPS):
        p = _sigmoid(design @ w + base)
        gradient = design.T @ (target - p)
        hessian = (design * (p * (1 - p))[:, None]).T @ design + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while scale > 1e-8 and log_likelihood(w + scale * step) < current - 1e-12:
            scale /= 2
        w = w + scale * step
        current = log_likelihood(w)
        if np.max(np.abs(scale * step)) < 1e-10:
            break
    return w


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def fold_calibration(model: CreditModel, calibration: PlattCalibration) -> None:
    """Fold the calibration into the head's last linear layer, so that every path that uses
    the model (batch scoring, the folded one-row path, explanations) gives calibrated log-odds."""
    layers = model.head.layers
    last = layers[-1] if isinstance(layers, nn.Sequential) else layers
    if not isinstance(last, nn.Linear) or last.bias is None:
        raise CheckpointError("cannot fold a calibration into a head that does not end in Linear")
    with torch.no_grad():
        last.weight.mul_(calibration.slope)
        last.bias.mul_(calibration.slope).add_(calibration.intercept)
