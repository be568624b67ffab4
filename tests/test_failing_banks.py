"""5 banks; in round 2 two fail mid-training and one is slower than the round timeout."""

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fedfin.common.ledger import PrivacyLedger
from fedfin.common.protocol import REASON_DECLINED
from tests.harness.processes import flower_env, run_to_end

TIMEOUT = 60.0  # round 1 starts Ray workers and torch on a busy 2-core machine


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "run"
    command = [sys.executable, "-m", "tests.harness.faulty_simulation", str(out), str(TIMEOUT)]
    code = run_to_end(command, flower_env(tmp / "flwr-home"), tmp / "log", timeout=400)
    assert code == 0, (tmp / "log").read_text()[-4000:]
    return out


def _round(run: Path, number: int) -> dict[str, Any]:
    rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
    return next(r for r in rounds if r["round"] == number)


def test_the_round_completes_with_the_banks_that_answered(run: Path) -> None:
    second = _round(run, 2)
    assert second["aggregated"] and second["banks_trained"] == 2
    trained = sorted(b for b, row in second["per_bank"].items() if row["trained"])
    assert trained == ["bank-00", "bank-02"]
    assert _round(run, 1)["banks_trained"] == 5


def test_failures_and_the_timeout_are_in_the_rounds_report(run: Path) -> None:
    declined = " ".join(_round(run, 2)["banks_declined"])
    assert f"bank-01: declined: {REASON_DECLINED}" in declined  # no error text leaves a bank
    assert f"bank-03: declined: {REASON_DECLINED}" in declined
    assert "bank-04: no reply before the round timeout" in declined


def test_failed_banks_ledgers_show_no_release_for_that_round_but_its_charge(run: Path) -> None:
    """They failed mid-training: nothing was sent, and what ran stays paid."""
    for bank in ("bank-01", "bank-03"):
        entries = PrivacyLedger(run / "banks" / bank / "state").entries()
        assert [e["server_round"] for e in entries if e["kind"] == "train"] == [1]
        assert [e["server_round"] for e in entries if e["kind"] == "charge"] == [1, 2]
