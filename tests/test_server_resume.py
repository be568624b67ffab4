"""A server killed mid-run resumes from its last checkpoint; no bank pays twice for a round."""

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from fedfin.common.ledger import PrivacyLedger
from tests.harness.processes import flower_env, run_to_end, started

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3


def _simulate(out: Path, rounds: int = ROUNDS) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedfin.simulations.cli",
        "simulate",
        "--banks",
        "3",
        "--rounds",
        str(rounds),
        "--epsilon",
        "2.0",
        "--out",
        str(out),
        "--no-audit",
    ]


def _a_bank_released(out: Path, server_round: int) -> bool:
    for ledger in out.glob("banks/*/state/ledger.jsonl"):
        for line in ledger.read_text().splitlines():
            if '"kind":"train"' in line and f'"server_round":{server_round},' in line:
                return True
    return False


def _completed(out: Path) -> int:
    path = out / "rounds.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("resume")
    out, env = tmp / "run", flower_env(tmp / "flwr-home")
    with started(_simulate(out), env, tmp / "first.log") as first:
        deadline = time.monotonic() + 240
        # Kill the server as soon as one bank has released round 2: that bank must replay.
        while not _a_bank_released(out, 2) and first.poll() is None:
            assert time.monotonic() < deadline, (tmp / "first.log").read_text()[-3000:]
            time.sleep(0.05)
        assert first.poll() is None, (tmp / "first.log").read_text()[-3000:]
    # `started` has killed the whole process tree: the server died mid-run.
    assert 1 <= _completed(out) < ROUNDS
    code = run_to_end(_simulate(out), env, tmp / "second.log", timeout=300)
    assert code == 0, (tmp / "second.log").read_text()[-3000:]
    return out


def test_the_resumed_run_has_exactly_the_planned_rounds(resumed_run: Path) -> None:
    rounds = [json.loads(line)["round"] for line in (resumed_run / "rounds.jsonl").open()]
    assert rounds == list(range(1, ROUNDS + 1))
    state = json.loads((resumed_run / "server-state.json").read_text())
    assert state["completed_round"] == ROUNDS
    assert (resumed_run / "final" / "encoder.npz").exists()


def test_no_bank_is_charged_twice_for_the_same_round(resumed_run: Path) -> None:
    federation = json.loads((resumed_run / "server-state.json").read_text())["federation_id"]
    replays: list[dict[str, object]] = []
    for state in sorted(resumed_run.glob("banks/*/state")):
        entries = [
            e for e in PrivacyLedger(state).entries() if e.get("federation_id") == federation
        ]
        charged = Counter(e["server_round"] for e in entries if e["kind"] == "charge")
        released = Counter(e["server_round"] for e in entries if e["kind"] == "train")
        assert set(charged) == set(range(1, ROUNDS + 1)), charged
        # A bank killed mid-training keeps its charge and declines the round on resume.
        assert max(charged.values()) == 1 and max(released.values()) == 1
        assert set(released) <= set(charged)
        replays += [e for e in entries if e["kind"] == "train-replay"]
        for replay in (e for e in entries if e["kind"] == "train-replay"):
            assert replay["dp_events"] == []
            original = next(
                e
                for e in entries
                if e["kind"] == "train" and e["server_round"] == replay["server_round"]
            )
            assert replay["arrays_sha256"] == original["arrays_sha256"]
    assert replays, "the server was killed after a bank released round 2: it must replay"


def test_a_finished_federation_in_the_same_dir_is_followed_by_a_new_one(
    resumed_run: Path, tmp_path: Path
) -> None:
    before = json.loads((resumed_run / "server-state.json").read_text())["federation_id"]
    out = subprocess.run(
        _simulate(resumed_run, rounds=1),  # any new federation; one round is enough
        env=flower_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    after = json.loads((resumed_run / "server-state.json").read_text())["federation_id"]
    assert after != before
