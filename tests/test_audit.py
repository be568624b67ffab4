"""`fedfin audit` proves what each bank spent from its own ledger, and fails loudly when not."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.accounting import DpEvent, epsilon_spent
from common.audit import audit_path, dp_accounting_epsilon
from common.ledger import PrivacyLedger

ROOT = Path(__file__).resolve().parents[1]


def _bank(state: Path, rounds: int, budget: float = 2.0, lie: float = 1.0) -> None:
    """A ledger like a bank writes: cumulative ε recorded with fedfin's PRV accountant."""
    ledger = PrivacyLedger(state)
    events: list[DpEvent] = []
    for r in range(1, rounds + 1):
        event = DpEvent(2.0, 0.05, 40, 1.0)
        events.append(event)
        ledger.append(
            {
                "bank": state.parent.name,
                "run_id": 7,
                "server_round": r,
                "kind": "train",
                "dp_events": [event.__dict__],
                "delta": 1e-5,
                "epsilon_budget": budget,
                "epsilon_cumulative": lie * epsilon_spent(events, 1e-5),
            }
        )


def _audit(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulations.cli", "audit", str(path), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


def test_independent_accountant_agrees_with_the_live_one() -> None:
    events = [DpEvent(1.3, 1 / 14, 28, 1.0), DpEvent(2.0, 1 / 14, 28, 1.0)]
    prv = epsilon_spent(events, 1e-5, "prv")
    pld = dp_accounting_epsilon(events, 1e-5, "pld")
    rdp = dp_accounting_epsilon(events, 1e-5, "rdp")
    assert pld == pytest.approx(prv, rel=0.02)
    assert rdp > pld  # RDP overstates


def test_audit_of_a_run_dir_covers_every_bank(tmp_path: Path) -> None:
    for name in ("bank-00", "bank-01"):
        _bank(tmp_path / "banks" / name / "state", rounds=3)
    result = _audit(tmp_path, "--json", str(tmp_path / "audit.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["ok"] and len(report["banks"]) == 2
    for bank in report["banks"]:
        assert bank["train_releases"] == 3 and bank["chain_ok"]
        assert bank["epsilon_pld"] == pytest.approx(bank["epsilon_recorded"], rel=0.02)
        assert bank["remaining"] == pytest.approx(2.0 - bank["epsilon_recorded"])
    assert (tmp_path / "privacy-audit.png").read_bytes()[:4] == b"\x89PNG"
    assert "bank-00" in result.stdout and "bank-01" in result.stdout


def test_a_broken_chain_fails_the_audit(tmp_path: Path) -> None:
    state = tmp_path / "bank" / "state"
    _bank(state, rounds=3)
    lines = (state / "ledger.jsonl").read_text().splitlines(keepends=True)
    (state / "ledger.jsonl").write_text(lines[0] + lines[2])
    result = _audit(state)
    assert result.returncode == 5
    assert result.stderr.count("\n") == 1 and "chain broken" in result.stderr


def test_an_understated_epsilon_fails_the_audit(tmp_path: Path) -> None:
    state = tmp_path / "bank" / "state"
    _bank(state, rounds=3, lie=0.5)
    result = _audit(state)
    assert result.returncode == 4
    assert "UNDERSTATED" in result.stdout
    assert [a.understated for a in audit_path(state)] == [True]


def test_an_exceeded_budget_fails_the_audit(tmp_path: Path) -> None:
    state = tmp_path / "bank" / "state"
    _bank(state, rounds=6, budget=0.5)
    assert _audit(state).returncode == 4


def test_a_path_without_ledgers_is_one_clear_error(tmp_path: Path) -> None:
    result = _audit(tmp_path)
    assert result.returncode == 5
    assert result.stderr.strip().count("\n") == 0 and "ledger.jsonl" in result.stderr
    assert "Traceback" not in result.stderr
