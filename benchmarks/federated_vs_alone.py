"""Does federating help? fedfin vs each bank alone with DP, on the built-in Lending Club banks.

For each seed: pretrain on the public states, run the federation (Flower simulation engine)
with 5 banks at ε per bank, and train each bank alone at the same ε with the same DP code
(a) from scratch and (b) from the public encoder. Writes benchmarks/results/federated_vs_alone.json
and .md. Usage: python -m benchmarks.federated_vs_alone [--seeds 0 1 2] [--epsilon 1.0]
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.config import FederationConfig, PrivacyPolicy, SplitConfig, TrainPlanConfig
from fedfin.common.sources import load_source
from fedfin.simulations.baselines import train_alone
from fedfin.simulations.simulate import PRETRAINED_DIR, SimulationRequest, simulate

RESULTS = Path(__file__).resolve().parent / "results"


def run_seed(seed: int, epsilon: float, banks: int, rounds: int, work: Path) -> dict[str, object]:
    source = load_source("lending-club")
    plan = TrainPlanConfig()
    policy = PrivacyPolicy(epsilon_budget=epsilon)
    out = work / f"seed-{seed}"
    report = simulate(
        SimulationRequest(
            source=source,
            split=SplitConfig(num_banks=banks, seed=seed),
            federation=FederationConfig(num_rounds=rounds, min_banks=2, train=plan),
            policy=policy,
            out_dir=out,
        ),
        echo=lambda line: print(f"[seed {seed}] {line}", flush=True),
    )
    encoder_dir = out / PRETRAINED_DIR
    start = load_encoder_checkpoint(encoder_dir)
    from fedfin.simulations.simulated_banks import lay_out_banks

    settings = lay_out_banks(source.split(SplitConfig(num_banks=banks, seed=seed)), out, policy)
    rows = {}
    for bank in settings.banks:
        scratch = train_alone(bank, start, encoder_dir, rounds, plan, from_scratch=True, seed=seed)
        transfer = train_alone(
            bank, start, encoder_dir, rounds, plan, from_scratch=False, seed=seed
        )
        fed = report["per_bank"][bank.name]
        rows[bank.name] = {
            "public_model": fed["auc_public_model"],
            "federated": fed["auc_federated"],
            "alone_scratch": scratch["auc"],
            "alone_transfer": transfer["auc"],
        }
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--banks", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-federated-vs-alone"))
    args = parser.parse_args()
    started = time.time()
    per_seed = {
        seed: run_seed(seed, args.epsilon, args.banks, args.rounds, args.work)
        for seed in args.seeds
    }
    methods = ["public_model", "federated", "alone_scratch", "alone_transfer"]
    summary = {}
    for method in methods:
        means = [statistics.mean(b[method] for b in rows.values()) for rows in per_seed.values()]
        worsts = [min(b[method] for b in rows.values()) for rows in per_seed.values()]
        summary[method] = {
            "mean_auc": statistics.mean(means),
            "mean_auc_std": statistics.pstdev(means),
            "worst_bank_auc": statistics.mean(worsts),
            "worst_bank_auc_std": statistics.pstdev(worsts),
        }
    result = {
        "command": " ".join(["python -m benchmarks.federated_vs_alone", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}",
        "epsilon_per_bank": args.epsilon,
        "delta": 1e-5,
        "banks": args.banks,
        "rounds": args.rounds,
        "seeds": args.seeds,
        "summary": summary,
        "per_seed": per_seed,
        "seconds": round(time.time() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federated_vs_alone.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Federated vs alone (ε = {args.epsilon} per bank, δ = 1e-5, {args.banks} banks, "
        f"{args.rounds} rounds, seeds {args.seeds})",
        "",
        f"Command: `{result['command']}`; machine: {result['machine']}; {result['seconds']} s.",
        "",
        "| method | mean bank AUC | worst bank AUC |",
        "|---|---|---|",
    ]
    names = {
        "public_model": "public encoder + source head (no bank data)",
        "federated": "fedfin: federated DP fine-tuning, private heads",
        "alone_scratch": "each bank alone, DP from scratch",
        "alone_transfer": "each bank alone, DP fine-tuning of the public encoder",
    }
    for method in methods:
        s = summary[method]
        lines.append(
            f"| {names[method]} | {s['mean_auc']:.4f} ± {s['mean_auc_std']:.4f} | "
            f"{s['worst_bank_auc']:.4f} ± {s['worst_bank_auc_std']:.4f} |"
        )
    (RESULTS / "federated_vs_alone.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
