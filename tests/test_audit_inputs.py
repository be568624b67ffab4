"""`fedfin audit` on what people and tampering hand it: one line, the right exit code, no
traceback, nothing stored changed, no file written into a bank's state dir.

Each class of bad input is a parametrised case run in-process through `main`; ledgers are
written by the real `PrivacyLedger`, and edited ledgers are re-chained with its own hash rule
where the case is a bad value behind a valid chain.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from fedfin.common.accounting import DpEvent, epsilon_spent
from fedfin.common.ledger import PrivacyLedger, canonical_json, entry_hash
from fedfin.simulations.cli import main

BANKS = ("bank-00", "bank-01")


def _ledger(state: Path, rounds: int = 2, budget: float = 2.0) -> None:
    ledger = PrivacyLedger(state)
    events: list[DpEvent] = []
    for r in range(1, rounds + 1):
        events.append(DpEvent(2.0, 0.05, 40, 1.0))
        ledger.append(
            {
                "bank": state.parent.name,
                "run_id": 7,
                "server_round": r,
                "kind": "train",
                "dp_events": [events[-1].__dict__],
                "delta": 1e-5,
                "epsilon_budget": budget,
                "epsilon_cumulative": epsilon_spent(events, 1e-5),
            }
        )


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run dir with two banks' ledgers; the current directory is a scratch dir beside it."""
    for bank in BANKS:
        _ledger(tmp_path / "run" / "banks" / bank / "state")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return tmp_path / "run"


def _state(run: Path, bank: str = "bank-00") -> Path:
    return run / "banks" / bank / "state"


def _rechain(state: Path, line: int, change: Callable[[dict[str, object]], None]) -> None:
    """Edit one entry, then recompute every hash after it: a valid chain around a bad value."""
    path = state / "ledger.jsonl"
    entries = [json.loads(text) for text in path.read_text().splitlines()]
    change(entries[line - 1])
    previous = "0" * 64
    for entry in entries:
        entry["prev_hash"] = previous
        entry["hash"] = entry_hash(entry)
        previous = str(entry["hash"])
    path.write_text("".join(canonical_json(e) + "\n" for e in entries))


def _raw(state: Path, old: str, new: str) -> None:
    """Edit the ledger's text (the chain breaks): e.g. a number JSON cannot hold."""
    path = state / "ledger.jsonl"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _set(key: str, value: object) -> Callable[[Path], None]:
    return lambda run: _rechain(_state(run), 2, lambda e: e.__setitem__(key, value))


def _event(key: str, value: object) -> Callable[[Path], None]:
    def change(entry: dict[str, object]) -> None:
        events = entry["dp_events"]
        assert isinstance(events, list)
        events[0][key] = value

    return lambda run: _rechain(_state(run), 1, change)


def _copy_state(run: Path) -> None:
    import shutil

    shutil.copytree(_state(run), run / "banks" / "bank-00-copy" / "state")


def _same_name(run: Path) -> None:
    _ledger(run / "banks" / "other" / "state")
    other = run / "banks" / "other" / "state"
    for line in (1, 2):  # another run's ledger under the same bank name
        _rechain(other, line, lambda e: e.update(bank="bank-01", run_id=8))


def _write(path: Path) -> None:
    path.write_text("not a ledger")


def _nothing(run: Path) -> None:
    pass


