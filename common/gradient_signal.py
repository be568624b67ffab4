"""How strong a bank-like gradient is, measured on public data: the signal DP noise must beat.

DP-SGD adds noise of norm about σC√d to every step's clipped sum; what that noise has to
beat is the clipped gradient a bank's rows agree on. At the public model the pooled public
gradient is near zero (it was trained there), so the signal that fine-tuning can use is how
far a *group* of rows (a region, a product) pulls away from the pooled one. The pooled
mean of *clipped* gradients is not zero even at the optimum (clipping shortens the large
gradients of defaults more), and that bias is no signal a bank could use, so the signal is
each group's offset from the pooled clipped mean, corrected for the group's finite size:

    E|m_g - m|^2 = |mu_g - m|^2 + tr(Sigma_g) / n_g

with m_g the group's mean clipped gradient, m the pooled one and tr(Sigma_g) estimated from
the same rows. The planner's assumption, which
`fedfin plan` states, is that banks differ from the public optimum about as much as public
groups differ from each other.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedfin.common.model import CreditModel
from fedfin.common.schema import EncodedTable

_CHUNK = 512  # rows per vectorised per-example gradient call (bounded memory)


@dataclass(frozen=True)
class GradientSignal:
    """Per-example clipped gradients of public rows, summarised for the planner."""

    signal_norm: float  # debiased norm of a typical group's mean clipped gradient
    dimension: int  # parameters DP-SGD trains (encoder + head)
    mean_clipped_norm: float  # mean norm of one clipped per-example gradient (<= C)
    max_grad_norm: float
    rows: int
    groups: int


def per_example_gradient_sums(
    model: CreditModel, table: EncodedTable, groups: np.ndarray, max_grad_norm: float
) -> tuple[dict[object, torch.Tensor], dict[object, float], dict[object, int], float]:
    """Per group: sum of clipped per-example gradients, sum of their squared norms, rows;
    and the mean clipped norm over all rows. Gradients of the BCE loss, all parameters."""
    if table.label is None:
        raise ValueError("measuring gradients needs labelled rows")
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of_one(
        weights: dict[str, torch.Tensor],
        numeric: torch.Tensor,
        categorical: torch.Tensor,
        target: torch.Tensor,
    ) -> torch.Tensor:
        logit = functional_call(model, weights, (numeric.unsqueeze(0), categorical.unsqueeze(0)))
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, target.unsqueeze(0))

    per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0, 0))
    sums: dict[object, torch.Tensor] = {}
    squares: dict[object, float] = {}
    counts: dict[object, int] = {}
    norm_total = 0.0
    was_training = model.training
    model.eval()  # no dropout in the model; eval keeps this a pure function of the weights
    for start in range(0, len(table.label), _CHUNK):
        stop = start + _CHUNK
        grads = per_example(
            params,
            torch.from_numpy(table.numeric[start:stop]),
            torch.from_numpy(table.categorical[start:stop]),
            torch.from_numpy(table.label[start:stop]),
        )
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)
        norms = flat.norm(dim=1)
        clipped = flat * (max_grad_norm / norms.clamp(min=max_grad_norm)).unsqueeze(1)
        clipped_norms = norms.clamp(max=max_grad_norm)
        norm_total += float(clipped_norms.sum())
        for group in np.unique(groups[start:stop]):
            rows = torch.from_numpy(np.flatnonzero(groups[start:stop] == group))
            part = clipped[rows]
            sums[group] = sums.get(group, torch.zeros(flat.shape[1])) + part.sum(dim=0)
            squares[group] = squares.get(group, 0.0) + float((clipped_norms[rows] ** 2).sum())
            counts[group] = counts.get(group, 0) + len(rows)
    model.train(was_training)
    return sums, squares, counts, norm_total / max(1, len(table.label))


def pooled_clipped_mean(
    model: CreditModel, table: EncodedTable, max_grad_norm: float
) -> torch.Tensor:
    """The mean clipped gradient of all of `table`'s rows (the clipping bias at an optimum)."""
    sums, _, counts, _ = per_example_gradient_sums(
        model, table, np.zeros(len(table.numeric), dtype=np.int64), max_grad_norm
    )
    return sums[0] / counts[0]


def measure_gradient_signal(
    model: CreditModel,
    table: EncodedTable,
    groups: np.ndarray,
    max_grad_norm: float,
    reference: torch.Tensor | None = None,
) -> GradientSignal:
    """How far a typical group's mean clipped gradient is from `reference` (by default the
    pooled mean of the same rows), corrected for each group's finite size."""
    sums, squares, counts, mean_norm = per_example_gradient_sums(
        model, table, groups, max_grad_norm
    )
    if reference is None:
        reference = torch.stack(list(sums.values())).sum(dim=0) / max(1, sum(counts.values()))
    weighted, rows = 0.0, 0
    for group, total in sums.items():
        n = counts[group]
        if n < 2:
            continue
        mean = total / n
        spread = (squares[group] / n - float(mean @ mean)) / (n - 1)  # tr(Σ_g) / n_g
        offset = mean - reference
        weighted += n * (float(offset @ offset) - spread)
        rows += n
    dimension = sum(p.numel() for p in model.parameters())
    signal = float(np.sqrt(max(0.0, weighted / rows))) if rows else 0.0
    return GradientSignal(
        signal_norm=signal,
        dimension=dimension,
        mean_clipped_norm=mean_norm,
        max_grad_norm=max_grad_norm,
        rows=len(groups),
        groups=sum(1 for g in counts if counts[g] >= 2),
    )
