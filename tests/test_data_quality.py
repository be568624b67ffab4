"""Data quality inside the bank (issue 17): a check against the public source before any
budget is spent, and drift watched while scoring, on real Lending Club loans.

The shifted data is real: loans of another grade mix (sub_grade D to G only) than the bank's;
the unshifted data is the bank's own held-out rows, or public rows the profile never saw.
"""

import json
import logging
import math
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from fedfin.client.bank_settings import BankSettings
from fedfin.client.data_check import check_frame, check_table
from fedfin.client.drift import (
    MIN_ROWS,
    DriftMonitor,
    load_drift_reference,
    write_drift_reference,
)
from fedfin.client.runner_cli import _log_data_check
from fedfin.client.runner_config import RunnerConfig, load_runner_config
from fedfin.client.scoring import Scorer
from fedfin.client.serve import create_app
from fedfin.common.checkpoint import EncoderCheckpoint
from fedfin.common.config import PretrainConfig, PrivacyPolicy
from fedfin.common.partition import split_train_test
from fedfin.common.profile import DataProfile, load_public_profile
from fedfin.common.psi import category_groups, psi, psi_verdict
from fedfin.common.schema import FeatureSchema
from fedfin.simulations.cli import main
from fedfin.simulations.simulate import bank_check_lines
from tests.conftest import Pretrained, TrainedBank, score_table
from tests.harness.bank_runner_deployment import runner_config_text

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOW_GRADES = ("D", "E", "F", "G")


@pytest.fixture(scope="module")
def schema(checkpoint: EncoderCheckpoint) -> FeatureSchema:
    return checkpoint.schema


@pytest.fixture(scope="module")
def profile(pretrained: Pretrained, schema: FeatureSchema) -> DataProfile:
    """The public profile as a bank reads it from the pretrained checkpoint."""
    return load_public_profile(pretrained.checkpoint_dir, schema)


def _bank_rows(pretrained: Pretrained, index: int) -> pd.DataFrame:
    bank = pretrained.split.banks[index]
    return pd.concat([bank.train, bank.test], ignore_index=True)


def _low_grade_loans(pretrained: Pretrained, rows: int) -> pd.DataFrame:
    """Real loans of banks 1-4 with sub_grade D1-G5 only: another grade mix than bank 0's."""
    others = pd.concat([_bank_rows(pretrained, i) for i in range(1, 5)], ignore_index=True)
    low = others[others["sub_grade"].str[0].isin(LOW_GRADES)]
    return low.sample(n=rows, random_state=0).reset_index(drop=True)


# --- the statistic ------------------------------------------------------------------------


def test_psi_is_the_hand_computed_sum_with_empty_bins_floored_at_1e_4() -> None:
    by_hand = (0.3 - 0.5) * math.log(0.3 / 0.5) + 0.0 + (0.4 - 0.2) * math.log(0.4 / 0.2)
    assert psi([0.5, 0.3, 0.2], [0.3, 0.3, 0.4]) == pytest.approx(by_hand)  # 0.2408
    assert psi([50, 30, 20], [3, 3, 4]) == pytest.approx(by_hand)  # counts or proportions
    empty = (0.4 - 0.5) * math.log(0.4 / 0.5) + (0.1 - 1e-4) * math.log(0.1 / 1e-4)
    assert psi([0.5, 0.5, 0.0], [0.5, 0.4, 0.1]) == pytest.approx(empty)
    assert psi([0.2, 0.8], [0.2, 0.8]) == 0.0


def test_verdicts_follow_the_usual_psi_thresholds() -> None:
    assert [psi_verdict(v) for v in (0.0, 0.0999, 0.1, 0.2499, 0.25, 3.0)] == [
        "ok",
        "ok",
        "watch",
        "watch",
        "act",
        "act",
    ]


def test_many_categories_merge_into_at_most_ten_groups_of_a_tenth_each() -> None:
    shares = np.full(35, 1 / 35)  # 35 sub-grades
    groups = category_groups(shares)
    held = np.bincount(groups, weights=shares)
    assert len(held) <= 10 and held.min() >= 0.1 - 1e-9
    assert list(groups) == sorted(groups)  # consecutive: neighbouring grades together
    assert list(category_groups([0.5, 0.5])) == [0, 1]


# --- fedfin check-data ----------------------------------------------------------------------


def test_the_public_profile_is_saved_beside_the_encoder_from_the_schemas_rows(
    pretrained: Pretrained, profile: DataProfile
) -> None:
    assert profile.rows == pretrained.result.metrics["fit_rows"]
    fit_rows, _ = split_train_test(
        pretrained.split.public, pretrained.source.label, PretrainConfig().holdout_fraction, 0
    )
    assert profile.label_rate == pytest.approx((fit_rows["Class"] == "bad").mean())
    revol = next(p for p in profile.numeric if p.name == "revol_util")
    inside = fit_rows["revol_util"].between(revol.low, revol.high).mean()
    assert inside == pytest.approx(0.99, abs=0.005)  # the 0.5%-99.5% quantiles


