"""A seeded generator of bank-like credit data, for scale tests far beyond the real set.

Each bank draws its applicants from a shifted population (income, grade mix, loan size)
and has its own baseline default rate; `shift=0` gives identically distributed banks.
The label follows a logistic model of the features, so there is signal to learn.
"""

import numpy as np
import pandas as pd

from fedfin.common.errors import ConfigError

LABEL = "default"
GROUP_COLUMN = "bank"
PUBLIC_GROUP = "public"
_GRADES = np.array(list("ABCDEFG"))
_PURPOSES = np.array(["debt_consolidation", "credit_card", "home_improvement", "car", "other"])
_HOMES = np.array(["RENT", "MORTGAGE", "OWN"])


def generate_credit_data(
    rows: int,
    banks: int,
    shift: float = 0.5,
    seed: int = 0,
    public_fraction: float = 0.4,
    default_rate: float = 0.08,
) -> pd.DataFrame:
    """`rows` loans: a public pool (group 'public') and `banks` banks ('bank-00', ...)."""
    if rows < 10 * (banks + 1):
        raise ConfigError(f"--rows {rows} is too small for {banks} banks")
    if banks < 1:
        raise ConfigError(f"--banks must be at least 1, got {banks}")
    if not 0.0 <= shift <= 3.0:
        raise ConfigError(f"--shift must be in [0, 3], got {shift}")
    if not 0.0 < default_rate < 1.0:
        raise ConfigError(f"default rate must be in (0, 1), got {default_rate}")
    rng = np.random.default_rng(seed)
    n_public = int(rows * public_fraction)
    bank_of_row = np.concatenate([np.full(n_public, -1), rng.integers(0, banks, rows - n_public)])
    rng.shuffle(bank_of_row)
    # Per-population offsets; the public pool is the unshifted reference population.
    offsets = rng.normal(0.0, shift, size=(banks + 1, 4))
    offsets[0] = 0.0
    o = offsets[bank_of_row + 1]

    income = np.exp(rng.normal(11.0 + 0.25 * o[:, 0], 0.5, rows))
    grade_score = np.clip(rng.normal(2.2 + 0.8 * o[:, 1], 1.4, rows), 0, 6)
    grade = _GRADES[np.round(grade_score).astype(int)]
    loan = np.clip(np.exp(rng.normal(9.5 + 0.2 * o[:, 2], 0.6, rows)), 500, 40_000).round(-2)
    term = np.where(rng.random(rows) < 0.25 + 0.1 * np.tanh(o[:, 2]), 60, 36)
    int_rate = np.clip(6.0 + 3.0 * grade_score + rng.normal(0, 1.0, rows), 5.0, 30.0).round(2)
    dti = np.clip(rng.gamma(4.0, 4.5, rows), 0, 60).round(2)
    revol_util = np.clip(rng.beta(2.0, 2.5, rows) * 100, 0, 100).round(1)
    delinq = rng.poisson(0.2 + 0.1 * grade_score)
    inquiries = rng.poisson(0.6 + 0.15 * grade_score)
    emp_years = rng.integers(0, 11, rows)
    home = _HOMES[rng.choice(3, rows, p=[0.4, 0.45, 0.15])]
    purpose = _PURPOSES[rng.choice(5, rows, p=[0.5, 0.2, 0.1, 0.1, 0.1])]

    logit = (
        0.45 * (grade_score - 2.2)
        + 0.5 * (loan / income * 5 - 1.0)
        + 0.03 * (dti - 18)
        + 0.012 * (revol_util - 45)
        + 0.35 * delinq
        + 0.2 * inquiries
        + 0.35 * (term == 60)
        - 0.04 * emp_years
        + 0.3 * (home == "RENT")
        + 0.4 * o[:, 3]
    )
    intercept = _intercept_for_rate(logit, default_rate)
    default = rng.random(rows) < 1.0 / (1.0 + np.exp(-(logit + intercept)))

    names = np.array([PUBLIC_GROUP] + [f"bank-{i:02d}" for i in range(banks)])
    return pd.DataFrame(
        {
            "loan_amount": loan,
            "annual_income": income.round(0),
            "int_rate": int_rate,
            "term": np.char.add(term.astype(str), "m"),
            "grade": grade,
            "dti": dti,
            "revol_util": revol_util,
            "delinq_2yrs": delinq,
            "inq_last_6mths": inquiries,
            "emp_years": emp_years,
            "home_ownership": home,
            "purpose": purpose,
            GROUP_COLUMN: names[bank_of_row + 1],
            LABEL: default.astype(np.int64),
        }
    )


def _intercept_for_rate(logit: np.ndarray, rate: float) -> float:
    """The intercept whose mean default probability over all rows is `rate` (bisection)."""
    low, high = -50.0, 50.0
    for _ in range(60):
        middle = (low + high) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + middle)))) > rate:
            high = middle
        else:
            low = middle
    return (low + high) / 2
