"""The privacy ledger is append-only, tamper-evident and survives a kill mid-append."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.errors import LedgerError
from common.ledger import GENESIS_HASH, PrivacyLedger, verify_lines
from tests.harness.processes import stop


def _event(steps: int) -> dict[str, object]:
    return {"noise_multiplier": 1.5, "sample_rate": 0.05, "steps": steps, "max_grad_norm": 1.0}


def _ledger_with(tmp_path: Path, count: int) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path)
    for i in range(count):
        ledger.append(
            {
                "run_id": 1,
                "server_round": i + 1,
                "kind": "train",
                "dp_events": [_event(10 + i)],
                "epsilon_cumulative": 0.1 * (i + 1),
            }
        )
    return ledger


def _lines(ledger: PrivacyLedger) -> list[str]:
    return ledger.path.read_text().splitlines(keepends=True)


def test_entries_chain_to_the_one_before(tmp_path: Path) -> None:
    entries = _ledger_with(tmp_path, 3).entries()
    assert entries[0]["prev_hash"] == GENESIS_HASH
    assert [e["prev_hash"] for e in entries[1:]] == [e["hash"] for e in entries[:-1]]
    assert [e["seq"] for e in entries] == [1, 2, 3]


def test_altering_one_line_is_detected(tmp_path: Path) -> None:
    ledger = _ledger_with(tmp_path, 4)
    lines = _lines(ledger)
    entry = json.loads(lines[1])
    entry["dp_events"][0]["steps"] = 1  # claim less privacy spent
    lines[1] = json.dumps(entry) + "\n"
    ledger.path.write_text("".join(lines))
    with pytest.raises(LedgerError, match="line 2 was altered"):
        ledger.entries()


def test_deleting_one_line_is_detected(tmp_path: Path) -> None:
    ledger = _ledger_with(tmp_path, 4)
    lines = _lines(ledger)
    ledger.path.write_text("".join(lines[:1] + lines[2:]))
    problems = ledger.check().problems
    assert any("line 2" in p for p in problems)


def test_deleting_the_last_lines_is_detected_by_sequence_against_a_copy(tmp_path: Path) -> None:
    """Truncation at the end keeps a valid chain; the seq/hash of a kept receipt exposes it."""
    ledger = _ledger_with(tmp_path, 4)
    receipt = ledger.entries()[-1]  # what the bank's auditor or the server saw
    ledger.path.write_text("".join(_lines(ledger)[:3]))
    assert ledger.entries()[-1]["seq"] < receipt["seq"]


def test_reordering_lines_is_detected(tmp_path: Path) -> None:
    ledger = _ledger_with(tmp_path, 4)
    lines = _lines(ledger)
    lines[1], lines[2] = lines[2], lines[1]
    ledger.path.write_text("".join(lines))
    assert not ledger.check().ok


def test_appending_after_an_altered_last_entry_is_refused(tmp_path: Path) -> None:
    ledger = _ledger_with(tmp_path, 2)
    lines = _lines(ledger)
    ledger.path.write_text(lines[0] + lines[1].replace('"steps":11', '"steps":1'))
    with pytest.raises(LedgerError, match="last entry is corrupt"):
        ledger.append({"kind": "train"})


def test_reading_a_broken_ledger_for_accounting_is_refused(tmp_path: Path) -> None:
    """The bank reads its whole history before every round: a broken chain stops it."""
    ledger = _ledger_with(tmp_path, 3)
    ledger.path.write_text(_lines(ledger)[1])
    with pytest.raises(LedgerError):
        ledger.dp_events()


def test_a_partial_last_line_is_ignored_and_replaced_by_the_next_append(tmp_path: Path) -> None:
    ledger = _ledger_with(tmp_path, 2)
    with open(ledger.path, "ab") as handle:
        handle.write(b'{"run_id": 1, "kind": "tr')
    check = ledger.check()
    assert check.ok and check.partial_tail and len(check.entries) == 2
    ledger.append({"kind": "train", "dp_events": [_event(1)]})
    assert len(ledger.entries()) == 3 and not ledger.check().partial_tail


_WRITER = """
import sys
from pathlib import Path
from common.ledger import PrivacyLedger
ledger = PrivacyLedger(Path(sys.argv[1]))
padding = "x" * 200_000  # large entries: a kill is likely to land inside a write
print("ready", flush=True)
while True:
    ledger.append({"kind": "train", "padding": padding,
                   "dp_events": [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1,
                                  "max_grad_norm": 1.0}]})
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_a_process_killed_during_appends_leaves_a_valid_ledger(
    tmp_path: Path, delay: float
) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        stop(process)
    ledger = PrivacyLedger(tmp_path)
    check = verify_lines(ledger.path.read_bytes(), "ledger")
    assert check.ok, check.problems
    assert len(check.entries) >= 1
    ledger.append({"kind": "train", "dp_events": []})  # and the bank can go on
    assert len(ledger.entries()) == len(check.entries) + 1
