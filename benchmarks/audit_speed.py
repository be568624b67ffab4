"""How long does `fedfin audit` take on a ledger of 10,000 releases?

Builds a realistic ledger with the real `PrivacyLedger.append` (fsync per entry, as a bank
writes it): 100 runs of 50 rounds, a train and an evaluate release per round, cumulative ε
recorded with fedfin's PRV accountant. Then times the audit (chain verification, dp-accounting
PLD and RDP recomputation, the checkpoints re-checked, table, JSON and PNG) as a subprocess,
the way a person runs it. Writes benchmarks/results/audit_speed.json and .md.
Usage: python -m benchmarks.audit_speed [--releases 10000]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from fedfin.common.accounting import DpEvent, epsilon_spent
from fedfin.common.ledger import PrivacyLedger

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def build_ledger(state: Path, releases: int) -> float:
    ledger = PrivacyLedger(state)
    event = DpEvent(8.0, 1 / 14, 14, 1.0)
    rounds_per_run = 50
    started = time.perf_counter()
    # ε after n train releases, recorded as the value at the next of 100 grid points: an
    # upper bound, as a bank's PRV figure is, without 5,000 separate accountant runs.
    total = (releases + 1) // 2
    grid = sorted({max(1, round(total * k / 100)) for k in range(1, 101)})
    at = {n: epsilon_spent([DpEvent(8.0, 1 / 14, 14 * n, 1.0)], 1e-5) for n in grid}
    cache = {n: at[next(g for g in grid if g >= n)] for n in range(1, total + 1)}
    cache[0] = 0.0
    trains = 0
    for index in range(releases):
        run_id, server_round = index // (2 * rounds_per_run) + 1, (index // 2) % rounds_per_run + 1
        train = index % 2 == 0
        trains += train
        ledger.append(
            {
                "bank": "bank-00",
                "run_id": run_id,
                "server_round": server_round,
                "kind": "train" if train else "evaluate",
                "dp_events": [asdict(event)] if train else [],
                "delta": 1e-5,
                "epsilon_cumulative": cache[trains],
                "epsilon_budget": 1000.0,
                "arrays_sha256": {f"encoder.w{i}": "0" * 64 for i in range(12)} if train else {},
                "metrics_sent": {"epsilon": cache[trains], "num-examples": 874},
            }
        )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--releases", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedfin-audit-bench-") as tmp:
        state = Path(tmp) / "bank-00" / "state"
        build_seconds = build_ledger(state, args.releases)
        started = time.perf_counter()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedfin.simulations.cli",
                "audit",
                str(state),
                "--json",
                str(Path(tmp) / "audit.json"),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        audit_seconds = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"audit failed: {result.stderr}")
        audit = json.loads((Path(tmp) / "audit.json").read_text())["banks"][0]
    figures = {
        "command": "python -m benchmarks.audit_speed " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}",
        "releases": args.releases,
        "ledger_build_seconds_fsync_per_entry": round(build_seconds, 2),
        "audit_wall_seconds_including_process_start": round(audit_seconds, 2),
        "checked_entries": audit["checked_entries"],
        "epsilon_recorded": audit["epsilon_recorded"],
        "epsilon_pld": audit["epsilon_pld"],
        "epsilon_rdp": audit["epsilon_rdp"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "audit_speed.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / "audit_speed.md").write_text(
        "# fedfin audit speed\n\n"
        f"Command: `{figures['command']}`; machine: {figures['machine']}.\n\n"
        f"- ledger of {args.releases} releases (fsync per append): built in "
        f"{figures['ledger_build_seconds_fsync_per_entry']} s\n"
        f"- `fedfin audit` (new process: imports, chain, PLD + RDP, {audit['checked_entries']} "
        f"entries re-checked, table, JSON, PNG): "
        f"**{figures['audit_wall_seconds_including_process_start']} s**\n"
    )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
