"""Privacy-utility on the built-in Lending Club banks: fedfin against what a bank could do instead.

Per seed: split Lending Club into a public pool and N banks (seeded), pretrain on the pool,
then at each ε per bank (and non-private) measure every bank's test AUC and KS for:
  a  public encoder + source head, no fine-tuning (`simulate.public_model_metrics`);
  b  each bank alone, DP from scratch; c  alone, DP fine-tuning of the public encoder
     (`baselines.train_alone`: the bank's own `train_round`, no server);
  d  fedfin: shared encoder, private heads, modes full and fedrep;
  e  FedAvg of the whole model (encoder and head shared, no private heads);
  f  pooled non-private training on the public pool and all banks' train rows (the
     pretraining recipe on everything: the ceiling no bank can have);
  plus a per-bank HistGradientBoosting (non-private, grid-searched by 3-fold CV).
d and e run in `simulations/federated_loop.py` (the bank code and FedAvg's maths, no Ray);
one cell (d full, ε=1, first seed) is rerun with the real `fedfin simulate` as a cross-check.
Non-private b-e use the same model, start, steps and Adam without clipping or noise.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from fedfin.client.bank_data import load_bank_data
from fedfin.client.bank_settings import BankSettings
from fedfin.common import accounting
from fedfin.common.checkpoint import EncoderCheckpoint, load_encoder_checkpoint
from fedfin.common.config import PretrainConfig, PrivacyPolicy, SplitConfig, TrainPlanConfig
from fedfin.common.ledger import PrivacyLedger
from fedfin.common.metrics import credit_metrics
from fedfin.common.model import build_model
from fedfin.common.partition import FederatedSplit
from fedfin.common.schema import EncodedTable, FeatureSchema
from fedfin.common.shared_weights import shared_arrays
from fedfin.common.sources import DataSource, load_source
from fedfin.server.pretrain import pretrain
from fedfin.server.server_app import load_source_head
from fedfin.simulations.baselines import train_alone
from fedfin.simulations.federated_loop import LoopConfig, Sharing, run_federated_loop
from fedfin.simulations.simulate import public_model_metrics
from fedfin.simulations.simulated_banks import lay_out_banks

NAME = "privacy-utility"
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_FILE = RESULTS / "privacy_utility.json"
PLOT_FILE = RESULTS / "privacy_utility_auc.png"
NON_PRIVATE = "non-private"
MAIN, SCARCE = "main", "scarce-public"
SCARCE_METHODS = ("a_public", "c_alone_transfer", "d_fedfin_full", "f_pooled")
SCARCE_COLUMNS = ("1", "8", NON_PRIVATE)
METHODS = {
    "a_public": "a. public encoder + source head, no fine-tuning",
    "b_alone_scratch": "b. each bank alone, DP from scratch",
    "c_alone_transfer": "c. each bank alone, DP fine-tuning of the public encoder",
    "d_fedfin_full": "d. **fedfin** (mode full): shared encoder, private heads",
    "d_fedfin_fedrep": "d. **fedfin** (mode fedrep): shared encoder, private heads",
    "e_fedavg_model": "e. FedAvg of the whole model, no private heads",
    "f_pooled": "f. pooled non-private: public + all banks' train rows (ceiling)",
    "hgb_alone": "HistGradientBoosting per bank alone (non-private, CV-tuned)",
}
TRAINED = (
    "b_alone_scratch",
    "c_alone_transfer",
    "d_fedfin_full",
    "d_fedfin_fedrep",
    "e_fedavg_model",
)
SHARING: dict[str, Sharing] = {
    "b_alone_scratch": "none",
    "c_alone_transfer": "none",
    "d_fedfin_full": "encoder",
    "d_fedfin_fedrep": "encoder",
    "e_fedavg_model": "model",
}
HGB_GRID = {"learning_rate": [0.05, 0.1], "max_leaf_nodes": [4, 15], "max_iter": [100, 300]}
Row = dict[str, Any]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    group.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 3.0, 8.0])
    group.add_argument("--banks", type=int, default=5)
    group.add_argument("--rounds", type=int, default=5)
    group.add_argument(
        "--scarce-public",
        type=float,
        default=0.1,
        help="also run a, c, d (full), f with this public fraction (0: skip); the main split "
        "uses 0.4",
    )
    group.add_argument(
        "--no-cross-check", action="store_true", help="skip the real `fedfin simulate` run"
    )


@contextmanager
def memoised_epsilon() -> Iterator[None]:
    """Compute each accountant history's ε once.

    ε of a history is a pure function, and banks of equal size at the same ε repeat the same
    histories across methods and seeds, so the banks' budget checks cost seconds, not
    minutes. The numbers are exactly those the uncached accountant gives.
    """
    original = accounting.epsilon_of_history
    cache: dict[tuple[Any, ...], float] = {}

    def cached(history: Any, delta: float, name: str) -> float:
        key = (tuple(tuple(entry) for entry in history), delta, name)
        if key not in cache:
            cache[key] = original(history, delta, name)
        return cache[key]

    accounting.epsilon_of_history = cached
    try:
        yield
    finally:
        accounting.epsilon_of_history = original


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(1)  # a shared 2-core machine; also what each simulated bank gets
    plan = TrainPlanConfig()
    columns = (*(_eps_key(e) for e in args.epsilons), NON_PRIVATE)
    scenarios = [Scenario(MAIN, SplitConfig().public_fraction, tuple(METHODS), columns)]
    if args.scarce_public:
        scarce = tuple(c for c in columns if c in SCARCE_COLUMNS)
        scenarios.append(Scenario(SCARCE, args.scarce_public, SCARCE_METHODS, scarce))
    rows: list[Row] = []
    data: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    cross_check: dict[str, Any] | None = None
    cells = sum(
        len(sc.columns) * len(set(TRAINED) & set(sc.methods)) + len(set(sc.methods) - set(TRAINED))
        for sc in scenarios
    )
    with tempfile.TemporaryDirectory(prefix="fedfin-bench-pu-") as tmp, memoised_epsilon():
        work = Path(tmp)
        bar = tqdm(total=len(args.seeds) * cells, desc=NAME, unit="cell")
        for scenario in scenarios:
            for seed in args.seeds:
                seed_rows, seed_data = _run_seed(
                    seed, scenario, args, plan, work / scenario.name / f"seed-{seed}", bar, seconds
                )
                rows += seed_rows
                data.append(seed_data)
        bar.close()
        main_data = [d for d in data if d["scenario"] == MAIN]
        sigmas = noise_multipliers(args.epsilons, main_data, plan, args.rounds)
        first = work / MAIN / f"seed-{args.seeds[0]}"
        snr = gradient_signal_to_noise(
            first / "pretrained", first / "banks" / "bank-00" / "data", args, plan
        )
        if not args.no_cross_check and 1.0 in args.epsilons:
            cross_check = _cross_check(args, rows, work)
    result = {
        "seeds": args.seeds,
        "epsilons": list(columns),
        "banks": args.banks,
        "rounds": args.rounds,
        "delta": PrivacyPolicy().delta,
        "plan": asdict(plan),
        "policy": asdict(PrivacyPolicy()),
        "hgb_grid": HGB_GRID,
        "data": data,
        "noise_multipliers": sigmas,
        "gradient_snr": snr,
        "rows": rows,
        "summary": summarise(rows, list(columns)),
        "scenarios": [asdict(sc) for sc in scenarios],
        "cross_check": cross_check,
        "seconds_by_method": {k: round(v, 1) for k, v in seconds.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    plot(result, PLOT_FILE)
    return result


def _eps_key(epsilon: float) -> str:
    return f"{epsilon:g}"


@dataclass(frozen=True)
class Scenario:
    """One data split and the methods and ε columns measured on it."""

    name: str
    public_fraction: float
    methods: tuple[str, ...]
    columns: tuple[str, ...]


def _run_seed(
    seed: int,
    scenario: Scenario,
    args: argparse.Namespace,
    plan: TrainPlanConfig,
    work: Path,
    bar: Any,
    seconds: dict[str, float],
) -> tuple[list[Row], dict[str, Any]]:
    """Every bank's metrics under every method and ε for one seed, and the seed's data sizes."""
    source = load_source("lending-club")
    split = source.split(
        SplitConfig(num_banks=args.banks, public_fraction=scenario.public_fraction, seed=seed)
    )
    encoder_dir = work / "pretrained"
    pretrain(
        split.public,
        source.label,
        source.positive_label,
        encoder_dir,
        PretrainConfig(seed=seed),
        exclude=source.excluded_columns,
        source=source.name,
        progress=False,
    )
    start = load_encoder_checkpoint(encoder_dir)
    banks = lay_out_banks(split, work, PrivacyPolicy()).banks
    test_rows = {b.name: len(b.test) for b in split.banks}
    data = {
        "scenario": scenario.name,
        "seed": seed,
        "public_rows": len(split.public),
        "banks": {
            b.name: {
                "train_rows": len(b.train),
                "train_defaults": int((b.train[source.label] == source.positive_label).sum()),
                "test_rows": len(b.test),
                "test_defaults": int((b.test[source.label] == source.positive_label).sum()),
            }
            for b in split.banks
        },
    }
    rows: list[Row] = []

    def add(method: str, column: str, per_bank: dict[str, dict[str, float]]) -> None:
        for bank, metrics in per_bank.items():
            rows.append(
                {
                    "scenario": scenario.name,
                    "seed": seed,
                    "epsilon": column,
                    "method": method,
                    "bank": bank,
                    "auc": metrics["auc"],
                    "ks": metrics["ks"],
                    "test_rows": test_rows[bank],
                    "epsilon_spent": metrics.get("epsilon", 0.0),
                }
            )

    def timed(method: str, work_: Callable[[], dict[str, dict[str, float]]]) -> Any:
        began = time.perf_counter()
        out = work_()
        seconds[method] = seconds.get(method, 0.0) + time.perf_counter() - began
        bar.update(1)
        return out

    columns, methods = scenario.columns, scenario.methods
    if "a_public" in methods:
        public = timed("a_public", lambda: public_model_metrics(encoder_dir, split))
        for column in columns:
            add("a_public", column, public)  # spends no ε: the same at every budget
    if "f_pooled" in methods:
        pooled = timed("f_pooled", lambda: pooled_metrics(split, source, work / "pooled", seed))
        add("f_pooled", NON_PRIVATE, pooled)
    if "hgb_alone" in methods:
        hgb = timed("hgb_alone", lambda: hgb_metrics(split, start.schema, seed))
        add("hgb_alone", NON_PRIVATE, hgb)
    for column in columns:
        private = column != NON_PRIVATE
        policy = PrivacyPolicy(epsilon_budget=float(column)) if private else PrivacyPolicy()
        for method in (m for m in TRAINED if m in methods):
            bar.set_postfix(scenario=scenario.name, seed=seed, epsilon=column, method=method)
            state_root = work / "state" / column / method
            settings = [
                replace(b, policy=policy, seed=seed, state_dir=state_root / b.name) for b in banks
            ]
            per_bank = timed(
                method,
                partial(
                    _train_method, method, settings, private, start, encoder_dir,
                    args.rounds, plan, seed,
                ),
            )  # fmt: skip
            add(method, column, per_bank)
    return rows, data


def noise_multipliers(
    epsilons: list[float], data: list[dict[str, Any]], plan: TrainPlanConfig, rounds: int
) -> dict[str, Any]:
    """σ a bank of the median size calibrates at each ε, for modes full and fedrep (whose
    round takes head steps too, so each step gets more noise)."""
    sizes = sorted(b["train_rows"] for seed in data for b in seed["banks"].values())
    rows = sizes[len(sizes) // 2]
    policy = PrivacyPolicy()
    q = accounting.sample_rate_for(rows, min(plan.batch_size, rows))
    steps = {"full": math.ceil(plan.local_epochs / q)}
    steps["fedrep"] = steps["full"] + math.ceil(plan.head_epochs / q)
    out: dict[str, Any] = {"bank_train_rows": rows, "sample_rate": q, "steps_per_round": steps}
    for epsilon in epsilons:
        out[_eps_key(epsilon)] = {
            mode: accounting.calibrate_noise_multiplier(
                [], q, per_round, rounds, policy.delta, epsilon,
                policy.min_noise_multiplier, policy.max_grad_norm,
                max_noise_multiplier=policy.max_noise_multiplier,
            ) or math.nan
            for mode, per_round in steps.items()
        }  # fmt: skip
    return out


def gradient_signal_to_noise(
    encoder_dir: Path, data_dir: Path, args: argparse.Namespace, plan: TrainPlanConfig
) -> dict[str, Any]:
    """How much of a DP step is signal: bank 0 (first seed) at the public model.

    Signal: the norm of the mean of all per-example gradients clipped to the policy's norm C
    (what a DP batch averages, in expectation). Noise: the expected norm of the Gaussian noise
    in that average, σ·C·√d / B, with σ calibrated for the batch size B at each ε.
    """
    policy = PrivacyPolicy()
    start = load_encoder_checkpoint(encoder_dir)
    model = start.build_model(args.seeds[0])
    head = load_source_head(encoder_dir)
    if head is not None:
        model.head.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in head.items()})
    # A train/test directory: the split key is not used (it splits single files only).
    train, _ = load_bank_data(data_dir, start.schema, 0.25, split_key=bytes(32))
    parameters = [p for p in model.parameters() if p.requires_grad]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    clipped_sum = [torch.zeros_like(p) for p in parameters]
    norms = []
    for index in range(len(train.numeric)):
        numeric = torch.from_numpy(train.numeric[index : index + 1])
        categorical = torch.from_numpy(train.categorical[index : index + 1])
        target = torch.from_numpy(train.label[index : index + 1])  # type: ignore[index]
        grads = torch.autograd.grad(loss_fn(model(numeric, categorical), target), parameters)
        norm = float(torch.sqrt(sum((g**2).sum() for g in grads)))  # type: ignore[arg-type]
        norms.append(norm)
        scale = min(1.0, policy.max_grad_norm / (norm + 1e-12))
        for total, g in zip(clipped_sum, grads, strict=True):
            total += g * scale
    rows = len(train.numeric)
    signal = float(torch.sqrt(sum((t**2).sum() for t in clipped_sum))) / rows  # type: ignore[arg-type]
    dimension = sum(p.numel() for p in parameters)
    by_batch: dict[str, dict[str, dict[str, float]]] = {}
    for batch in sorted({plan.batch_size, 4 * plan.batch_size}):
        q = accounting.sample_rate_for(rows, min(batch, rows))
        steps = math.ceil(plan.local_epochs / q)
        by_batch[str(batch)] = {}
        for epsilon in args.epsilons:
            sigma = accounting.calibrate_noise_multiplier(
                [], q, steps, args.rounds, policy.delta, epsilon, policy.min_noise_multiplier,
                policy.max_grad_norm, max_noise_multiplier=policy.max_noise_multiplier,
            ) or math.nan  # fmt: skip
            noise = sigma * policy.max_grad_norm * math.sqrt(dimension) / batch
            by_batch[str(batch)][_eps_key(epsilon)] = {
                "sigma": sigma,
                "steps_per_round": steps,
                "noise_norm": noise,
                "snr": signal / noise,
            }
    return {
        "bank_train_rows": rows,
        "parameters": dimension,
        "median_example_grad_norm": statistics.median(norms),
        "clipped_fraction": sum(n > policy.max_grad_norm for n in norms) / rows,
        "mean_clipped_grad_norm": signal,
        "by_batch": by_batch,
    }


def _train_method(
    method: str,
    banks: list[BankSettings],
    private: bool,
    start: EncoderCheckpoint,
    encoder_dir: Path,
    rounds: int,
    plan: TrainPlanConfig,
    seed: int,
    run_id: int = 1,
) -> dict[str, dict[str, float]]:
    """Every bank's final test metrics (and ε spent) under one trained method."""
    scratch = method == "b_alone_scratch"
    if private and method in ("b_alone_scratch", "c_alone_transfer"):
        return {
            b.name: train_alone(
                b, start, encoder_dir, rounds, plan, from_scratch=scratch, seed=seed
            )
            for b in banks
        }
    sharing = SHARING[method]
    mode_plan = replace(plan, mode="fedrep") if method == "d_fedfin_fedrep" else plan
    initial = (
        shared_arrays(build_model(start.schema, start.model_config, seed)) if scratch else None
    )
    result = run_federated_loop(
        banks,
        start,
        None if scratch else load_source_head(encoder_dir),
        LoopConfig(rounds=rounds, plan=mode_plan, sharing=sharing, private=private, run_id=run_id),
        initial_encoder=initial,
    )
    return result.per_bank


