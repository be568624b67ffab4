"""Seconds per round: real deployment (SuperLink, door, 3 SuperNodes + runners) vs simulation.

Before the bank runner, every Flower message started a fresh ClientApp process, which
imported fedfin, torch and opacus before doing any work; this measures how much of a
round that is. Runs, on the
same 3 built-in banks and 2 rounds: scripts/deployment_demo.sh, `fedfin simulate`, and
the import time of the ClientApp's evaluate and train paths in fresh processes.
Results go to benchmarks/results/round_latency.json under --label (e.g. before/after).
Usage: python -m benchmarks.round_latency --label after
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMPORTS = {
    "clientapp_evaluate_path": "import fedfin.client.client_app",
    "clientapp_train_path": (
        "import fedfin.client.client_app, fedfin.client.budget, fedfin.client.dp_training"
    ),
    "torch_alone": "import torch",
}


def import_seconds(statement: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, cwd=ROOT)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def round_seconds(rounds_file: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in rounds_file.read_text().splitlines()]


def free_port(block: int = 5) -> int:
    """A base port with `block` free ports from it: the demo uses the SuperLink's port,
    the door's and one per bank (checked, not guaranteed)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        try:
            for port in range(base, base + block):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free block of ports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--label", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}")
    figures: dict[str, object] = {
        "imports_median_seconds": {k: round(import_seconds(v, args.repeats), 2)
                                   for k, v in IMPORTS.items()},
    }
    with tempfile.TemporaryDirectory(prefix="fedfin-latency-") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "deployment_demo.sh"), str(work / "deploy"),
             str(free_port())],
            check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True,
        )
        figures["deployment_demo_total_seconds"] = round(time.perf_counter() - started, 1)
        figures["deployment_seconds_per_round"] = round_seconds(work / "deploy/server/rounds.jsonl")
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "fedfin.simulations.cli", "simulate", "--banks", "3", "--rounds",
             "2", "--epsilon", "1.0", "--out", str(work / "sim"), "--no-audit"],
            check=True, cwd=ROOT, env={**env, "FLWR_HOME": str(work / "flwr-sim")},
            stdout=subprocess.DEVNULL, start_new_session=True,
        )
        figures["simulation_total_seconds"] = round(time.perf_counter() - started, 1)
        figures["simulation_seconds_per_round"] = round_seconds(work / "sim" / "rounds.jsonl")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "round_latency.json"
    existing = json.loads(path.read_text()) if path.exists() else {}
    existing["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    existing["command"] = "python -m benchmarks.round_latency --label LABEL"
    existing[args.label] = figures
    path.write_text(json.dumps(existing, indent=2) + "\n")
    print(json.dumps({args.label: figures}, indent=2))


if __name__ == "__main__":
    main()