# (id, how the input is broken, argv after "audit" given the run dir, exit code, words)
CASES: list[tuple[str, Callable[[Path], None], Callable[[Path], list[str]], int, str]] = [
    ("missing path", _nothing, lambda r: [str(r / "nope")], 2, "nope: no such file"),
    ("dir without ledgers", _nothing, lambda r: [str(r.parent / "cwd")], 2, "no ledger.jsonl"),
    (
        "a file that is no ledger",
        lambda r: _write(r / "notes.txt"),
        lambda r: [str(r / "notes.txt")],
        2,
        "notes.txt: not a ledger.jsonl",
    ),
    ("the ledger file itself", _nothing, lambda r: [str(_state(r) / "ledger.jsonl")], 0, ""),
    (
        "missing anchors",
        _nothing,
        lambda r: [str(r), "--anchors", str(r / "no.jsonl")],
        2,
        "no.jsonl: no such anchors file",
    ),
    (
        "NaN epsilon",
        lambda r: _raw(_state(r), '"epsilon_cumulative":', '"epsilon_cumulative":NaN,"x":'),
        lambda r: [str(r)],
        5,
        "holds NaN",
    ),
    (
        "infinite epsilon",
        lambda r: _raw(_state(r), '"epsilon_budget":2.0', '"epsilon_budget":Infinity'),
        lambda r: [str(r)],
        5,
        "holds Infinity",
    ),
    (
        "negative epsilon",
        _set("epsilon_cumulative", -1.0),
        lambda r: [str(r)],
        5,
        "line 2: epsilon_cumulative is -1.0; it must be a finite ε of 0 or more",
    ),
    (
        "text epsilon",
        _set("epsilon_cumulative", "1.2"),
        lambda r: [str(r)],
        5,
        "line 2: epsilon_cumulative is '1.2', not a number",
    ),
    (
        "boolean epsilon",
        _set("epsilon_cumulative", True),
        lambda r: [str(r)],
        5,
        "epsilon_cumulative is True, not a number",
    ),
    ("zero budget", _set("epsilon_budget", 0), lambda r: [str(r)], 5, "epsilon_budget is 0"),
    ("delta of 1", _set("delta", 1), lambda r: [str(r)], 5, "delta is 1; it must be a δ in (0, 1)"),
    ("round as text", _set("server_round", "two"), lambda r: [str(r)], 5, "server_round is 'two'"),
    (
        "events not a list",
        _set("dp_events", {"steps": 1}),
        lambda r: [str(r)],
        5,
        "dp_events is {'steps': 1}, not a list",
    ),
    (
        "negative noise",
        _event("noise_multiplier", -2.0),
        lambda r: [str(r)],
        5,
        "dp_events[1].noise_multiplier is -2.0",
    ),
    (
        "sample rate over 1",
        _event("sample_rate", 1.5),
        lambda r: [str(r)],
        5,
        "dp_events[1].sample_rate is 1.5",
    ),
    ("fractional steps", _event("steps", 2.5), lambda r: [str(r)], 5, "dp_events[1].steps is 2.5"),
    ("huge steps", _event("steps", 10**12), lambda r: [str(r)], 5, "0 to 10^9"),
    ("event with an extra key", _event("seed", 1), lambda r: [str(r)], 5, "is not a DP event"),
    ("copied state dir", _copy_state, lambda r: [str(r)], 5, "the same ledger (same first entry)"),
    ("two ledgers, one bank", _same_name, lambda r: [str(r)], 5, "of the same bank name"),
    (
        "plot into a state dir",
        _nothing,
        lambda r: [str(r), "--plot", str(_state(r) / "p.png")],
        2,
        "inside the bank state dir",
    ),
    (
        "json over the ledger",
        _nothing,
        lambda r: [str(r), "--json", str(_state(r) / "ledger.jsonl")],
        2,
        "the audit never writes",
    ),
    ("plot not a png", _nothing, lambda r: [str(r), "--plot", "p.jpg"], 2, "use a .png file name"),
    ("plot is a directory", _nothing, lambda r: [str(r), "--plot", str(r)], 2, "is a directory"),
    (
        "plot and json the same",
        _nothing,
        lambda r: [str(r), "--plot", "a.png", "--json", "a.png"],
        2,
        "are the same file",
    ),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_audit_input_is_one_line_and_its_exit_code(
    case: tuple[str, Callable[[Path], None], Callable[[Path], list[str]], int, str],
    run: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, breaks, argv, code, words = case
    breaks(run)
    before = _snapshot(run)

    assert main(["audit", *argv(run)]) == code

    out, err = capsys.readouterr()
    assert _snapshot(run) == before, "the audit changed or added files in the run dir"
    if code == 0:
        return
    assert err.count("\n") == 1 and err.startswith("fedfin audit: error: ") and words in err, err
    assert "Traceback" not in err
    if code == 2:  # refused before anything was read or written
        assert out == "" and not list(Path().iterdir())


def test_the_plot_goes_to_the_current_directory_never_into_a_state_dir(
    run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _state(run)
    before = _snapshot(run)

    assert main(["audit", str(state)]) == 0
    assert Path("privacy-audit.png").read_bytes()[:4] == b"\x89PNG"

    monkeypatch.chdir(state)  # an auditor standing in the bank's state dir
    assert main(["audit", "."]) == 0
    assert "plot: not written (the default privacy-audit.png is in" in capsys.readouterr().out
    assert _snapshot(run) == before

    assert main(["audit", str(run), "--json", str(run / "audit.json")]) == 0
    assert (run / "privacy-audit.png").exists()  # beside the report asked for


def test_the_table_says_which_accountant_is_authoritative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A budget between PLD and RDP: within budget by the authoritative figures, so ok."""
    state = tmp_path / "banks" / "bank-00" / "state"
    _ledger(state, rounds=3, budget=1.25)  # PRV/PLD about 1.21, RDP about 1.33
    monkeypatch.chdir(tmp_path)

    assert main(["audit", str(state), "--json", "audit.json"]) == 0

    out = capsys.readouterr().out
    report = json.loads(Path("audit.json").read_text())["banks"][0]
    assert report["epsilon_rdp"] > 1.25 > report["epsilon_recorded"] and report["ok"]
    assert "ε recorded (PRV)" in out and "ε RDP (looser)" in out
    assert "Authoritative: ε recorded, by the bank's PRV accountant" in out
    assert "looser upper bound, for reference only" in out
    assert report["authoritative"].startswith("epsilon_recorded")