def pooled_metrics(
    split: FederatedSplit, source: DataSource, directory: Path, seed: int
) -> dict[str, dict[str, float]]:
    """f: one model trained without DP on the public pool and every bank's train rows pooled,
    with the pretraining recipe (early stopping on a hold-out), scored on each bank's test rows.
    """
    pooled = pd.concat([split.public, *(bank.train for bank in split.banks)], ignore_index=True)
    pretrain(
        pooled,
        source.label,
        source.positive_label,
        directory,
        PretrainConfig(seed=seed),
        exclude=source.excluded_columns,
        source=f"{source.name}: public pool + all banks' train rows",
        progress=False,
    )
    return public_model_metrics(directory, split)


def hgb_metrics(
    split: FederatedSplit, schema: FeatureSchema, seed: int
) -> dict[str, dict[str, float]]:
    """The tabular model a bank uses today: gradient-boosted trees on its own rows only,
    hyper-parameters picked by 3-fold stratified CV (AUC) on its train split."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from threadpoolctl import threadpool_limits

    def features(table: EncodedTable) -> np.ndarray:
        return np.hstack([table.numeric, table.categorical.astype(np.float32)])

    categorical = [False] * len(schema.numeric) + [True] * len(schema.categorical)
    out = {}
    with threadpool_limits(1):
        for bank in split.banks:
            train = schema.transform(bank.train, bank.name)
            test = schema.transform(bank.test, bank.name)
            search = GridSearchCV(
                HistGradientBoostingClassifier(
                    categorical_features=categorical, early_stopping=False, random_state=seed
                ),
                HGB_GRID,
                scoring="roc_auc",
                cv=StratifiedKFold(3, shuffle=True, random_state=seed),
            )
            search.fit(features(train), train.label)
            probabilities = search.predict_proba(features(test))[:, 1]
            out[bank.name] = credit_metrics(test.label, probabilities)  # type: ignore[arg-type]
    return out


def _cross_check(args: argparse.Namespace, rows: list[Row], work: Path) -> dict[str, Any]:
    """Rerun d full at ε=1 (first seed) with the real `fedfin simulate` on Flower + Ray, then
    rerun the loop with Flower's run id, which seeds the banks' DP noise: same noise draws."""
    seed = args.seeds[0]
    out = work / "cross-check"
    encoder_dir = work / MAIN / f"seed-{seed}" / "pretrained"
    command = [
        sys.executable, "-m", "fedfin.simulations.cli", "simulate",
        "--banks", str(args.banks), "--rounds", str(args.rounds), "--epsilon", "1",
        "--seed", str(seed), "--encoder", str(encoder_dir), "--out", str(out), "--no-audit",
    ]  # fmt: skip
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home")}
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    seconds = time.perf_counter() - began
    report = json.loads((out / "report.json").read_text())
    flower = {name: bank["auc_federated"] for name, bank in report["per_bank"].items()}
    loop = {
        r["bank"]: r["auc"]
        for r in rows
        if r["scenario"] == MAIN
        and r["seed"] == seed
        and r["epsilon"] == "1"
        and r["method"] == "d_fedfin_full"
    }
    run_id = int(PrivacyLedger(out / "banks" / "bank-00" / "state").entries()[0]["run_id"])
    source = load_source("lending-club")
    split = source.split(SplitConfig(num_banks=args.banks, seed=seed))
    policy = PrivacyPolicy(epsilon_budget=1.0)
    banks = [
        replace(b, seed=seed, state_dir=work / "cross-check-loop" / b.name)
        for b in lay_out_banks(split, work / "cross-check-loop", policy).banks
    ]
    start = load_encoder_checkpoint(encoder_dir)
    same_noise = _train_method(
        "d_fedfin_full", banks, True, start, encoder_dir, args.rounds, TrainPlanConfig(), seed,
        run_id=run_id,
    )  # fmt: skip
    same = {name: metrics["auc"] for name, metrics in same_noise.items()}
    shown = [c.replace(str(work), "$WORK") for c in command[3:]]
    return {
        "command": "fedfin " + " ".join(shown),
        "seed": seed,
        "flower_run_id": run_id,
        "flower_mean_auc": statistics.mean(flower.values()),
        "loop_mean_auc": statistics.mean(loop.values()),
        "loop_same_noise_mean_auc": statistics.mean(same.values()),
        "max_bank_difference_same_noise": max(abs(flower[b] - same[b]) for b in flower),
        "flower_per_bank": flower,
        "loop_per_bank": loop,
        "loop_same_noise_per_bank": same,
        "flower_seconds": round(seconds, 1),
    }


def summarise(
    rows: list[Row], columns: list[str], scenario: str = MAIN
) -> dict[str, dict[str, dict[str, float]]]:
    """method -> ε -> mean and std over seeds of mean, worst-bank and weighted AUC, mean KS."""
    rows = [r for r in rows if r.get("scenario", MAIN) == scenario]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method in METHODS:
        summary[method] = {}
        for column in columns:
            cells = [r for r in rows if r["method"] == method and r["epsilon"] == column]
            if not cells:
                continue
            per_seed: dict[str, list[float]] = {
                "mean_auc": [], "worst_auc": [], "weighted_auc": [], "mean_ks": [], "max_eps": []
            }  # fmt: skip
            for seed in sorted({r["seed"] for r in cells}):
                banks = [r for r in cells if r["seed"] == seed]
                weights = [r["test_rows"] for r in banks]
                per_seed["mean_auc"].append(statistics.mean(r["auc"] for r in banks))
                per_seed["worst_auc"].append(min(r["auc"] for r in banks))
                per_seed["weighted_auc"].append(
                    sum(r["auc"] * w for r, w in zip(banks, weights, strict=True)) / sum(weights)
                )
                per_seed["mean_ks"].append(statistics.mean(r["ks"] for r in banks))
                per_seed["max_eps"].append(max(r["epsilon_spent"] for r in banks))
            cell: dict[str, float] = {"seeds": len(per_seed["mean_auc"])}
            for key, values in per_seed.items():
                cell[key] = statistics.mean(values)
                cell[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[method][column] = cell
    return summary


MIN_DIFFERENCE = 0.005  # AUC: smaller gaps are not worth a bank's decision either way
COMPARISONS = (  # (fedfin mode, against, compare with the other's non-private column?)
    ("d_fedfin_full", "a_public", False),
    ("d_fedfin_full", "b_alone_scratch", False),
    ("d_fedfin_full", "c_alone_transfer", False),
    ("d_fedfin_full", "e_fedavg_model", False),
    ("d_fedfin_fedrep", "c_alone_transfer", False),
    ("d_fedfin_full", "hgb_alone", True),
    ("d_fedfin_full", "f_pooled", True),
)


def paired_difference(
    rows: list[Row],
    method: str,
    other: str,
    column: str,
    other_column: str | None = None,
    scenario: str = MAIN,
) -> tuple[float, float]:
    """Mean and std over seeds of (mean bank AUC of `method` - that of `other`), paired by seed."""
    rows = [r for r in rows if r.get("scenario", MAIN) == scenario]
    diffs = []
    for seed in sorted({r["seed"] for r in rows}):

        def mean_auc(m: str, c: str, s: int = seed) -> float:
            return statistics.mean(
                r["auc"] for r in rows if r["method"] == m and r["epsilon"] == c and r["seed"] == s
            )

        diffs.append(mean_auc(method, column) - mean_auc(other, other_column or column))
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0


def verdict(mean: float, std: float, seeds: int) -> str:
    """'wins' / 'loses' when the paired gap is over two standard errors and MIN_DIFFERENCE."""
    margin = max(2 * std / math.sqrt(seeds), MIN_DIFFERENCE)
    if mean > margin:
        return "wins"
    if mean < -margin:
        return "loses"
    return "no clear difference"


def comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """fedfin against each alternative at each ε: paired mean-AUC gap and its verdict."""
    rows, seeds = result["rows"], len(result["seeds"])
    out = []
    for method, other, non_private_other in COMPARISONS:
        for column in result["epsilons"]:
            mean, std = paired_difference(
                rows, method, other, column, NON_PRIVATE if non_private_other else None
            )
            out.append(
                {
                    "method": method,
                    "other": other,
                    "epsilon": column,
                    "gap": mean,
                    "gap_std": std,
                    "verdict": verdict(mean, std, seeds),
                }
            )
    return out


def headline(result: dict[str, Any]) -> str:
    """Two sentences for the top of RESULTS.md: fedfin at ε = 1 against the alternatives."""
    column = "1" if "1" in result["epsilons"] else result["epsilons"][0]
    summary = result["summary"]

    def auc(method: str, col: str = column) -> str:
        cell = summary[method][col]
        return f"{cell['mean_auc']:.3f} ± {cell['mean_auc_std']:.3f}"

    verdicts = {(c["method"], c["other"]): c for c in comparisons(result) if c["epsilon"] == column}

    def said(other: str) -> str:
        c = verdicts[("d_fedfin_full", other)]
        return f"{c['verdict']} ({c['gap']:+.3f} ± {c['gap_std']:.3f})"

    return (
        f"**Headline** (Lending Club, {result['banks']} banks, ε = {column} per bank, mean bank "
        f"AUC over seeds {result['seeds']}): fedfin {auc('d_fedfin_full')}; each bank alone "
        f"from scratch {auc('b_alone_scratch')}, alone with the public encoder "
        f"{auc('c_alone_transfer')}; public model untouched {auc('a_public')}; whole-model "
        f"FedAvg {auc('e_fedavg_model')}; non-private: per-bank gradient boosting "
        f"{auc('hgb_alone', NON_PRIVATE)}, pooled ceiling {auc('f_pooled', NON_PRIVATE)}. "
        f"Against alone-from-scratch fedfin {said('b_alone_scratch')}; against the public model "
        f"{said('a_public')}; against alone-with-transfer {said('c_alone_transfer')}; against "
        f"per-bank gradient boosting {said('hgb_alone')}."
    )


def not_winning(result: dict[str, Any]) -> str:
    """The verdict table and, in numbers, why fedfin does not win where it does not."""
    columns = result["epsilons"]
    found = comparisons(result)
    lines = [
        "### Where fedfin wins and where it does not",
        "",
        "Paired gap in mean bank AUC (fedfin minus the alternative, mean ± std over seeds, "
        "paired by seed). *wins*/*loses*: the gap exceeds both two standard errors and "
        f"{MIN_DIFFERENCE} AUC; with {len(result['seeds'])} seeds this is a rough test. "
        "gradient boosting and the pooled ceiling are non-private, so every column compares "
        "fedfin at that ε with their one non-private number.",
        "",
        "| fedfin vs | "
        + " | ".join(f"ε = {c}" if c != NON_PRIVATE else c for c in columns)
        + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method, other, _ in COMPARISONS:
        cells = [
            f"{c['gap']:+.4f} ± {c['gap_std']:.4f} ({c['verdict']})"
            for c in found
            if c["method"] == method and c["other"] == other
        ]
        mode = "full" if method == "d_fedfin_full" else "fedrep"
        label = METHODS[other].split(" (")[0].replace("**", "")
        lines.append(f"| {mode} vs {label} | " + " | ".join(cells) + " |")
    lines += ["", *why(result), ""]
    return "\n".join(lines)


def why(result: dict[str, Any]) -> list[str]:
    """The measured facts behind the verdicts, as a reader needs them to judge fedfin."""
    data = [d for d in result["data"] if d.get("scenario", MAIN) == MAIN]
    banks = [b for seed in data for b in seed["banks"].values()]
    public = statistics.mean(seed["public_rows"] for seed in data)
    rows, columns = result["rows"], result["epsilons"]
    eps = [c for c in columns if c != NON_PRIVATE]
    sigmas, snr = result["noise_multipliers"], result["gradient_snr"]
    batch = str(result["plan"]["batch_size"])
    big = max(snr["by_batch"], key=int)

    def gap(method: str, other: str, column: str = NON_PRIVATE) -> str:
        mean, std = paired_difference(rows, method, other, column)
        return f"{mean:+.4f} ± {std:.4f}"

    heads = max(
        abs(paired_difference(rows, "d_fedfin_full", "e_fedavg_model", c)[0]) for c in columns
    )
    per_step = ", ".join(
        f"ε = {c}: σ = {sigmas[c]['full']:.2f}, noise norm "
        f"{snr['by_batch'][batch][c]['noise_norm']:.2f}, signal/noise "
        f"{snr['by_batch'][batch][c]['snr']:.2f}"
        for c in eps
    )
    alone_loses = paired_difference(rows, "c_alone_transfer", "a_public", NON_PRIVATE)[0] < 0
    return [
        "Why, in numbers:",
        "",
        f"- **Small banks, few defaults.** A bank trains on {min(b['train_rows'] for b in banks)}"
        f"-{max(b['train_rows'] for b in banks)} loans with only "
        f"{min(b['train_defaults'] for b in banks)}-{max(b['train_defaults'] for b in banks)} "
        f"defaults and is tested on {min(b['test_defaults'] for b in banks)}-"
        f"{max(b['test_defaults'] for b in banks)} defaults; the split changes with the seed, "
        "which is why absolute AUCs vary by ±0.04 between seeds and only paired gaps separate "
        "methods.",
        f"- **Little left to learn beyond the public model.** Pretraining sees {public:.0f} "
        f"public loans ({public / statistics.mean(b['train_rows'] for b in banks):.1f} times a "
        "bank's train rows) from the same loan population. Without DP, fedfin (full) changes "
        f"mean AUC by {gap('d_fedfin_full', 'a_public')} against the untouched public model, "
        f"and a bank fine-tuning alone by {gap('c_alone_transfer', 'a_public')}"
        + (
            " (alone, it overfits its few defaults; averaging over banks is what prevents that)."
            if alone_loses
            else "."
        ),
        f"- **DP noise swamps that small signal.** At the public model, bank 0's per-example "
        f"gradients (median norm {snr['median_example_grad_norm']:.3f}, "
        f"{snr['clipped_fraction']:.0%} clipped at C = {result['policy']['max_grad_norm']}) "
        f"average to a clipped gradient of norm {snr['mean_clipped_grad_norm']:.3f}. One DP step "
        f"(batch {batch}, {snr['parameters']:,} parameters) adds Gaussian noise of norm "
        f"σ·C·√d/B; with the σ each ε calibrates to ({per_step}), every step is mostly noise. "
        "Averaging five banks' encoders divides the noise by at most √5 ≈ 2.2, so fedfin, "
        "alone-with-transfer and whole-model FedAvg all stay within about ±0.01 of the public "
        "model; a larger ε lets the noisy steps move the model further, and slightly down. "
        f"Batches of {big} would lift the per-step signal/noise to "
        + ", ".join(f"{snr['by_batch'][big][c]['snr']:.2f}" for c in eps)
        + " (fewer, less noisy steps); not measured for utility here.",
        f"- **Private heads cost no utility.** fedfin (encoder shared, heads private) and "
        f"whole-model FedAvg differ by at most {heads:.4f} mean AUC at any ε: keeping the head "
        "in the bank is free here, but it does not buy accuracy either (banks are drawn from "
        "similar populations).",
        f"- **fedrep** spends the same ε on {sigmas['steps_per_round']['fedrep']} instead of "
        f"{sigmas['steps_per_round']['full']} steps a round (head steps first), so each step "
        "is noisier (σ "
        + ", ".join(f"{sigmas[c]['fedrep']:.2f}" for c in eps)
        + "); fedrep minus full, mean AUC: "
        + ", ".join(f"{gap('d_fedfin_fedrep', 'd_fedfin_full', c)} at ε = {c}" for c in eps)
        + ".",
    ]


def plot(result: dict[str, Any], path: Path) -> None:
    """Mean and worst-bank AUC against ε, and each method's gain over the public model.

    The splits differ between seeds, so absolute AUCs vary a lot from seed to seed; the gain
    over the public model, paired by seed, is what separates the methods.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    columns: list[str] = result["epsilons"]
    figure, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    panels = (("mean_auc", "mean bank AUC"), ("worst_auc", "worst bank AUC"), (None, ""))
    short = {"a_public": "a. public model", "f_pooled": "f. pooled", "hgb_alone": "GBT alone"}
    for axis, (key, title) in zip(axes, panels, strict=True):
        for index, method in enumerate(TRAINED):
            x = [i + (index - 2) * 0.06 for i in range(len(columns))]
            if key is None:
                if method == "b_alone_scratch":
                    axis.plot([], [])  # keep each method's colour; b is far below this panel
                    continue
                gaps = [paired_difference(result["rows"], method, "a_public", c) for c in columns]
                y, err = [g[0] for g in gaps], [g[1] for g in gaps]
            else:
                y = [summary[method][c][key] for c in columns]
                err = [summary[method][c][f"{key}_std"] for c in columns]
            axis.errorbar(
                x, y, yerr=err, marker="o", capsize=3, elinewidth=0.8,
                label=METHODS[method].replace("**", ""),
            )  # fmt: skip
        references = (("a_public", ":"), ("f_pooled", "--"), ("hgb_alone", "-."))
        for method, style in references if key else ():
            value = summary[method][NON_PRIVATE][key]
            axis.axhline(value, linestyle=style, color="grey", linewidth=1.2)
            axis.text(
                0.01,
                value,
                short[method],
                fontsize=7,
                va="bottom",
                transform=axis.get_yaxis_transform(),
            )
        ylabel = f"AUC, mean ± std over seeds {result['seeds']}"
        if key is None:
            axis.axhline(0.0, linestyle=":", color="grey", linewidth=1.2)
            title = "AUC gain over the public model (a), paired by seed (b omitted)"
            ylabel = "AUC minus the public model's, mean ± std over seeds"
        axis.set_xticks(range(len(columns)), [c if c == NON_PRIVATE else f"ε={c}" for c in columns])
        axis.set_xlabel("privacy budget per bank (δ = 1e-5)")
        axis.set_ylabel(ylabel)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    figure.suptitle(
        f"Lending Club, {result['banks']} banks, {result['rounds']} rounds of 1 local epoch"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def scarce_public_section(result: dict[str, Any]) -> list[str]:
    """a, c, d and f again on a split whose public pool is small: does federating help then?"""
    scenario = next((sc for sc in result.get("scenarios", []) if sc["name"] == SCARCE), None)
    if scenario is None:
        return []
    columns, methods = scenario["columns"], scenario["methods"]
    summary = summarise(result["rows"], columns, SCARCE)
    data = [d for d in result["data"] if d["scenario"] == SCARCE]
    banks = [b for d in data for b in d["banks"].values()]
    lines = [
        f"### When public data is scarce (public fraction {scenario['public_fraction']})",
        "",
        f"The same seeds, banks and rounds, but the public pool takes only "
        f"{scenario['public_fraction']:.0%} of the loans "
        f"({min(d['public_rows'] for d in data)}-{max(d['public_rows'] for d in data)} rows); "
        f"banks train on {min(b['train_rows'] for b in banks)}-"
        f"{max(b['train_rows'] for b in banks)} loans with "
        f"{min(b['train_defaults'] for b in banks)}-{max(b['train_defaults'] for b in banks)} "
        "defaults. Mean bank AUC, mean ± std over seeds:",
        "",
        "| method | " + " | ".join(c if c == NON_PRIVATE else f"ε = {c}" for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method in methods:
        cells = [
            f"{cell['mean_auc']:.4f} ± {cell['mean_auc_std']:.4f}"
            if (cell := summary[method].get(c))
            else "—"
            for c in columns
        ]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    seeds = len(result["seeds"])
    for other in ("a_public", "c_alone_transfer"):
        cells = []
        for column in columns:
            gap, std = paired_difference(
                result["rows"], "d_fedfin_full", other, column, scenario=SCARCE
            )
            cells.append(f"{gap:+.4f} ± {std:.4f} ({verdict(gap, std, seeds)})")
        label = METHODS[other].split(" (")[0]
        lines.append(f"| fedfin (full) minus {label}, paired | " + " | ".join(cells) + " |")
    private = [c for c in columns if c != NON_PRIVATE]
    gains = {c: paired_difference(result["rows"], "d_fedfin_full", "a_public", c, scenario=SCARCE)
             for c in columns}  # fmt: skip
    lines += [
        "",
        f"With a weaker public model there is more to learn from the banks: without DP, fedfin "
        f"adds {gains[NON_PRIVATE][0]:+.4f} over the public model here, against "
        f"{paired_difference(result['rows'], 'd_fedfin_full', 'a_public', NON_PRIVATE)[0]:+.4f} "
        "on the main split. Under DP ("
        + ", ".join(f"ε = {c}: {gains[c][0]:+.4f} ± {gains[c][1]:.4f}" for c in private)
        + (
            ") the same noise limit applies: DP fine-tuning, federated or alone, does not turn "
            "the banks' data into a clear gain over the public model at these budgets."
            if all(verdict(*gains[c], seeds) != "wins" for c in private)
            else ") fedfin keeps part of that gain."
        ),
    ]
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    columns: list[str] = result["epsilons"]
    lines = [
        f"## Privacy-utility: Lending Club, {result['banks']} banks, {result['rounds']} rounds, "
        f"seeds {result['seeds']}",
        "",
        f"Command: `{result['command']}`; {result['seconds']} s "
        f"(by method: {', '.join(f'{k} {v} s' for k, v in result['seconds_by_method'].items())}).",
        "",
    ]
    for key, title in (
        ("mean_auc", "Mean bank AUC"),
        ("worst_auc", "Worst bank AUC"),
        ("weighted_auc", "Weighted AUC (banks weighted by test rows)"),
        ("mean_ks", "Mean bank KS"),
    ):
        lines += [
            f"**{title}** (mean ± std over seeds; ε per bank, δ = {result['delta']})",
            "",
            "| method | "
            + " | ".join(f"ε = {c}" if c != NON_PRIVATE else c for c in columns)
            + " |",
            "|---|" + "---|" * len(columns),
        ]
        for method, label in METHODS.items():
            cells = []
            for column in columns:
                cell = summary[method].get(column)
                cells.append(f"{cell[key]:.4f} ± {cell[f'{key}_std']:.4f}" if cell else "—")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "**ε actually spent** (largest over banks, mean over seeds; the budget is never exceeded)",
        "",
        "| method | " + " | ".join(f"ε = {c}" for c in columns if c != NON_PRIVATE) + " |",
        "|---|" + "---|" * (len(columns) - 1),
    ]
    for method in TRAINED:
        cells = [f"{summary[method][c]['max_eps']:.3f}" for c in columns if c != NON_PRIVATE]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    lines += ["", f"![AUC vs ε](results/{PLOT_FILE.name})", "", not_winning(result), ""]
    lines += scarce_public_section(result)
    check = result.get("cross_check")
    if check:
        lines += [
            "**Cross-check against the real Flower simulation.** The tables above run d and e in "
            "`simulations/federated_loop.py`: every bank runs `bank_worker.train_round` / "
            "`evaluate_round` and the server takes FedAvg's weighted mean, without Ray or "
            "messages. One cell was rerun with the real thing, "
            f"`{check['command']}` (seed {check['seed']}, {check['flower_seconds']} s): "
            f"mean bank AUC **{check['flower_mean_auc']:.4f}** on Flower's simulation engine vs "
            f"**{check['loop_mean_auc']:.4f}** in the loop's table cell. The two draw different "
            "DP noise, because each bank seeds its noise with the run id (Flower's is "
            f"{check['flower_run_id']}, the loop's 1). Rerun in the loop with Flower's run id, "
            f"so with the same noise, the loop gives **{check['loop_same_noise_mean_auc']:.4f}**"
            + (
                " — identical to Flower's for every bank: the loop is the simulation minus "
                "transport."
                if check["max_bank_difference_same_noise"] == 0
                else f" (largest per-bank difference {check['max_bank_difference_same_noise']:.1e})"
                "."
            ),
            "",
        ]
    return "\n".join(lines)
