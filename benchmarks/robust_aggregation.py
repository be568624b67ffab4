"""One poisoned bank out of five: how much do the honest banks lose, by strategy?

Runs the real Flower simulation (5 built-in banks, ε = 3 each, 3 rounds) with bank-00
sending scaled (x -20) or random encoder updates, under FedAvg and FedTrimmedAvg (Flower's
own), and reports the honest banks' mean AUC after the last round against the no-attack run.
Writes benchmarks/results/robust_aggregation.json and .md.
Usage: python -m benchmarks.robust_aggregation
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = [
    ("fedavg", "none"),
    ("fedavg", "scale"),
    ("fedtrimmedavg", "scale"),
    ("fedavg", "random"),
    ("fedtrimmedavg", "random"),
    ("fedtrimmedavg", "none"),
]


def honest_mean_auc(run: Path) -> float:
    last = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()][-1]
    aucs = [row["auc"] for bank, row in last["per_bank"].items() if bank != "bank-00"]
    return sum(aucs) / len(aucs)


def main() -> None:
    figures: dict[str, float] = {}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedfin-robust-") as tmp:
        for strategy, attack in RUNS:
            out = Path(tmp) / f"{strategy}-{attack}"
            env = {**os.environ, "FLWR_HOME": str(Path(tmp) / "flwr-home")}
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "tests.harness.poisoned_simulation",
                    str(out),
                    strategy,
                    attack,
                ],
                check=True,
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            figures[f"{strategy}/{attack}"] = honest_mean_auc(out)
            print(strategy, attack, figures[f"{strategy}/{attack}"], flush=True)
    baseline = figures["fedavg/none"]
    result = {
        "command": "python -m benchmarks.robust_aggregation",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}",
        "honest_mean_auc": figures,
        "drop_vs_no_attack_fedavg": {k: baseline - v for k, v in figures.items()},
        "seconds": round(time.time() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "robust_aggregation.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# One poisoned bank of five (built-in data, ε = 3 per bank, 3 rounds, seed 0)",
        "",
        f"Command: `{result['command']}`; machine: {result['machine']}; {result['seconds']} s.",
        "Honest banks' (bank-01..04) mean AUC after the last round; drop is against FedAvg "
        "without attack.",
        "",
        "| strategy | attack by bank-00 | honest mean AUC | drop |",
        "|---|---|---|---|",
    ]
    for strategy, attack in RUNS:
        key = f"{strategy}/{attack}"
        lines.append(
            f"| {strategy} | {attack} | {figures[key]:.4f} | {baseline - figures[key]:+.4f} |"
        )
    (RESULTS / "robust_aggregation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