def test_public_rows_the_profile_never_saw_pass_the_check(
    pretrained: Pretrained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, holdout = split_train_test(
        pretrained.split.public, pretrained.source.label, PretrainConfig().holdout_fraction, 0
    )
    data = tmp_path / "public-holdout.csv"
    holdout.to_csv(data, index=False)
    out = tmp_path / "check"

    encoder = str(pretrained.checkpoint_dir)
    code = main(["check-data", "--encoder", encoder, "--data", str(data), "--out", str(out)])

    printed = capsys.readouterr().out
    assert code == 0
    assert "data check OK" in printed and "PSI < 0.1 ok" in printed
    report = json.loads((out / "data-check.json").read_text())
    assert report["verdict"] == "ok" and report["rows"] == len(holdout)
    assert all(f["verdict"] == "ok" for f in report["features"])
    assert report["label_rate"] == pytest.approx((holdout["Class"] == "bad").mean())
    assert (out / "data-check.png").read_bytes()[:8] == PNG_MAGIC


def test_another_grade_mix_is_flagged_act_on_sub_grade_and_int_rate(
    pretrained: Pretrained, profile: DataProfile, schema: FeatureSchema
) -> None:
    check = check_frame(_low_grade_loans(pretrained, 400), schema, profile, "low grades")

    verdicts = {f.name: f.verdict for f in check.features}
    assert verdicts["sub_grade"] == "act" and verdicts["int_rate"] == "act"
    assert check.verdict == "act"
    assert {f.name for f in check.worst_features(2)} == {"sub_grade", "int_rate"}
    assert check.summary_line().startswith("data check ACT: 400 rows; worst: ")
    table = check_table(check)
    assert "PSI < 0.1 ok, 0.1 <= PSI < 0.25 watch, PSI >= 0.25 act" in table
    assert re.search(r"^sub_grade +categorical .* act$", table, re.MULTILINE)


def test_values_the_public_pool_never_had_are_flagged_even_where_psi_is_low(
    pretrained: Pretrained, profile: DataProfile, schema: FeatureSchema
) -> None:
    rows = _bank_rows(pretrained, 0)
    revol = next(p for p in profile.numeric if p.name == "revol_util")
    beyond = np.arange(len(rows)) % 12 == 0  # 8% of the loans
    rows.loc[beyond, "revol_util"] = revol.high * 3  # far above any public value
    rows.loc[np.arange(len(rows)) % 3 == 0, "sub_grade"] = "Z9"  # a third: unseen grade

    features = {f.name: f for f in check_frame(rows, schema, profile, "bank 0").features}

    revol_check = features["revol_util"]
    assert revol_check.out_of_range is not None and revol_check.out_of_range > 0.08
    assert revol_check.psi < 0.1 and revol_check.verdict == "watch"
    assert "out of range" in revol_check.why
    assert features["sub_grade"].unseen == pytest.approx(1 / 3, abs=0.01)
    assert features["sub_grade"].verdict == "act"


def test_simulate_and_the_runner_log_each_banks_check_before_any_round(
    pretrained: Pretrained,
    profile: DataProfile,
    schema: FeatureSchema,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    lines = bank_check_lines(pretrained.split, schema, profile)
    assert [line.split(":")[0] for line in lines] == [b.name for b in pretrained.split.banks]
    assert all(": data check " in line and " rows" in line for line in lines)

    data = tmp_path / "bank-00.csv"
    _bank_rows(pretrained, 0).to_csv(data, index=False)
    bank = BankSettings("bank-00", data, tmp_path / "state", PrivacyPolicy())
    config = RunnerConfig(tmp_path / "runner.toml", "127.0.0.1:9094", (), bank)
    text = runner_config_text(
        9094,
        None,
        [("a/b", "1", "0" * 64)],
        {"bank-name": "bank-00", "data-path": str(data), "state-dir": "state"},
    )
    (tmp_path / "runner.toml").write_text(
        text.replace(
            "[[runner.allow]]",
            f'public-encoder = "{pretrained.checkpoint_dir}"\n\n[[runner.allow]]',
        )
    )
    read = load_runner_config(tmp_path / "runner.toml")
    assert read.public_encoder == pretrained.checkpoint_dir
    with caplog.at_level(logging.INFO, logger="fedfin.runner"):
        _log_data_check(config)
        _log_data_check(replace(config, public_encoder=pretrained.checkpoint_dir))
    assert "data check skipped: no [runner] public-encoder" in caplog.messages[0]
    assert caplog.messages[1] == lines[0]  # the same line the simulation prints for bank-00


# --- drift while scoring --------------------------------------------------------------------


@pytest.fixture(scope="module")
def watched_bank(bank: TrainedBank, tmp_path_factory: pytest.TempPathFactory) -> TrainedBank:
    """Bank 0 with its drift reference (what choose-model writes), in a copy of its state."""
    root = tmp_path_factory.mktemp("watched-bank")
    shutil.copytree(bank.state_dir, root / "state")
    write_drift_reference(root / "state", bank.encoder_dir, bank.state_dir.parent / "data", 0.25)
    return TrainedBank(root / "state", bank.encoder_dir, bank.applications)


def _score(bank: TrainedBank, frame: pd.DataFrame, tmp_path: Path) -> dict[str, object]:
    score_table(bank, frame, tmp_path, "--reasons", "0")
    report: dict[str, object] = json.loads((tmp_path / "scored-drift.json").read_text())
    return report


def test_scoring_the_banks_own_held_out_rows_is_not_flagged(
    watched_bank: TrainedBank, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert len(watched_bank.applications) >= MIN_ROWS

    report = _score(watched_bank, watched_bank.applications, tmp_path)

    assert report["verdict"] == "ok", report
    assert report["score"]["verdict"] == "ok"  # type: ignore[index]
    assert "drift against the bank's training reference" in capsys.readouterr().out


def test_scoring_another_grade_mix_is_flagged_on_inputs_and_scores(
    watched_bank: TrainedBank, pretrained: Pretrained, tmp_path: Path
) -> None:
    report = _score(watched_bank, _low_grade_loans(pretrained, 300), tmp_path)

    features = report["features"]
    assert report["verdict"] == "act"
    assert features["sub_grade"]["verdict"] == "act"  # type: ignore[index]
    assert features["int_rate"]["verdict"] == "act"  # type: ignore[index]
    assert report["score"]["verdict"] == "act"  # type: ignore[index]


def test_serve_reports_drift_at_get_drift_and_warns_once_per_threshold(
    watched_bank: TrainedBank, pretrained: Pretrained, caplog: pytest.LogCaptureFixture
) -> None:
    scorer = Scorer.load(watched_bank.state_dir, watched_bank.encoder_dir)
    reference, _ = load_drift_reference(watched_bank.state_dir, scorer.card["model_version"])
    assert reference is not None
    client = TestClient(create_app(scorer, drift=DriftMonitor(reference)))
    same = watched_bank.applications.drop(columns=["Class"]).to_dict(orient="records")
    shifted = _low_grade_loans(pretrained, 300).drop(columns=["Class"]).to_dict(orient="records")

    with caplog.at_level(logging.WARNING, logger="fedfin.bank"):
        assert client.post("/score", json=same).status_code == 200
        unshifted = client.get("/drift").json()
        warned_before = list(caplog.messages)
        for start in range(0, 900, 150):  # 900 low-grade applications, six requests
            batch = shifted[start % 300 : start % 300 + 150]
            assert client.post("/score", json=batch).status_code == 200
    after = client.get("/drift").json()

    assert unshifted["watching"] and unshifted["verdict"] == "ok" and not warned_before
    assert unshifted["rows"] == len(same)
    assert after["rows"] == len(same) + 900 and after["verdict"] == "act"
    assert after["features"]["sub_grade"]["verdict"] == "act"
    warnings = [m for m in caplog.messages if "sub_grade" in m]
    assert len(warnings) == 2  # once at watch, once at act, then never again: not per request
    assert sum("score distribution" in m for m in caplog.messages) <= 2


def test_serve_and_score_count_the_same_applications_alike(
    watched_bank: TrainedBank, pretrained: Pretrained
) -> None:
    scorer = Scorer.load(watched_bank.state_dir, watched_bank.encoder_dir)
    reference, _ = load_drift_reference(watched_bank.state_dir, scorer.card["model_version"])
    assert reference is not None
    frame = pd.concat([watched_bank.applications, _low_grade_loans(pretrained, 100)])
    probabilities = scorer.score_frame(frame)
    by_table, by_rows = DriftMonitor(reference), DriftMonitor(reference)
    by_table.add_frame(frame, probabilities, "applications")
    by_rows.add_rows(frame.to_dict(orient="records"), list(probabilities))
    assert by_rows.report() == by_table.report()
    assert by_table.report()["score"]["psi"] > 0


def test_without_a_reference_for_the_served_model_drift_is_not_watched_and_says_why(
    watched_bank: TrainedBank, tmp_path: Path
) -> None:
    reference, note = load_drift_reference(tmp_path, "federated/encoder-x/head-y/uncalibrated")
    assert reference is None and "run `fedfin choose-model` first" in note
    reference, note = load_drift_reference(watched_bank.state_dir, "another/model")
    assert reference is None and "made for another model" in note
