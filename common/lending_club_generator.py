"""Bank-sized synthetic loans fitted to the real Lending Club columns, with a documented shift.

The real set (9,857 loans) is too small to say what DP federation does for a bank with 10^4-10^6
loans; this generator makes such banks. Everything that describes the loan population is
fitted on the real rows (`common.lending_club.load_lending_club`), not hand-set:

- numeric columns, the sub-grade (as its rank A1..G5) and the term: a Gaussian copula: each
  column's empirical marginal, a correlation matrix of the real rows' normal scores, and the
  inverse empirical CDF (interpolated for continuous columns, stepwise for counts and codes);
- `verification_status` and `emp_length`: copied from a random real row with the same grade
  letter and term (drawn conditionally on the copula's grade and term);
- the label `Class`: a logistic "teacher" fitted on the real rows (5.2% bad).

What is hand-set is the shift between the public source and the banks (`ShiftConfig`), see
docs/synthetic-data.md: the public source lends in the West and Northeast (marginals fitted on
those states' real loans), the banks in the South and Midwest (marginals fitted on theirs);
each bank tilts its grade and term mix; and the banks' default mechanism differs from the
public one by a tilt common to all banks (the banks' market is not the public one) plus a small
tilt and intercept of each bank's own. So the public model is good but not optimal for banks.

Deterministic: a bank's rows depend only on (seed, bank index, part, rows), never on how many
other banks there are, so a 5-bank federation is the first 5 banks of a 20-bank one.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Literal

import numpy as np
import pandas as pd
from scipy.special import ndtr, ndtri

from fedfin.common.errors import ConfigError
from fedfin.common.lending_club import LABEL, POSITIVE_LABEL, STATE_COLUMN, load_lending_club

NEGATIVE_LABEL = "good"
Part = Literal["train", "test"]
_PARTS: dict[Part, int] = {"train": 1, "test": 2}
_PUBLIC_ID = 0
# US Census regions: the public source lends in the first two, the banks in the last two.
REGIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "West": ("AK", "AZ", "CA", "CO", "HI", "ID", "MT", "NM", "NV", "OR", "UT", "WA", "WY"),
        "Northeast": ("CT", "MA", "ME", "NH", "NJ", "NY", "PA", "RI", "VT"),
        "South": (
            "AL",
            "AR",
            "DC",
            "DE",
            "FL",
            "GA",
            "KY",
            "LA",
            "MD",
            "MS",
            "NC",
            "OK",
            "SC",
            "TN",
            "TX",
            "VA",
            "WV",
        ),
        "Midwest": ("IA", "IL", "IN", "KS", "MI", "MN", "MO", "ND", "NE", "OH", "SD", "WI"),
    }
)
PUBLIC_REGIONS = ("West", "Northeast")
BANK_REGIONS = ("South", "Midwest")
GRADE = "sub_grade"
TERM = "term"
CONDITIONAL = ("verification_status", "emp_length")  # copied from a matching real row
_CONTINUOUS_DECIMALS = {"int_rate": 2, "revol_util": 1, "annual_inc": 0}
_LOG_IN_TEACHER = (
    "funded_amnt", "annual_inc", "total_bal_il", "total_il_high_credit_limit", "delinq_amnt",
)  # fmt: skip
_MAX_STEP_UNIQUE = 40  # integer columns with at most this many values: stepwise inverse CDF


@dataclass(frozen=True)
class ShiftConfig:
    """The hand-set part: how far banks are from the public source (0 scales switch one off).

    `common_tilt`: extra default log-odds per standard deviation (copula normal score) of a
    column, the same at every bank: what the banks' market knows that the public data does
    not. Each bank also draws its own tilt (sd `bank_tilt_sd` per tilted column), an
    intercept offset (sd `intercept_sd`), and shifts of its grade and term mix (uniform in
    ±`grade_shift`, ±`term_shift`, in normal-score units: positive means riskier / longer).
    """

    common_tilt: Mapping[str, float] = field(
        default_factory=lambda: MappingProxyType(
            {"inq_last_12m": 0.35, "all_util": 0.30, "annual_inc": -0.30, "open_il_12m": 0.20}
        )
    )
    bank_tilt_sd: float = 0.15
    intercept_sd: float = 0.20
    grade_shift: float = 0.5
    term_shift: float = 0.4

    def __post_init__(self) -> None:
        for name, value in (
            ("bank_tilt_sd", self.bank_tilt_sd),
            ("intercept_sd", self.intercept_sd),
            ("grade_shift", self.grade_shift),
            ("term_shift", self.term_shift),
        ):
            if not 0.0 <= value <= 3.0:
                raise ConfigError(f"{name} must be in [0, 3], got {value}")


@dataclass(frozen=True)
class BankShift:
    """One bank's own draw of the shift (from the seed and the bank's index only)."""

    index: int
    state: str
    grade_shift: float
    term_shift: float
    intercept_offset: float
    tilt: Mapping[str, float]


@dataclass(frozen=True)
class Marginals:
    """Sorted real values of each copula column, for one group of regions."""

    sorted_values: tuple[np.ndarray, ...]
    states: tuple[str, ...]
    state_weights: np.ndarray
    donors: Mapping[tuple[int, int], np.ndarray]  # (grade letter, term) -> real row indices
    conditional: Mapping[str, np.ndarray]  # column -> real category codes, row-aligned
    default_rate: float


@dataclass(frozen=True)
class GeneratorFit:
    """Everything fitted on the real rows; `fit_generator` computes it once."""

    columns: tuple[str, ...]  # copula columns: numeric ones, then sub_grade rank, then term
    stepwise: tuple[bool, ...]
    integer: tuple[bool, ...]
    correlation: np.ndarray
    cholesky: np.ndarray
    grades: tuple[str, ...]
    terms: tuple[str, ...]
    categories: Mapping[str, tuple[str, ...]]
    public: Marginals
    banks: Marginals
    teacher_coef: np.ndarray
    teacher_intercept: float
    teacher_scaling: Mapping[str, tuple[float, float]]
    real_columns: tuple[str, ...]
    real_dtypes: Mapping[str, str]


def fit_generator(frame: pd.DataFrame | None = None) -> GeneratorFit:
    """Fit the copula, the conditional categoricals and the teacher on real Lending Club rows."""
    if frame is None:
        return _default_fit()
    return _fit(frame)


@lru_cache(maxsize=1)
def _default_fit() -> GeneratorFit:
    return _fit(load_lending_club())


def _fit(frame: pd.DataFrame) -> GeneratorFit:
    from sklearn.linear_model import LogisticRegression

    numeric = [c for c in frame.columns if c != LABEL and pd.api.types.is_numeric_dtype(frame[c])]
    grades = tuple(sorted(frame[GRADE].astype(str).unique()))
    terms = tuple(sorted(frame[TERM].astype(str).unique()))
    columns = (*numeric, GRADE, TERM)
    codes = _codes(frame, grades, terms)
    values = np.column_stack([frame[c].to_numpy(np.float64) for c in numeric] + codes)
    integer = (*(pd.api.types.is_integer_dtype(frame[c]) for c in numeric), True, True)
    stepwise = tuple(
        bool(is_int and len(np.unique(values[:, j])) <= _MAX_STEP_UNIQUE)
        for j, is_int in enumerate(integer)
    )
    scores = np.column_stack([_normal_scores(values[:, j]) for j in range(values.shape[1])])
    correlation = np.corrcoef(scores, rowvar=False)
    correlation = correlation + 1e-6 * np.eye(len(columns))
    cholesky = np.linalg.cholesky(correlation)
    state = frame[STATE_COLUMN].astype(str).to_numpy()
    public_rows = np.isin(state, [s for r in PUBLIC_REGIONS for s in REGIONS[r]])
    bank_rows = np.isin(state, [s for r in BANK_REGIONS for s in REGIONS[r]])
    categories = {c: tuple(sorted(frame[c].astype(str).unique())) for c in CONDITIONAL}
    label = (frame[LABEL].astype(str) == POSITIVE_LABEL).to_numpy()

    def marginals(rows: np.ndarray) -> Marginals:
        present, counts = np.unique(state[rows], return_counts=True)
        letter = np.array([g[0] for g in grades])[codes[0][rows].astype(int)]
        letters = sorted(set(g[0] for g in grades))
        letter_code = np.searchsorted(letters, letter)
        term_code = codes[1][rows].astype(int)
        indices = np.flatnonzero(rows)
        donors = {}
        for g in range(len(letters)):
            for t in range(len(terms)):
                match = indices[(letter_code == g) & (term_code == t)]
                if len(match) == 0:  # a rare cell: any row of the grade, then any row
                    match = indices[letter_code == g]
                donors[(g, t)] = match if len(match) else indices
        return Marginals(
            sorted_values=tuple(np.sort(values[rows, j]) for j in range(values.shape[1])),
            states=tuple(str(s) for s in present),
            state_weights=counts / counts.sum(),
            donors=MappingProxyType(donors),
            conditional=MappingProxyType(
                {
                    c: np.searchsorted(categories[c], frame[c].astype(str).to_numpy())
                    for c in CONDITIONAL
                }
            ),
            default_rate=float(label[rows].mean()),
        )

    scaling = _teacher_scaling(frame, numeric)
    design = _teacher_design(
        {c: frame[c].to_numpy(np.float64) for c in numeric},
        codes[0].astype(int),
        codes[1].astype(int),
        {c: np.searchsorted(categories[c], frame[c].astype(str).to_numpy()) for c in CONDITIONAL},
        scaling,
        len(grades),
        categories,
    )
    teacher = LogisticRegression(C=0.5, max_iter=2000).fit(design, label)
    return GeneratorFit(
        columns=columns,
        stepwise=stepwise,
        integer=integer,
        correlation=correlation,
        cholesky=cholesky,
        grades=grades,
        terms=terms,
        categories=MappingProxyType(categories),
        public=marginals(public_rows),
        banks=marginals(bank_rows),
        teacher_coef=teacher.coef_[0].copy(),
        teacher_intercept=float(teacher.intercept_[0]),
        teacher_scaling=MappingProxyType(scaling),
        real_columns=tuple(frame.columns),
        real_dtypes=MappingProxyType({c: str(frame[c].dtype) for c in frame.columns}),
    )


def _codes(
    frame: pd.DataFrame, grades: tuple[str, ...], terms: tuple[str, ...]
) -> list[np.ndarray]:
    return [
        np.searchsorted(grades, frame[GRADE].astype(str).to_numpy()).astype(np.float64),
        np.searchsorted(terms, frame[TERM].astype(str).to_numpy()).astype(np.float64),
    ]


def _normal_scores(values: np.ndarray) -> np.ndarray:
    """Φ⁻¹ of mid-ranks (ties share their average rank)."""
    ranks = pd.Series(values).rank(method="average").to_numpy()
    return ndtri((ranks - 0.5) / len(values))


def _teacher_scaling(frame: pd.DataFrame, numeric: list[str]) -> dict[str, tuple[float, float]]:
    out = {}
    for column in numeric:
        x = frame[column].to_numpy(np.float64)
        if column in _LOG_IN_TEACHER:
            x = np.log1p(np.maximum(x, 0.0))
        std = float(x.std())
        out[column] = (float(x.mean()), std if std > 0 else 1.0)
    return out


def _teacher_design(
    numeric: Mapping[str, np.ndarray],
    grade: np.ndarray,
    term: np.ndarray,
    conditional: Mapping[str, np.ndarray],
    scaling: Mapping[str, tuple[float, float]],
    n_grades: int,
    categories: Mapping[str, tuple[str, ...]],
) -> np.ndarray:
    """Standardised numerics (log for amounts, clipped at ±5), grade rank, grade letter,
    term, verification and employment one-hots."""
    return np.column_stack(
        _teacher_parts(numeric, grade, term, conditional, scaling, n_grades, categories)
    )


def _teacher_parts(
    numeric: Mapping[str, np.ndarray],
    grade: np.ndarray,
    term: np.ndarray,
    conditional: Mapping[str, np.ndarray],
    scaling: Mapping[str, tuple[float, float]],
    n_grades: int,
    categories: Mapping[str, tuple[str, ...]],
) -> list[np.ndarray]:
    parts = []
    for column, (mean, std) in scaling.items():
        x = numeric[column]
        if column in _LOG_IN_TEACHER:
            x = np.log1p(np.maximum(x, 0.0))
        parts.append(np.clip((x - mean) / std, -5.0, 5.0))
    parts.append(grade / (n_grades - 1))
    letter = grade // 5  # A1..A5 -> 0, ..., G1..G5 -> 6
    parts += [(letter == g).astype(np.float64) for g in range(1, 7)]
    parts.append(term.astype(np.float64))
    for column in CONDITIONAL:
        parts += [
            (conditional[column] == k).astype(np.float64) for k in range(1, len(categories[column]))
        ]
    return parts


class LendingClubGenerator:
    """Seeded public-source and bank tables with the real Lending Club columns and label."""

    def __init__(
        self,
        seed: int,
        fit: GeneratorFit | None = None,
        shift: ShiftConfig | None = None,
        calibration_rows: int = 200_000,
    ) -> None:
        self.seed = seed
        self.calibration_rows = calibration_rows
        self.fit = fit or fit_generator()
        self.shift = shift or ShiftConfig()
        self._intercepts: dict[str, float] = {}

    # --- the shift --------------------------------------------------------------

    def bank_shift(self, index: int) -> BankShift:
        """Bank `index`'s own shift: a function of (seed, index) only."""
        if index < 0:
            raise ConfigError(f"bank index must be non-negative, got {index}")
        rng = np.random.default_rng([self.seed, 1_000 + index, 0])
        shift = self.shift
        states = self.fit.banks.states
        order = np.argsort(-self.fit.banks.state_weights, kind="stable")
        return BankShift(
            index=index,
            state=states[order[index % len(states)]],
            grade_shift=float(rng.uniform(-1, 1) * shift.grade_shift),
            term_shift=float(rng.uniform(-1, 1) * shift.term_shift),
            intercept_offset=float(rng.normal() * shift.intercept_sd),
            tilt=MappingProxyType(
                {c: float(rng.normal() * shift.bank_tilt_sd) for c in shift.common_tilt}
            ),
        )

    # --- tables -----------------------------------------------------------------

    def public(self, rows: int) -> pd.DataFrame:
        """The public source: West and Northeast loans under the real default mechanism."""
        rng = np.random.default_rng([self.seed, _PUBLIC_ID, 0, rows])
        return self._table(rows, rng, None)

    def bank(self, index: int, rows: int, part: Part = "train") -> pd.DataFrame:
        """`rows` loans of bank `index` (South/Midwest, its own shift); train and test parts
        are independent draws from the same bank distribution."""
        if part not in _PARTS:
            raise ConfigError(f"part must be 'train' or 'test', got '{part}'")
        rng = np.random.default_rng([self.seed, 1_000 + index, _PARTS[part], rows])
        return self._table(rows, rng, self.bank_shift(index))

    def default_probability(self, frame: pd.DataFrame, bank: int | None) -> np.ndarray:
        """The true P(bad) of each row under the public mechanism (`bank=None`) or bank's."""
        return _sigmoid(self._logit(frame, None if bank is None else self.bank_shift(bank)))

    def _table(self, rows: int, rng: np.random.Generator, shift: BankShift | None) -> pd.DataFrame:
        table = self._features(rows, rng, shift)
        bad = rng.random(rows) < _sigmoid(self._logit(table, shift))
        table[LABEL] = pd.Categorical.from_codes(
            bad.astype(np.int8), (NEGATIVE_LABEL, POSITIVE_LABEL)
        )
        return table[list(self.fit.real_columns)]

    def _features(
        self, rows: int, rng: np.random.Generator, shift: BankShift | None
    ) -> pd.DataFrame:
        """Copula draw, inverse marginals, conditional categoricals, state; no label."""
        if rows < 1:
            raise ConfigError(f"rows must be positive, got {rows}")
        fit = self.fit
        marginals = fit.public if shift is None else fit.banks
        latent = rng.standard_normal((rows, len(fit.columns)), dtype=np.float32)
        latent = latent @ fit.cholesky.T.astype(np.float32)
        if shift is not None:
            latent[:, -2] += shift.grade_shift
            latent[:, -1] += shift.term_shift
        u = ndtr(latent)
        frame: dict[str, object] = {}
        for j, column in enumerate(fit.columns):
            values = _inverse_cdf(marginals.sorted_values[j], u[:, j], fit.stepwise[j])
            if fit.integer[j]:
                values = np.rint(values).astype(np.int64)
            elif column in _CONTINUOUS_DECIMALS:
                values = np.round(values, _CONTINUOUS_DECIMALS[column])
            frame[column] = values
        grade = np.asarray(frame.pop(GRADE))
        term = np.asarray(frame.pop(TERM))
        frame[GRADE] = pd.Categorical.from_codes(grade, fit.grades)
        frame[TERM] = pd.Categorical.from_codes(term, fit.terms)
        donor = self._donors(marginals, grade, term, rng)
        for column in CONDITIONAL:
            codes = marginals.conditional[column][donor]
            frame[column] = pd.Categorical.from_codes(codes, fit.categories[column])
        if shift is None:
            state = rng.choice(len(marginals.states), size=rows, p=marginals.state_weights)
            frame[STATE_COLUMN] = pd.Categorical.from_codes(state, marginals.states)
        else:
            frame[STATE_COLUMN] = pd.Categorical.from_codes(
                np.zeros(rows, dtype=np.int8), (shift.state,)
            )
        return pd.DataFrame(frame)

    def _donors(
        self, marginals: Marginals, grade: np.ndarray, term: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """For each row, a random real row with the same grade letter and term."""
        letter = grade // 5
        donor = np.empty(len(grade), dtype=np.int64)
        for (g, t), pool in marginals.donors.items():
            rows = np.flatnonzero((letter == g) & (term == t))
            donor[rows] = pool[rng.integers(0, len(pool), len(rows))]
        return donor

    def _logit(
        self, table: pd.DataFrame, shift: BankShift | None, calibrated: bool = True
    ) -> np.ndarray:
        """Teacher log-odds; for a bank plus the common and own tilts and the own intercept.

        The tilts act on each tilted column's normal score within the banks' marginals
        (mid-rank of the observed value): a function of the features a model sees.
        """
        fit = self.fit
        parts = _teacher_parts(
            {c: table[c].to_numpy(np.float64) for c in fit.teacher_scaling},
            table[GRADE].cat.codes.to_numpy().astype(int),
            table[TERM].cat.codes.to_numpy().astype(int),
            {c: table[c].cat.codes.to_numpy().astype(int) for c in CONDITIONAL},
            fit.teacher_scaling,
            len(fit.grades),
            fit.categories,
        )
        logit = np.full(len(table), fit.teacher_intercept)
        for part, weight in zip(parts, fit.teacher_coef, strict=True):
            logit += weight * part
        if shift is not None:
            for column, weight in self.shift.common_tilt.items():
                logit += (weight + shift.tilt[column]) * self._score(table, column)
            logit += shift.intercept_offset
        if calibrated:
            logit += self._intercept(shift is not None)
        return logit

    def _score(self, table: pd.DataFrame, column: str) -> np.ndarray:
        ref = self.fit.banks.sorted_values[self.fit.columns.index(column)]
        n = len(ref)
        values = np.unique(ref)
        mid = (np.searchsorted(ref, values, "left") + np.searchsorted(ref, values, "right")) / 2
        scores = ndtri(np.clip(mid / n, 0.5 / n, 1 - 0.5 / n))
        x = table[column].to_numpy(np.float64)
        # Values between two real ones take the lower one's score (the mid-rank rule).
        index = np.clip(np.searchsorted(values, x, "right") - 1, 0, len(values) - 1)
        return scores[index]

    def _intercept(self, banks: bool) -> float:
        """The offset that gives the group its real default rate (public: West/Northeast;
        banks: South/Midwest, for a bank with no shift of its own), fitted once per
        generator on a calibration sample (200k rows by default)."""
        key = "banks" if banks else "public"
        if key not in self._intercepts:
            neutral = None
            if banks:
                tilt = {c: 0.0 for c in self.shift.common_tilt}
                neutral = BankShift(-1, self.fit.banks.states[0], 0.0, 0.0, 0.0, tilt)
            rng = np.random.default_rng([self.seed, 999_999, int(banks)])
            sample = self._features(self.calibration_rows, rng, neutral)
            logit = self._logit(sample, neutral, calibrated=False)
            marginals = self.fit.banks if banks else self.fit.public
            self._intercepts[key] = _intercept_for_rate(logit, marginals.default_rate)
        return self._intercepts[key]


def _inverse_cdf(sorted_values: np.ndarray, u: np.ndarray, stepwise: bool) -> np.ndarray:
    n = len(sorted_values)
    if stepwise:
        return sorted_values[np.minimum((u * n).astype(np.int64), n - 1)]
    # Linear between order statistics placed at (i + 0.5) / n, flat beyond the ends.
    position = np.clip(u * n - 0.5, 0.0, n - 1.0)
    low = np.minimum(position.astype(np.int64), n - 2)
    fraction = position - low
    return sorted_values[low] * (1.0 - fraction) + sorted_values[low + 1] * fraction


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _intercept_for_rate(logit: np.ndarray, rate: float) -> float:
    """The offset whose mean default probability over `logit` is `rate` (bisection)."""
    low, high = -30.0, 30.0
    for _ in range(60):
        middle = (low + high) / 2
        if np.mean(_sigmoid(logit + middle)) > rate:
            high = middle
        else:
            low = middle
    return (low + high) / 2
