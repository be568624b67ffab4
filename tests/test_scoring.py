"""Scoring inside the bank: the fast path gives the schema's and the model's answer, quickly.

`bank` and `scorer` (bank 0 after one real DP round) come from tests/conftest.py.
"""

import math
import re
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfin.client.scoring import Scorer
from fedfin.common.config import ModelConfig
from fedfin.common.errors import CheckpointError, ConfigError, DataError, FedfinError
from fedfin.common.model import build_model
from fedfin.common.tensors import predict_proba
from tests.conftest import TrainedBank, bank_command, run_bank_command


def _reference(scorer: Scorer, frame: pd.DataFrame) -> np.ndarray:
    """What training and evaluation compute: schema.transform, then the torch model."""
    return predict_proba(scorer.model, scorer.schema.transform(frame, "ref", require_label=False))


def test_one_application_scores_as_the_schema_and_the_model_do_to_1e_6(
    scorer: Scorer, bank: TrainedBank
) -> None:
    rows = bank.applications.head(40)
    for i, application in enumerate(rows.to_dict("records")):
        expected = _reference(scorer, rows.iloc[[i]])[0]
        assert scorer.score_one(application) == pytest.approx(expected, abs=1e-6)


def test_a_table_scores_as_the_schema_and_the_model_do_to_1e_6(
    scorer: Scorer, bank: TrainedBank
) -> None:
    scores = scorer.score_frame(bank.applications)

    np.testing.assert_allclose(scores, _reference(scorer, bank.applications), atol=1e-6, rtol=0)
    assert scores.shape == (len(bank.applications),)
    assert 0.0 < scores.min() <= scores.max() < 1.0


def test_every_row_scores_the_same_alone_as_in_a_table(scorer: Scorer, bank: TrainedBank) -> None:
    frame = bank.applications.copy()
    frame["annual_inc"] = frame["annual_inc"].astype("float64")
    frame.loc[::3, "annual_inc"] = np.nan  # missing values: imputed the same in both paths
    frame.loc[1::4, "sub_grade"] = None
    frame.loc[2::5, "emp_length"] = "emp_unheard_of"  # an unknown category

    alone = [scorer.score_one(row) for row in frame.to_dict("records")]

    np.testing.assert_allclose(alone, scorer.score_frame(frame), atol=1e-6, rtol=0)


def test_unusual_but_valid_values_are_read_as_the_schema_reads_them(
    scorer: Scorer, bank: TrainedBank
) -> None:
    row = bank.applications.iloc[0].to_dict()
    variants = [
        {**row, "int_rate": str(row["int_rate"])},  # a number sent as text
        {**row, "funded_amnt": np.int32(row["funded_amnt"])},  # numpy scalars
        {**row, "annual_inc": np.float32(row["annual_inc"])},
        {**row, "term": 36},  # a category that is not text: its string form
        {**row, "revol_util": pd.NA},
    ]
    for application in variants:
        frame = pd.DataFrame([application])
        if application["revol_util"] is pd.NA:  # one-row tables reject a column with no value
            expected = scorer.score_frame(pd.concat([frame, bank.applications.head(3)]))[0]
        else:
            expected = _reference(scorer, frame)[0]
        assert scorer.score_one(application) == pytest.approx(expected, abs=1e-6)


def test_bad_applications_are_refused_with_the_schemas_message(
    scorer: Scorer, bank: TrainedBank
) -> None:
    row = bank.applications.iloc[0].to_dict()
    bad = {
        "missing": {k: v for k, v in row.items() if k != "int_rate"},
        "text": {**row, "annual_inc": "twelve"},  # ("n/a" is a missing value: imputed)
        "inf": {**row, "revol_util": math.inf},
        "bool": {**row, "acc_now_delinq": True},  # True/False is a category, never a number
    }
    for application in bad.values():
        with pytest.raises(DataError) as schema_error:
            scorer.schema.transform(pd.DataFrame([application]), "request", require_label=False)
        with pytest.raises(DataError) as fast_error:
            scorer.score_one(application, "request")
        assert str(fast_error.value) == str(schema_error.value)
    assert "'int_rate' is missing" in str(_error(scorer, bad["missing"]))
    assert "'annual_inc' must be numeric, found 'twelve'" in str(_error(scorer, bad["text"]))
    assert "'revol_util' contains Inf" in str(_error(scorer, bad["inf"]))
    with pytest.raises(DataError, match="expected a mapping"):
        scorer.score_one([1, 2, 3])  # type: ignore[arg-type]


def _error(scorer: Scorer, application: dict[str, object]) -> DataError:
    with pytest.raises(DataError) as caught:
        scorer.score_one(application, "request")
    return caught.value


