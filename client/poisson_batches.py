"""Poisson-sampled batches in O(batch) per step, gathered straight from the encoded tensors.

DP-SGD's accounting assumes Poisson subsampling: each of the N rows joins a step's batch
independently with probability q. Opacus draws one uniform number per row per step to do
that (O(N): 5.7 ms a step at a million rows) and then a DataLoader fetches and collates the
rows one by one. The same distribution costs O(qN), because the probability of a batch S,

    P(S) = q^k (1-q)^(N-k) = [C(N, k) q^k (1-q)^(N-k)] · [1 / C(N, k)],  where k = |S|,

factorises into P(|S| = k), the Binomial(N, q) law of the size, times a uniform choice among
the C(N, k) subsets of that size. So: draw k ~ Binomial(N, q), then k distinct rows
uniformly without replacement.

Every random number comes from the caller's `torch.Generator` (the round's secret one), never
from numpy, Python or torch's global state.
"""

from collections.abc import Iterator, Sequence

import torch

# Above this fraction of the rows, a random permutation (O(N)) beats redrawing duplicates.
DENSE_FRACTION = 0.25


def poisson_indices(num_rows: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted row indices of one Poisson batch: each row joins independently w.p. `sample_rate`."""
    if num_rows <= 0:
        return torch.empty(0, dtype=torch.long)
    size = torch.binomial(
        torch.tensor(float(num_rows), dtype=torch.float64),
        torch.tensor(sample_rate, dtype=torch.float64),
        generator=generator,
    )
    return distinct_rows(int(size), num_rows, generator)


def distinct_rows(count: int, num_rows: int, generator: torch.Generator) -> torch.Tensor:
    """`count` distinct indices in [0, num_rows), sorted, uniform over all count-subsets."""
    if not 0 <= count <= num_rows:
        raise ValueError(f"cannot draw {count} distinct rows out of {num_rows}")
    if count > DENSE_FRACTION * num_rows:
        return distinct_by_permutation(count, num_rows, generator)
    return distinct_by_redrawing(count, num_rows, generator)


def distinct_by_redrawing(count: int, num_rows: int, generator: torch.Generator) -> torch.Tensor:
    """Draw with replacement, keep the distinct rows, redraw only the shortfall, repeat.

    Uniform over count-subsets by symmetry: relabelling the rows maps the draws' distribution
    onto itself and commutes with "keep the distinct ones", so every subset is as likely as
    any other. Expected O(count) draws while count ≪ num_rows (about count²/2N duplicates).
    """
    chosen = torch.unique(torch.randint(num_rows, (count,), generator=generator))  # sorted
    while len(chosen) < count:
        draws = torch.randint(num_rows, (count - len(chosen),), generator=generator)
        chosen = torch.unique(torch.cat((chosen, draws)))
    return chosen


def distinct_by_permutation(count: int, num_rows: int, generator: torch.Generator) -> torch.Tensor:
    """The first `count` entries of a uniform random permutation, sorted: O(num_rows)."""
    return torch.randperm(num_rows, generator=generator)[:count].sort().values


def poisson_batches(
    tensors: Sequence[torch.Tensor], sample_rate: float, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless Poisson batches of rows of `tensors` (same first dimension), one gather each.

    A batch may be empty (zero rows in every tensor): DP-SGD must still take its step.
    """
    num_rows = len(tensors[0])
    if any(len(t) != num_rows for t in tensors):
        raise ValueError("every tensor needs one row per record")
    while True:
        rows = poisson_indices(num_rows, sample_rate, generator)
        yield tuple(t.index_select(0, rows) for t in tensors)
