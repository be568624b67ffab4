"""A simulation reports AUC from each bank's own local report, never from released metrics."""

from pathlib import Path

import pytest

from fedfin.client.bank_state import BankState
from fedfin.simulations.report_table import bank_table
from fedfin.simulations.simulate import _round_line, local_evaluation, with_local_metrics


def _evaluated(state: Path, federation: str, server_round: int, auc: float, rows: int) -> None:
    BankState(state).append_evaluation(
        {
            "run_id": 1,
            "federation_id": federation,
            "server_round": server_round,
            "encoder_sha256": "0" * 64,
            "test_rows": rows,
            "metrics": {"auc": auc, "ks": auc / 2, "log-loss": 0.2, "brier": 0.05},
        }
    )


@pytest.fixture
def state_dirs(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name / "state" for name in ("bank-a", "bank-b")}
    _evaluated(dirs["bank-a"], "f0", 2, 0.51, 100)  # an earlier federation in the same dirs
    _evaluated(dirs["bank-a"], "f1", 1, 0.60, 100)
    _evaluated(dirs["bank-a"], "f1", 2, 0.70, 100)
    _evaluated(dirs["bank-b"], "f1", 2, 0.55, 300)
    _evaluated(dirs["bank-b"], "f1", 2, 0.65, 300)  # asked again after a server resume
    return dirs


def _server_summary(federation: str | None) -> dict[str, object]:
    """What the server writes to rounds.jsonl: no exact metric of any bank."""
    return {
        "round": 2,
        **({"federation_id": federation} if federation else {}),
        "banks_trained": 2,
        "banks_declined": [],
        "dp_auc_of_round": 1,
        "dp_mean_auc": None,
        "max_epsilon": 0.4,
        "seconds": 1.0,
        "per_bank": {"bank-a": {"epsilon": 0.4, "ledger_seq": 4}, "bank-b": {"epsilon": 0.3}},
    }


def test_each_bank_round_auc_comes_from_its_own_report_of_that_federation(
    state_dirs: dict[str, Path],
) -> None:
    summary = with_local_metrics(_server_summary("f1"), state_dirs)
    per_bank = summary["per_bank"]
    assert per_bank["bank-a"]["auc"] == 0.70 and per_bank["bank-a"]["ledger_seq"] == 4
    assert per_bank["bank-b"]["auc"] == 0.65  # the last evaluation of the round counts
    assert summary["mean_auc"] == pytest.approx(0.675)
    assert summary["weighted_mean_auc"] == pytest.approx((0.70 * 100 + 0.65 * 300) / 400)
    assert summary["worst_bank_auc"] == 0.65
    assert "evaluations.jsonl" in summary["metrics_source"]
    line = _round_line(summary, 2)
    assert "mean AUC 0.6750, worst bank 0.6500 (banks' own reports)" in line


def test_a_bank_without_an_evaluation_of_the_round_has_no_auc(
    state_dirs: dict[str, Path],
) -> None:
    summary = with_local_metrics({**_server_summary("f1"), "round": 1}, state_dirs)
    assert summary["per_bank"]["bank-a"]["auc"] == 0.60
    assert "auc" not in summary["per_bank"]["bank-b"]
    assert summary["worst_bank_auc"] == summary["mean_auc"] == 0.60
    assert local_evaluation(state_dirs["bank-b"], "f9", 2) is None
    # A summary from before rounds carried their federation: the round's last evaluation.
    legacy = with_local_metrics(_server_summary(None), state_dirs)
    assert legacy["per_bank"]["bank-a"]["auc"] == 0.70


def test_the_final_table_says_where_the_federated_auc_comes_from() -> None:
    bank = {
        "train_rows": 1000,
        "auc_public_model": 0.6,
        "auc_federated": 0.7,
        "epsilon_spent": 0.5,
        "epsilon_budget": 1.0,
    }
    table = bank_table({"per_bank": {"bank-a": bank}})
    assert "0.7000" in table and "bank's local report" in table


def test_the_final_table_shows_defaults_intervals_the_served_model_and_calibration() -> None:
    bank = {
        "train_rows": 874,
        "dp_train_rows": 700,
        "test_rows": 292,
        "test_defaults": 17,
        "auc_public_model": 0.6971,
        "auc_public_model_ci": [0.555, 0.839],
        "auc_federated": 0.6845,
        "auc_federated_ci": [0.536, 0.833],
        "served": "public",
        "validation_auc_public_model": 0.82,
        "validation_auc_federated": 0.81,
        "auc_served": 0.6971,
        "auc_served_ci": [0.555, 0.839],
        "mean_pd_served": 0.0601,
        "default_rate_test": 0.0582,
        "epsilon_spent": 0.996,
        "epsilon_budget": 1.0,
    }
    table = bank_table({"per_bank": {"bank-a": bank}})
    row = table.splitlines()[2]
    assert "700" in row and "292 (17)" in row
    assert "0.6971 [0.555-0.839]" in row and "0.6845 [0.536-0.833]" in row
    assert "public (0.820/0.810)" in row and "0.0601" in row and "0.0582" in row
    assert "DeLong" in table
