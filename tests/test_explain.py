"""Explanations a credit officer can read: faithful (complete), stable, in the bank's names."""

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfin.client.explain import Explainer, reasons_table
from fedfin.client.scoring import Scorer
from fedfin.common.errors import ConfigError
from tests.conftest import TrainedBank, bank_command, run_bank_command

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def explainer(scorer: Scorer) -> Explainer:
    return Explainer(scorer)


def _nothing_known(scorer: Scorer) -> dict[str, object]:
    return dict.fromkeys(scorer.feature_names)


def test_attributions_add_up_to_the_log_odds_gap_from_the_reference_applicant(
    explainer: Explainer, scorer: Scorer, bank: TrainedBank
) -> None:
    """Completeness of integrated gradients, against the scorer's own logits."""
    reference = scorer.logit_one(_nothing_known(scorer))
    for application in bank.applications.head(25).to_dict("records"):
        explanation = explainer.explain_one(application)
        gap = scorer.logit_one(application) - reference

        assert explanation.attributions.sum() == pytest.approx(gap, abs=1e-5)
        assert abs(explanation.convergence_delta) < 1e-6  # captum's own measure of the same
        assert explanation.logit == pytest.approx(scorer.logit_one(application), abs=1e-5)
        assert explanation.probability == pytest.approx(scorer.score_one(application), abs=1e-6)


def test_the_reference_applicant_is_the_application_with_nothing_known(
    explainer: Explainer, scorer: Scorer
) -> None:
    explanation = explainer.explain_one(_nothing_known(scorer))

    assert explanation.reference_probability == pytest.approx(
        scorer.score_one(_nothing_known(scorer)), abs=1e-6
    )
    assert np.abs(explanation.attributions).max() == 0.0


@pytest.mark.parametrize("feature, value", [("int_rate", 24.5), ("sub_grade", "G1")])
def test_one_changed_feature_carries_the_whole_difference_under_its_own_name(
    explainer: Explainer, scorer: Scorer, feature: str, value: object
) -> None:
    """Each categorical's embedding dimensions are summed into one attribution by name."""
    application = {**_nothing_known(scorer), feature: value}

    explanation = explainer.explain_one(application)

    assert explanation.features == scorer.feature_names
    position = explanation.features.index(feature)
    others = np.delete(explanation.attributions, position)
    assert np.abs(others).max() == 0.0
    assert explanation.attributions[position] == pytest.approx(
        scorer.logit_one(application) - scorer.logit_one(_nothing_known(scorer)), abs=1e-6
    )
    assert explanation.values[position] == value


def test_explanations_are_identical_across_two_runs(bank: TrainedBank) -> None:
    runs = []
    for _ in range(2):
        explainer = Explainer(Scorer.load(bank.state_dir, bank.encoder_dir))
        rows = explainer.explain_rows(bank.applications, [0, 7, 42])
        importance = explainer.global_importance(bank.applications, sample=100, seed=3)
        runs.append((rows, importance))

    (first_rows, first_importance), (second_rows, second_importance) = runs
    for first, second in zip(first_rows, second_rows, strict=True):
        np.testing.assert_array_equal(first.attributions, second.attributions)
    np.testing.assert_array_equal(first_importance.mean_abs, second_importance.mean_abs)
    assert first_importance.rows == 100


def test_explaining_a_table_row_equals_explaining_it_alone(
    explainer: Explainer, bank: TrainedBank
) -> None:
    rows = [0, 5, 9]
    from_table = explainer.explain_rows(bank.applications, rows)
    for row, explanation in zip(rows, from_table, strict=True):
        alone = explainer.explain_one(bank.applications.iloc[row].to_dict())
        np.testing.assert_allclose(explanation.attributions, alone.attributions, atol=1e-9)


def test_top_reasons_are_the_features_that_raise_the_risk_most(
    explainer: Explainer, bank: TrainedBank
) -> None:
    scores = Scorer.score_frame(explainer.scorer, bank.applications)
    riskiest = int(np.argmax(scores))
    explanation = explainer.explain_rows(bank.applications, [riskiest])[0]

    reasons = explanation.top_reasons(5)
    table = reasons_table(explanation, 5)

    assert reasons, "the riskiest application has reasons above the reference"
    assert [a for _, _, a in reasons] == sorted((a for _, _, a in reasons), reverse=True)
    assert all(a > 0 for _, _, a in reasons)
    assert reasons[0][2] == explanation.attributions.max()
    assert reasons[0][0] in table and "raises risk" in table and "log-odds" in table


def test_global_importance_is_the_mean_absolute_attribution_over_a_seeded_sample(
    explainer: Explainer, bank: TrainedBank
) -> None:
    importance = explainer.global_importance(bank.applications, sample=60, seed=1)
    chosen = np.sort(np.random.default_rng(1).choice(len(bank.applications), 60, replace=False))
    rows = explainer.explain_rows(bank.applications, chosen.tolist())
    by_hand = np.mean([np.abs(r.attributions) for r in rows], axis=0)

    np.testing.assert_allclose(importance.mean_abs, by_hand, atol=1e-9)
    ranked = importance.ranked()
    assert ranked[0][0] == importance.features[int(np.argmax(by_hand))]
    assert importance.max_convergence_delta < 1e-6


def test_explain_command_writes_reasons_and_global_importance_as_tables_and_charts(
    bank: TrainedBank, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "applications.parquet"
    bank.applications.to_parquet(data)
    out = tmp_path / "explained"

    code = run_bank_command(
        *bank_command("explain", bank, data, out),
        "--rows",
        "3",
        "11",
        "--sample",
        "80",
    )

    printed = capsys.readouterr().out
    assert code == 0
    for name in ("reasons-row-3", "reasons-row-11", "global-importance"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
        table = pd.read_csv(out / f"{name}.csv")
        assert set(table["feature"]) == set(bank.applications.columns) - {"addr_state", "Class"}
    assert "application at row 11" in printed and "global importance" in printed
    assert "over 80 rows (seed 0)" in printed


def test_explain_command_refuses_a_row_that_does_not_exist(
    bank: TrainedBank, tmp_path: Path
) -> None:
    data = tmp_path / "applications.csv"
    bank.applications.head(10).to_csv(data, index=False)
    with pytest.raises(ConfigError, match=r"--rows 10: .*applications\.csv has only 10 rows"):
        run_bank_command(
            *bank_command("explain", bank, data, tmp_path / "out"),
            "--rows",
            "10",
        )
    assert not (tmp_path / "out").exists()


def test_explaining_needs_no_network(
    bank: TrainedBank, scorer: Scorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("explaining tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    explainer = Explainer(scorer)
    explainer.explain_one(bank.applications.iloc[0].to_dict())
    explainer.global_importance(bank.applications, sample=20)
