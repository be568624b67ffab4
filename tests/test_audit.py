"""`fedfin audit` proves what each bank spent from its own ledger, and fails loudly when not."""

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedfin.common.accounting import DpEvent, epsilon_spent
from fedfin.common.audit import audit_path, dp_accounting_epsilon
from fedfin.common.ledger import PrivacyLedger
from fedfin.common.ledger_anchors import read_anchors
from fedfin.simulations.cli import main

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


def _audit_process(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """The real console command in its own process, run beside the audited dir."""
    return subprocess.run(
        [sys.executable, "-m", "fedfin.simulations.cli", "audit", str(path), *extra],
        capture_output=True,
        text=True,
        cwd=path.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )


def _audit(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """`fedfin audit` through its entry function, run beside the audited dir (its default
    plot lands there): the same code as the console command without a new interpreter."""
    out, err = io.StringIO(), io.StringIO()
    here = Path.cwd()
    os.chdir(path.parent)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["audit", str(path), *extra])
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["fedfin", "audit"], code, out.getvalue(), err.getvalue())


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
    result = _audit_process(tmp_path, "--json", str(tmp_path / "audit.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["ok"] and len(report["banks"]) == 2
    for bank in report["banks"]:
        assert bank["train_releases"] == 3 and bank["chain_ok"]
        assert bank["epsilon_pld"] == pytest.approx(bank["epsilon_recorded"], rel=0.02)
        assert bank["remaining"] == pytest.approx(2.0 - bank["epsilon_recorded"])
    assert (tmp_path / "privacy-audit.png").read_bytes()[:4] == b"\x89PNG"  # beside --json
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
    assert result.returncode == 2  # a wrong PATH, not a broken ledger (5)
    assert result.stderr.strip().count("\n") == 0 and "ledger.jsonl" in result.stderr
    assert "Traceback" not in result.stderr


# --- Ledgers anchored outside the bank (issue 12) -------------------------------------------

BANK = "bank-00"


def _sha256_of_entry(entry: dict[str, object]) -> str:
    """The ledger's hash rule, written out here: sha256 of sorted compact JSON without `hash`."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _four_rounds(state: Path) -> list[dict[str, object]]:
    """A bank's ledger of 4 train releases with DP events, written by the real ledger."""
    ledger = PrivacyLedger(state)
    events: list[DpEvent] = []
    for r in range(1, 5):
        event = DpEvent(1.5, 0.05, 60, 1.0)
        events.append(event)
        ledger.append(
            {
                "bank": BANK,
                "run_id": 7,
                "federation_id": "f1",
                "server_round": r,
                "kind": "train",
                "dp_events": [event.__dict__],
                "delta": 1e-5,
                "epsilon_budget": 5.0,
                "epsilon_cumulative": epsilon_spent(events, 1e-5),
            }
        )
    entries = [json.loads(line) for line in (state / "ledger.jsonl").read_text().splitlines()]
    assert [_sha256_of_entry(e) for e in entries] == [e["hash"] for e in entries]
    return entries


def _anchors_file(path: Path, entries: list[dict[str, object]]) -> Path:
    """What the server recorded: one line per reply, with seq and hash computed here."""
    lines = [
        json.dumps(
            {
                "bank": BANK,
                "node_id": 11,
                "kind": "train",
                "server_round": int(str(e["server_round"])),
                "seq": int(str(e["seq"])),
                "head": _sha256_of_entry(e),
            }
        )
        for e in entries
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def anchored(tmp_path: Path) -> tuple[Path, Path, list[dict[str, object]]]:
    state = tmp_path / "banks" / BANK / "state"
    entries = _four_rounds(state)
    return state, _anchors_file(tmp_path / "ledger-anchors.jsonl", entries), entries


def test_an_untouched_ledger_matches_the_servers_anchors(
    anchored: tuple[Path, Path, list[dict[str, object]]],
) -> None:
    state, anchors, _ = anchored
    result = _audit(state, "--anchors", str(anchors))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "anchors: 4 recorded replies" in result.stdout
    [audit] = audit_path(state, read_anchors(anchors))
    assert audit.ok and audit.anchors_checked == 4 and not audit.anchor_problems
    elsewhere = anchors.read_text().replace(f'"{BANK}"', '"bank-99"')
    anchors.write_text(elsewhere)
    result = _audit(state, "--anchors", str(anchors))
    assert result.returncode == 0 and "bank-00: note: no anchor names this bank" in result.stdout
    assert "anchors also name banks with no ledger here (not audited): bank-99" in result.stdout


def test_keeping_the_first_two_of_four_lines_is_flagged_by_the_anchors(
    anchored: tuple[Path, Path, list[dict[str, object]]],
) -> None:
    state, anchors, _ = anchored
    lines = (state / "ledger.jsonl").read_text().splitlines(keepends=True)
    (state / "ledger.jsonl").write_text("".join(lines[:2]))
    assert _audit(state).returncode == 0  # the chain alone cannot tell: the bug this fixes
    result = _audit(state, "--anchors", str(anchors))
    assert result.returncode == 5
    assert "TRUNCATED" in result.stdout and "ledger broken for bank-00" in result.stderr
    problems = audit_path(state, read_anchors(anchors))[0].anchor_problems
    assert len(problems) == 2 and all("ledger ends at entry 2" in p for p in problems)


def test_deleting_the_last_two_lines_is_flagged_by_anchors_from_a_run_dir(
    anchored: tuple[Path, Path, list[dict[str, object]]], tmp_path: Path
) -> None:
    state, anchors, _ = anchored
    server_dir = tmp_path / "run" / "server"
    server_dir.mkdir(parents=True)
    (server_dir / "ledger-anchors.jsonl").write_bytes(anchors.read_bytes())
    lines = (state / "ledger.jsonl").read_text().splitlines(keepends=True)
    del lines[-2:]
    (state / "ledger.jsonl").write_text("".join(lines))
    [audit] = audit_path(tmp_path / "banks", read_anchors(tmp_path / "run"))
    assert audit.ledger_broken and not audit.chain_broken
    assert [p.split(":")[0] for p in audit.anchor_problems] == ["truncated", "truncated"]


def test_a_ledger_emptied_of_every_line_is_flagged_by_its_anchors(
    anchored: tuple[Path, Path, list[dict[str, object]]],
) -> None:
    state, anchors, _ = anchored
    (state / "ledger.jsonl").write_text("")
    [audit] = audit_path(state, read_anchors(anchors))
    assert audit.bank == BANK and audit.anchors_checked == 4 and len(audit.anchor_problems) == 4


def test_a_last_line_cut_mid_way_fails_the_audit_even_without_anchors(
    anchored: tuple[Path, Path, list[dict[str, object]]],
) -> None:
    state, anchors, _ = anchored
    raw = (state / "ledger.jsonl").read_bytes()
    (state / "ledger.jsonl").write_bytes(raw[: len(raw) - 40])
    result = _audit(state)
    assert result.returncode == 5
    assert "PARTIAL LAST LINE" in result.stdout and "partial line after entry 3" in result.stdout
    [audit] = audit_path(state, read_anchors(anchors))
    assert audit.partial_tail and "ledger ends at entry 3" in audit.anchor_problems[0]


def test_a_rebuilt_chain_with_smaller_steps_passes_the_chain_but_not_the_anchors(
    anchored: tuple[Path, Path, list[dict[str, object]]],
) -> None:
    state, anchors, entries = anchored
    rebuilt = [dict(e) for e in entries[:2]]
    events = [DpEvent(**e) for entry in rebuilt for e in entry["dp_events"]]  # type: ignore[attr-defined]
    for original in entries[2:]:
        event = DpEvent(1.5, 0.05, 6, 1.0)  # a tenth of the steps really taken
        events.append(event)
        entry = {
            **original,
            "dp_events": [event.__dict__],
            "epsilon_cumulative": epsilon_spent(events, 1e-5),  # consistent with the new events
            "prev_hash": rebuilt[-1]["hash"],
        }
        entry["hash"] = _sha256_of_entry(entry)
        rebuilt.append(entry)
    lines = [json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in rebuilt]
    (state / "ledger.jsonl").write_text("".join(lines))
    assert _sha256_of_entry(rebuilt[3]) != entries[3]["hash"]
    plain = audit_path(state)[0]
    assert plain.ok, plain.chain_problems + plain.problems  # the chain and ε look fine
    result = _audit(state, "--anchors", str(anchors))
    assert result.returncode == 5 and "REWRITTEN" in result.stdout
    [audit] = audit_path(state, read_anchors(anchors))
    assert [p.split(":")[0] for p in audit.anchor_problems] == ["rewritten", "rewritten"]
    assert "entry 3" in audit.anchor_problems[0] and "entry 4" in audit.anchor_problems[1]


def _train(
    ledger: PrivacyLedger, kind: str, events: list[dict[str, object]], **extra: object
) -> int:
    """Append one entry as a bank would; ε here is not what these tests are about."""
    entry = ledger.append(
        {
            "bank": BANK,
            "run_id": 1,
            "server_round": 1,
            "kind": kind,
            "dp_events": events,
            "delta": 1e-5,
            "epsilon_budget": 100.0,
            "epsilon_cumulative": 50.0,
            **extra,
        }
    )
    return int(entry["seq"])


def test_a_train_entry_without_dp_events_fails_the_audit(tmp_path: Path) -> None:
    state = tmp_path / BANK
    ledger = PrivacyLedger(state)
    _train(ledger, "train", [DpEvent(1.5, 0.05, 60, 1.0).__dict__])
    _train(ledger, "train-replay", [])  # a replay resends what was charged: fine
    _train(ledger, "evaluate", [])
    assert audit_path(state)[0].ledger_problems == []
    _train(ledger, "train", [])
    result = _audit(state)
    assert result.returncode == 5 and "UNCHARGED TRAIN" in result.stdout
    assert "line 4: train release of round 1 carries no DP events" in result.stdout


def test_a_train_entry_may_carry_its_events_in_the_charge_it_names_once(tmp_path: Path) -> None:
    state = tmp_path / BANK
    ledger = PrivacyLedger(state)
    charge = _train(ledger, "charge", [DpEvent(1.5, 0.05, 60, 1.0).__dict__])
    evaluate = _train(ledger, "evaluate", [])
    _train(ledger, "train", [], charge_seq=charge)
    assert audit_path(state)[0].ledger_problems == []
    _train(ledger, "train", [], charge_seq=charge)  # a second release on the same charge
    _train(ledger, "train", [], charge_seq=evaluate)  # names something that charged nothing
    _train(ledger, "train", [{**DpEvent(1.5, 0.05, 0, 1.0).__dict__}])  # zero steps
    problems = audit_path(state)[0].ledger_problems
    assert len(problems) == 3
    assert f"names charge {charge}, already used by line 3" in problems[0]
    assert f"names charge {evaluate}, which is no earlier charge entry" in problems[1]
    assert "line 6: train release of round 1 carries no DP events" in problems[2]
