"""The only statistics of private data a bank may send besides DP-SGD updates, each a
Gaussian mechanism with L2 sensitivity 1 under add/remove-one-record neighbours.

- A noisy count of training rows (`release-num-examples`).
- Noisy score histograms of the test split, one per class, from which AUC, KS, the default
  rate and the row count are computed (`release-eval-metrics`). One loan adds 1 to exactly
  one bin of one histogram, so the joint vector has sensitivity 1; every figure derived
  from it is post-processing.

Each mechanism is a `DpEvent(σ, q=1, steps=1, clip=1)`, so the same accountant composes it
with the training steps and `fedfin audit` recomputes it like any other event.
"""

import numpy as np
import torch

from fedfin.common.accounting import DpEvent

# Public bin edges on the logit of the predicted default probability: default rates are a
# few percent, so equal-width probability bins would put nearly every loan in one bin.
_LOGIT_EDGES = np.linspace(-7.0, 3.0, 41)
SENSITIVITY = 1.0


def mechanism_event(noise_multiplier: float) -> DpEvent:
    """The accountant's view of one Gaussian release with sensitivity 1."""
    return DpEvent(noise_multiplier, 1.0, 1, SENSITIVITY)


def _gaussian(shape: tuple[int, ...], sigma: float, generator: torch.Generator) -> np.ndarray:
    noise = torch.normal(0.0, sigma, size=shape, generator=generator, dtype=torch.float64)
    return noise.numpy()


def noisy_count(rows: int, sigma: float, generator: torch.Generator) -> int:
    """`rows` plus Gaussian noise of scale σ, rounded and clipped at 0 (post-processing)."""
    return max(0, round(rows + float(_gaussian((1,), sigma, generator)[0])))


def noisy_score_histograms(
    labels: np.ndarray, probabilities: np.ndarray, sigma: float, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(defaults, non-defaults) histograms over public logit bins, each bin plus N(0, σ²)."""
    clipped = np.clip(probabilities.astype(np.float64), 1e-12, 1 - 1e-12)
    logits = np.log(clipped / (1 - clipped))
    bins = np.clip(np.digitize(logits, _LOGIT_EDGES), 0, len(_LOGIT_EDGES))
    size = len(_LOGIT_EDGES) + 1
    positive = labels.astype(bool)
    defaults = np.bincount(bins[positive], minlength=size).astype(np.float64)
    others = np.bincount(bins[~positive], minlength=size).astype(np.float64)
    noise = _gaussian((2, size), sigma, generator)
    return defaults + noise[0], others + noise[1]


def metrics_from_histograms(defaults: np.ndarray, others: np.ndarray) -> dict[str, float]:
    """AUC, KS, default rate and row count from (noisy) class histograms: post-processing."""
    pos = np.clip(defaults, 0.0, None)
    neg = np.clip(others, 0.0, None)
    total_pos, total_neg = float(pos.sum()), float(neg.sum())
    rows = total_pos + total_neg
    result = {"dp-test-rows": round(rows), "dp-default-rate": total_pos / rows if rows else 0.0}
    if total_pos <= 0 or total_neg <= 0:
        return result
    # A default's score beats a non-default's when its bin is higher; ties count one half.
    below_neg = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    auc = float((pos * (below_neg + 0.5 * neg)).sum() / (total_pos * total_neg))
    ks = float(np.max(np.abs(np.cumsum(pos) / total_pos - np.cumsum(neg) / total_neg)))
    result |= {"dp-auc": auc, "dp-ks": ks}
    return result
