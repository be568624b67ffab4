"""`fedfin score` on what applicants and files really hold: empty values, categories the model
never saw, ids and extra columns, and outputs that would overwrite inputs (issue 15).

Runs the real command on bank 0 after one DP round (`trained_bank`, shared with test_scoring).
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfin.client.explain import Explainer
from fedfin.client.scoring import Scorer
from fedfin.common.errors import ConfigError, DataError
from tests.conftest import TrainedBank, bank_command, run_bank_command, score_table


def _score(bank: TrainedBank, frame: pd.DataFrame, tmp_path: Path, *extra: str) -> pd.DataFrame:
    out = score_table(bank, frame, tmp_path, *extra)
    return pd.read_csv(out, keep_default_na=False)


def test_one_application_with_an_empty_value_is_imputed_and_says_so(
    bank: TrainedBank, scorer: Scorer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    row = bank.applications.drop(columns=["Class"]).iloc[[0]].assign(annual_inc=np.nan)

    scored = _score(bank, row, tmp_path)

    out = capsys.readouterr().out
    assert "'annual_inc' is missing in the application; imputed as in training" in out
    assert "entirely missing" not in out
    assert scored["imputed"].tolist() == ["annual_inc"]
    expected = scorer.score_one({**row.iloc[0].to_dict(), "annual_inc": None})
    assert scored["default_probability"].iloc[0] == pytest.approx(expected, abs=1e-6)


def test_a_column_empty_in_every_row_is_imputed_row_by_row(
    bank: TrainedBank, scorer: Scorer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = bank.applications.head(6).assign(revol_util=np.nan, emp_length=np.nan)

    scored = _score(bank, rows, tmp_path, "--reasons", "0")

    assert "reason_codes" not in scored.columns
    assert "'revol_util' is missing in 6 of 6 rows" in capsys.readouterr().out
    for i, application in enumerate(rows.to_dict("records")):
        alone = scorer.score_one(application)
        assert scored["default_probability"].iloc[i] == pytest.approx(alone, abs=1e-6)
        assert scored["imputed"].iloc[i] == "revol_util;emp_length"


def test_an_unseen_category_is_scored_as_unknown_and_flagged(
    bank: TrainedBank, scorer: Scorer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = bank.applications.head(3).assign(sub_grade=["Z9", "A1", "Z9"])

    scored = _score(bank, rows, tmp_path)

    assert scored["unseen_categories"].tolist() == ["sub_grade=Z9", "", "sub_grade=Z9"]
    assert "'sub_grade' value 'Z9' in 2 of 3 rows (row 0, 2, 0-based) was never seen" in (
        capsys.readouterr().out
    )
    unknown = scorer.score_one({**rows.iloc[0].to_dict(), "sub_grade": None})
    assert scored["default_probability"].iloc[0] == pytest.approx(unknown, abs=1e-6)


def test_reason_codes_are_stable_codes_of_what_raises_the_risk(
    bank: TrainedBank, scorer: Scorer, tmp_path: Path
) -> None:
    rows = bank.applications.head(20).assign(id=[f"loan-{i}" for i in range(20)])

    scored = _score(bank, rows, tmp_path)
    again = _score(bank, rows, tmp_path)

    numeric = {f.name for f in scorer.schema.numeric}
    allowed = {f"{n}_{side}" for n in numeric for side in ("high", "low")}
    allowed |= {c.name for c in scorer.schema.categorical}
    explainer = Explainer(scorer)
    for i, codes in enumerate(scored["reason_codes"]):
        listed = codes.split(";") if codes else []
        assert len(listed) <= 4 and set(listed) <= allowed
        explanation = explainer.explain_one(rows.iloc[i].to_dict())
        assert listed == list(explanation.reason_codes)
        raising = [name for name, _, _ in explanation.top_reasons(4)]
        assert [code.removesuffix("_high").removesuffix("_low") for code in listed] == raising
    assert scored["reason_codes"].tolist() == again["reason_codes"].tolist()
    assert scored["id"].tolist() == rows["id"].tolist()  # an id column is kept as it is


@pytest.mark.parametrize(
    "change, error, words",
    [
        (lambda f: f.assign(reason_codes="x"), DataError, "already has a column 'reason_codes'"),
        (lambda f: f.assign(imputed=""), DataError, "already has a column 'imputed'"),
        (
            lambda f: f.drop(columns=["term", "int_rate"]),
            DataError,
            "'int_rate' is missing (and 1 more)",
        ),
    ],
)
def test_columns_follow_the_rules_serve_shares(
    bank: TrainedBank, tmp_path: Path, change: object, error: type, words: str
) -> None:
    data = tmp_path / "applications.csv"
    change(bank.applications.head(3)).to_csv(data, index=False)  # type: ignore[operator]

    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        run_bank_command(*bank_command("score", bank, data, tmp_path / "o.csv"))
    assert not (tmp_path / "o.csv").exists()


def test_scores_never_overwrite_the_applications(bank: TrainedBank, tmp_path: Path) -> None:
    data = tmp_path / "applications.csv"
    bank.applications.head(3).to_csv(data, index=False)
    before = data.read_bytes()

    with pytest.raises(ConfigError, match="is --data"):
        run_bank_command(*bank_command("score", bank, data, tmp_path / "." / "applications.csv"))
    assert data.read_bytes() == before
