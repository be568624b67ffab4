"""The privacy ledger is append-only, tamper-evident and survives a kill mid-append."""

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedfin.common.errors import LedgerError
from fedfin.common.ledger import GENESIS_HASH, PrivacyLedger, verify_lines
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


def test_the_head_is_the_last_entrys_sequence_and_hash(tmp_path: Path) -> None:
    """What a reply anchors outside the bank (truncation against it: test_audit.py)."""
    ledger = _ledger_with(tmp_path, 3)
    last = json.loads(_lines(ledger)[-1])
    body = {k: v for k, v in last.items() if k != "hash"}
    expected = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert ledger.head() == (3, expected) == (last["seq"], last["hash"])


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


_DIES_INSIDE_A_WRITE = """
import os, signal, sys
from pathlib import Path
import fedfin.common.ledger as ledger_module
from fedfin.common.ledger import PrivacyLedger

ledger = PrivacyLedger(Path(sys.argv[1]))
fraction = float(sys.argv[2])
ledger.append({"kind": "charge", "dp_events": []})


class DiesMidWrite:
    def __init__(self, handle):
        self.handle = handle
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.handle.close()
    def write(self, data):
        cut = int(len(data) * fraction)
        self.handle.write(data[:cut])
        self.handle.flush()
        os.fsync(self.handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


ledger_module.open = lambda *a, **k: DiesMidWrite(open(*a, **k))
ledger.append({"kind": "train", "padding": "x" * 5000, "dp_events": []})
"""


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.5, 0.999])
def test_a_process_killed_inside_an_append_leaves_a_valid_ledger(
    tmp_path: Path, fraction: float
) -> None:
    """The kill lands inside the write (by construction, not by timing): the entry being
    written is a partial last line, never sent; the chain stays valid and the bank goes on."""
    process = subprocess.Popen(
        [sys.executable, "-c", _DIES_INSIDE_A_WRITE, str(tmp_path), str(fraction)],
        start_new_session=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        stop(process)
    ledger = PrivacyLedger(tmp_path)
    raw = ledger.path.read_bytes()
    check = verify_lines(raw, "ledger")
    assert check.ok, check.problems
    assert len(check.entries) == 1 and check.entries[0]["kind"] == "charge"
    assert check.partial_tail == (fraction > 0)  # bytes of the second entry are on disk
    ledger.append({"kind": "train", "dp_events": []})  # and the bank can go on
    assert [e["kind"] for e in ledger.entries()] == ["charge", "train"]
    assert not ledger.check().partial_tail