def test_extra_fields_such_as_the_label_are_ignored_as_in_a_table(
    scorer: Scorer, bank: TrainedBank
) -> None:
    row = bank.applications.iloc[0].to_dict()
    features = {name: row[name] for name in scorer.feature_names}

    assert scorer.score_one(row) == scorer.score_one(features)


def test_the_fold_matches_torch_for_deeper_encoders_and_a_hidden_layer_head(
    scorer: Scorer, bank: TrainedBank
) -> None:
    model = build_model(scorer.schema, ModelConfig(hidden_sizes=(16, 8, 4), head_hidden=5), 7)
    deep = Scorer(scorer.schema, model)
    rows = bank.applications.head(50)

    alone = [deep.score_one(row) for row in rows.to_dict("records")]

    np.testing.assert_allclose(alone, _reference(deep, rows), atol=1e-6, rtol=0)


def test_loading_refuses_a_missing_state_dir_head_or_encoder_naming_the_path(
    bank: TrainedBank, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match="nowhere: bank state directory not found"):
        Scorer.load(tmp_path / "nowhere", bank.encoder_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"head\.json: private head file missing"):
        Scorer.load(tmp_path / "empty", bank.encoder_dir)
    with pytest.raises(CheckpointError, match="no-encoder: encoder checkpoint directory"):
        Scorer.load(bank.state_dir, tmp_path / "no-encoder")


def test_one_application_is_scored_well_under_a_millisecond(
    scorer: Scorer, bank: TrainedBank
) -> None:
    """A loose guard (p50 only, busy CI); benchmarks/scoring_speed.py measures p99."""
    applications = bank.applications.to_dict("records")
    timings = []
    for i in range(3_000):
        started = time.perf_counter()
        scorer.score_one(applications[i % len(applications)])
        timings.append(time.perf_counter() - started)

    assert float(np.median(timings[500:])) < 1e-3


def test_scoring_needs_no_network(
    bank: TrainedBank, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("scoring tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    scorer = Scorer.load(bank.state_dir, bank.encoder_dir)
    scorer.score_one(bank.applications.iloc[0].to_dict())
    scorer.score_frame(bank.applications)
    bank.applications.to_csv(tmp_path / "apps.csv", index=False)
    command = bank_command("score", bank, tmp_path / "apps.csv", tmp_path / "out.csv")
    assert run_bank_command(*command) == 0


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_score_command_writes_the_rows_with_probability_and_decision(
    bank: TrainedBank,
    scorer: Scorer,
    tmp_path: Path,
    suffix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = tmp_path / f"applications{suffix}"
    out = tmp_path / f"scored{suffix}"
    if suffix == ".csv":
        bank.applications.to_csv(data, index=False)
    else:
        bank.applications.to_parquet(data)

    code = run_bank_command(*bank_command("score", bank, data, out), "--threshold", "0.05")

    scored = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert code == 0
    assert list(scored.columns) == [
        *bank.applications.columns,
        "default_probability",
        "decision",
        "reason_codes",
        "imputed",
        "unseen_categories",
    ]
    expected = scorer.score_frame(bank.applications)
    np.testing.assert_allclose(scored["default_probability"], expected, atol=1e-6, rtol=0)
    assert (scored["decision"] == np.where(expected >= 0.05, "decline", "approve")).all()
    pd.testing.assert_frame_equal(
        scored[bank.applications.columns],
        bank.applications,
        check_dtype=False,
        check_column_type=False,
    )
    assert f"scored {len(bank.applications)} applications" in capsys.readouterr().out


def test_score_command_refuses_bad_input_with_one_error_naming_it(
    bank: TrainedBank, tmp_path: Path
) -> None:
    base: list[str | Path] = ["score", "--state-dir", bank.state_dir, "--encoder", bank.encoder_dir]
    good = tmp_path / "good.csv"
    bank.applications.to_csv(good, index=False)
    broken = tmp_path / "broken.csv"
    bank.applications.assign(annual_inc="about 50k").to_csv(broken, index=False)
    taken = tmp_path / "taken.csv"
    bank.applications.assign(default_probability=0.5).to_csv(taken, index=False)
    cases: list[tuple[list[str | Path], type[FedfinError], str]] = [
        (
            [*base, "--data", good, "--out", tmp_path / "out.txt"],
            ConfigError,
            "out.txt: use a .csv or .parquet",
        ),
        (
            [*base, "--data", broken, "--out", tmp_path / "o.csv"],
            DataError,
            "broken.csv: column 'annual_inc' must be numeric",
        ),
        (
            [*base, "--data", taken, "--out", tmp_path / "o.csv"],
            DataError,
            "taken.csv: already has a column 'default_probability'",
        ),
        (
            [*base, "--data", tmp_path / "absent.csv", "--out", tmp_path / "o.csv"],
            DataError,
            "absent.csv: file not found",
        ),
    ]
    for argv, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            run_bank_command(*argv)
    assert not (tmp_path / "o.csv").exists()
