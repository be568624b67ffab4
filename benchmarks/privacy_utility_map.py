"""Privacy-utility map: from what bank size and ε does DP federation beat the public model?

Cells: loans per bank × number of banks × ε per bank (and non-private), on synthetic banks
fitted to Lending Club (`common.lending_club_generator`: public source in the West and
Northeast, banks in the South and Midwest, each with its own shift). Per seed, every method of
a cell sees the same data, the same public encoder and the same per-bank test sets:
  a_public    pretrained encoder + source head (on the generator's public source);
  d_fedfin    shared encoder federated with DP-SGD (`client.budget.approve_round` +
              `client.dp_training.train_with_dp` each bank-round, FedAvg of the encoders),
              private heads;
  c_alone     each bank alone: the same DP fine-tuning of the public encoder, same budget;
  hgb_alone   each bank alone, non-private HistGradientBoosting (fixed hyper-parameters);
  f_pooled    non-private: the public model fine-tuned on public + all banks' train rows.
The non-private column runs d and c with the same recipe without clipping or noise.

Why a lean loop, not `simulations/federated_loop.py`: that loop reloads, re-validates and
re-encodes the bank's table from disk every bank-round (`client.bank_data.load_bank_data`:
19 s for a 1M-row bank from train/test Parquet, 168 s from one CSV with the keyed split, on
the shared 2-core machine) and writes the ledger, against about 1-3 s of DP training a round
in this recipe. The lean loop keeps each bank's encoded table, head and charged DP events in
memory and calls the same approval (`approve_round`, noise plan cached in a per-bank
`BankState` as in production) and the same `train_with_dp`; no ledger, no release records.

    python -m benchmarks privacy-utility-map                  # the full map (1 core; see the md)
    python -m benchmarks.privacy_utility_map --quick --out /tmp/map   # a smoke test
    python -m benchmarks privacy-utility-map --cells 100000x20 --map-seeds 0
    python -m benchmarks.privacy_utility_map --report-only    # md and PNG from the JSON
"""

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedfin.common import accounting
from fedfin.common.checkpoint import EncoderCheckpoint, load_encoder_checkpoint
from fedfin.common.config import PretrainConfig, PrivacyPolicy, TrainPlanConfig
from fedfin.common.errors import PrivacyBudgetError
from fedfin.common.lending_club import LABEL, POSITIVE_LABEL, STATE_COLUMN
from fedfin.common.lending_club_generator import LendingClubGenerator
from fedfin.common.metrics import roc_auc
from fedfin.common.model import CreditModel
from fedfin.common.protocol import RoundInstructions
from fedfin.common.schema import EncodedTable
from fedfin.common.shared_weights import load_shared_arrays, shared_arrays
from fedfin.common.tensors import as_dataset, predict_proba
from fedfin.server.pretrain import pretrain
from fedfin.server.server_app import load_source_head
from fedfin.simulations.federated_loop import fedavg

NAME = "privacy-utility-map"
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_FILE = RESULTS / "privacy_utility_map.json"
NON_PRIVATE = "non-private"
METHODS = {
    "a_public": "a. public model (pretrained encoder + source head)",
    "d_fedfin": "d. fedfin: DP-federated encoder, private heads",
    "c_alone": "c. each bank alone, DP fine-tuning of the public encoder",
    "hgb_alone": "each bank alone, HistGradientBoosting (non-private)",
    "f_pooled": "f. pooled non-private: public + all banks' train rows",
}
HGB_PARAMS = {
    "max_iter": 60,
    "learning_rate": 0.15,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
    "early_stopping": False,
}
Row = dict[str, Any]


@dataclass(frozen=True)
class Recipe:
    """How a bank of `rows` loans trains: it scales with n, and the steps are capped."""

    rounds: int = 4
    steps_per_round: int = 12
    min_batch: int = 64
    max_batch: int = 1024
    batch_fraction: float = 1 / 20  # expected batch ~ clamp(n / 20, 64, 1024)
    learning_rate: float = 2e-3
    max_grad_norm: float = 1.0
    max_delta: float = 1e-5  # δ = min(1e-5, 0.1 / n)
    test_rows: int = 10_000
    alone_banks: int = 5  # c and gradient boosting run on banks 0-4, members of every cell
    public_rows: int = 30_000
    pooled_steps: int = 300
    pooled_batch: int = 1024
    pretrain_epochs: int = 15
    calibration_rows: int = 200_000  # rows the generator fits each group's intercept on
    accountant: str = "prv"

    def batches_per_epoch(self, rows: int) -> int:
        batch = min(max(rows * self.batch_fraction, self.min_batch), self.max_batch)
        return max(2, round(rows / batch))

    def delta(self, rows: int) -> float:
        return min(self.max_delta, 0.1 / rows)

    def for_bank(self, rows: int) -> dict[str, Any]:
        """The bank's sample rate, batch, steps and δ at this size (for the JSON and the md)."""
        k = self.batches_per_epoch(rows)
        steps = min(self.steps_per_round, k)
        return {
            "rows": rows,
            "sample_rate": 1 / k,
            "expected_batch": round(rows / k),
            "steps_per_round": steps,
            "epochs_per_round": steps / k,
            "delta": self.delta(rows),
        }


@dataclass(frozen=True)
class Cell:
    rows: int
    banks: int
    columns: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.rows}x{self.banks}"


FULL_CELLS = (
    *(
        Cell(rows, banks, ("1", "3", "8", NON_PRIVATE))
        for rows in (1_000, 10_000, 100_000)
        for banks in (5, 20)
    ),
    Cell(1_000_000, 5, ("1", "8", NON_PRIVATE)),
)
QUICK_CELLS = (Cell(300, 2, ("1", NON_PRIVATE)), Cell(600, 3, ("8", NON_PRIVATE)))
QUICK_RECIPE = Recipe(
    rounds=3, steps_per_round=2, test_rows=400, public_rows=1_500, pooled_steps=5, alone_banks=2,
    pooled_batch=128, pretrain_epochs=2, calibration_rows=5_000,
    accountant="rdp",
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--map-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    group.add_argument(
        "--cells",
        nargs="+",
        metavar="ROWSxBANKS",
        help="only these cells of the map, e.g. 100000x20 1000000x5 (default: all)",
    )
    group.add_argument(
        "--quick", action="store_true", help="tiny cells and recipe: a smoke test in seconds"
    )
    group.add_argument("--out", type=Path, help="result directory (default: benchmarks/results)")
    group.add_argument(
        "--fresh", action="store_true", help="ignore finished cells in an existing result file"
    )
    group.add_argument(
        "--map-report-only",
        action="store_true",
        help="only rewrite the map's md and PNG from its JSON",
    )


def result_path(args: argparse.Namespace) -> Path:
    return (args.out or RESULTS) / RESULT_FILE.name


# --- one bank in memory -----------------------------------------------------------


@dataclass
class Bank:
    """A bank's encoded train/test rows and, per method run, its private head and DP events."""

    index: int
    train: EncodedTable
    test: EncodedTable
    train_defaults: int
    test_defaults: int


@dataclass
class BankRun:
    """One bank in one method run: its head, what it has charged, its noise-plan state."""

    bank: Bank
    policy: PrivacyPolicy
    state_dir: Path
    head: dict[str, torch.Tensor] | None = None
    past: list[accounting.DpEvent] = field(default_factory=list)
    epsilon: float = 0.0
    declined: int = 0


@dataclass(frozen=True)
class Public:
    checkpoint: EncoderCheckpoint
    head: Mapping[str, np.ndarray]
    holdout_auc: float


def model_of(
    public: Public, encoder: Mapping[str, np.ndarray], head: Mapping[str, Any] | None, seed: int
) -> CreditModel:
    model = public.checkpoint.build_model(seed)
    load_shared_arrays(model, encoder)
    source = head if head is not None else public.head
    model.head.load_state_dict(
        {k: torch.as_tensor(np.asarray(v), dtype=torch.float32).clone() for k, v in source.items()}
    )
    return model


def dp_round(
    run: BankRun,
    public: Public,
    encoder: Mapping[str, np.ndarray],
    plan: TrainPlanConfig,
    server_round: int,
    rounds: int,
    noise_seed: int,
) -> OrderedDict[str, np.ndarray] | None:
    """One bank-round through the bank's own approval and DP-SGD; None if declined."""
    from fedfin.client.bank_state import BankState
    from fedfin.client.budget import approve_round
    from fedfin.client.dp_training import train_with_dp

    checkpoint = public.checkpoint
    instructions = RoundInstructions(
        server_round, rounds, plan, checkpoint.schema, checkpoint.model_config
    )
    state = BankState(run.state_dir)
    try:
        approved = approve_round(state, run.policy, instructions, 1, list(run.past))
    except PrivacyBudgetError:
        run.declined += 1
        return None
    model = model_of(public, encoder, run.head, noise_seed)
    generator = torch.Generator().manual_seed(noise_seed)
    train_with_dp(model, run.bank.train, approved.plan, approved.past, generator)
    run.past.append(approved.plan.event())
    run.epsilon = approved.epsilon_after
    run.head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    return shared_arrays(model)


def plain_round(
    run: BankRun,
    public: Public,
    encoder: Mapping[str, np.ndarray],
    plan: TrainPlanConfig,
    steps: int,
    noise_seed: int,
) -> OrderedDict[str, np.ndarray]:
    """The non-private reference: same start, steps, batch and Adam; no clipping, no noise."""
    model = model_of(public, encoder, run.head, noise_seed)
    generator = torch.Generator().manual_seed(noise_seed)
    _adam_steps(model, run.bank.train, steps, plan.batch_size, plan.learning_rate, generator)
    run.head = {k: v.detach().clone() for k, v in model.head.state_dict().items()}
    return shared_arrays(model)


def _adam_steps(
    model: nn.Module,
    data: EncodedTable,
    steps: int,
    batch: int,
    learning_rate: float,
    generator: torch.Generator,
) -> None:
    dataset = as_dataset(data)
    rows = len(dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(steps):
        index = torch.randint(0, rows, (min(batch, rows),), generator=generator)
        numeric, categorical, target = dataset[index]
        optimizer.zero_grad()
        loss_fn(model(numeric, categorical), target).backward()
        optimizer.step()


def cell_policy(recipe: Recipe, rows: int, column: str, **overrides: Any) -> PrivacyPolicy:
    """A bank's policy in a cell: its ε column (1 for non-private runs, which never ask),
    the size's δ and sample rate, the recipe's clip and accountant."""
    shape = recipe.for_bank(rows)
    settings: dict[str, Any] = {
        "epsilon_budget": float(column) if column != NON_PRIVATE else 1.0,
        "delta": shape["delta"],
        "max_grad_norm": recipe.max_grad_norm,
        "sample_rate": shape["sample_rate"],
        "min_planned_rounds": min(3, recipe.rounds),
        "accountant": recipe.accountant,
    }
    return PrivacyPolicy(**{**settings, **overrides})


def train_method(
    method: str,
    column: str,
    banks: Sequence[Bank],
    public: Public,
    recipe: Recipe,
    rows: int,
    seed: int,
    work: Path,
) -> dict[int, dict[str, float]]:
    """d (federated) or c (alone) at one ε column: each bank's test AUC and ε spent."""
    shape = recipe.for_bank(rows)
    private = column != NON_PRIVATE
    policy = cell_policy(recipe, rows, column)
    plan = TrainPlanConfig(
        local_epochs=shape["epochs_per_round"],
        batch_size=shape["expected_batch"],
        learning_rate=recipe.learning_rate,
    )
    runs = [BankRun(b, policy, work / f"{method}-{column}-{b.index}" / "state") for b in banks]
    start = OrderedDict(public.checkpoint.arrays)
    encoders = {run.bank.index: start for run in runs}
    method_id = 1 if method == "d_fedfin" else 2
    for server_round in range(1, recipe.rounds + 1):
        uploads = []
        for run in runs:
            noise_seed = _seed(
                seed, rows, len(banks), method_id, column, run.bank.index, server_round
            )
            received = start if method == "d_fedfin" else encoders[run.bank.index]
            if private:
                arrays = dp_round(
                    run, public, received, plan, server_round, recipe.rounds, noise_seed
                )
            else:
                arrays = plain_round(
                    run, public, received, plan, shape["steps_per_round"], noise_seed
                )
            if arrays is not None:
                uploads.append(arrays)
                encoders[run.bank.index] = arrays
        if method == "d_fedfin" and len(uploads) >= 2:
            start = fedavg(uploads, [1.0] * len(uploads))  # no counts released: uniform
    out = {}
    for run in runs:
        encoder = start if method == "d_fedfin" else encoders[run.bank.index]
        model = model_of(public, encoder, run.head, seed)
        out[run.bank.index] = {
            "auc": _auc(model, run.bank.test),
            "epsilon_spent": run.epsilon,
            "declined_rounds": run.declined,
        }
    return out


def _seed(*parts: object) -> int:
    """A deterministic 63-bit seed from the run's coordinates (benchmarks only: the bank's
    production seed is secret)."""
    import hashlib

    text = "|".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _auc(model: nn.Module, table: EncodedTable) -> float:
    assert table.label is not None
    return roc_auc(table.label, predict_proba(model, table))


def pooled_auc(
    public: Public, public_table: EncodedTable, banks: Sequence[Bank], recipe: Recipe, seed: int
) -> dict[int, float]:
    """f: the public model fine-tuned without DP on public + all banks' train rows."""
    pooled = EncodedTable(
        numeric=np.concatenate([public_table.numeric, *(b.train.numeric for b in banks)]),
        categorical=np.concatenate(
            [public_table.categorical, *(b.train.categorical for b in banks)]
        ),
        label=np.concatenate([public_table.label, *(b.train.label for b in banks)]),
    )
    model = model_of(public, public.checkpoint.arrays, None, seed)
    generator = torch.Generator().manual_seed(_seed(seed, "pooled", len(banks)))
    _adam_steps(
        model, pooled, recipe.pooled_steps, recipe.pooled_batch, recipe.learning_rate, generator
    )
    return {b.index: _auc(model, b.test) for b in banks}


def hgb_auc(bank: Bank, categorical: int, seed: int) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    def features(table: EncodedTable) -> np.ndarray:
        return np.hstack([table.numeric, table.categorical.astype(np.float32)])

    numeric = bank.train.numeric.shape[1]
    with threadpool_limits(1):
        model = HistGradientBoostingClassifier(
            categorical_features=[False] * numeric + [True] * categorical,
            random_state=seed,
            **HGB_PARAMS,
        ).fit(features(bank.train), bank.train.label)
        scores = model.predict_proba(features(bank.test))[:, 1]
    assert bank.test.label is not None
    return roc_auc(bank.test.label, scores)


# --- the run ------------------------------------------------------------------------


def selected_cells(args: argparse.Namespace) -> tuple[Cell, ...]:
    cells = QUICK_CELLS if args.quick else FULL_CELLS
    if not args.cells:
        return cells
    wanted = set(args.cells)
    unknown = wanted - {c.key for c in cells}
    if unknown:
        raise SystemExit(
            f"unknown cell {sorted(unknown)[0]}; choose from {', '.join(c.key for c in cells)}"
        )
    return tuple(c for c in cells if c.key in wanted)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) the map; every finished cell is appended to the JSON at once."""
    if args.map_report_only:
        path = result_path(args)
        result = json.loads(path.read_text())
        result["summary"] = summarise(result)
        _save(path, result)
        write_report(result, path.parent)
        return result
    torch.set_num_threads(1)
    started = time.perf_counter()
    recipe = QUICK_RECIPE if args.quick else Recipe()
    cells = selected_cells(args)
    seeds = [0, 1] if args.quick and args.map_seeds == [0, 1, 2, 3, 4] else args.map_seeds
    path = result_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = _load_or_start(path, recipe, args, cells, seeds)
    done = {(r["seed"], r["rows"], r["banks"]) for r in result["records"]}
    before = float(result.get("compute_seconds", 0.0))  # from earlier, interrupted runs
    from benchmarks.privacy_utility import memoised_epsilon

    with tempfile.TemporaryDirectory(prefix="fedfin-map-") as tmp, memoised_epsilon():
        work = Path(tmp)
        for seed in seeds:
            todo = [c for c in cells if (seed, c.rows, c.banks) not in done]
            if not todo:
                continue
            generator = LendingClubGenerator(seed, calibration_rows=recipe.calibration_rows)
            public, public_table = _pretrain(generator, recipe, seed, work / f"seed-{seed}")
            for rows in sorted({c.rows for c in todo}):
                group = [c for c in todo if c.rows == rows]
                records = run_size(
                    seed, rows, group, generator, public, public_table, recipe, work, args.quick
                )
                for record in records:
                    result["records"].append(record)
                    result["compute_seconds"] = round(before + time.perf_counter() - started, 1)
                    _save(path, result)
                    print(
                        f"[map] seed {seed} cell {record['rows']}x{record['banks']}: "
                        f"{record['seconds']:.0f} s, {_progress(result, cells, seeds)}",
                        flush=True,
                    )
    result["summary"] = summarise(result)
    result["compute_seconds"] = round(before + time.perf_counter() - started, 1)
    result["cpu_seconds"] = round(
        sum(max(r["size_cpu_seconds"] for r in result["records"] if (r["seed"], r["rows"]) == key)
            for key in {(r["seed"], r["rows"]) for r in result["records"]}), 1
    )  # fmt: skip
    result["wall_seconds"] = result["compute_seconds"]
    result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    _save(path, result)
    write_report(result, path.parent)
    return result


def _progress(result: dict[str, Any], cells: Sequence[Cell], seeds: Sequence[int]) -> str:
    return f"{len(result['records'])}/{len(cells) * len(seeds)} cell-seeds done"


def _load_or_start(
    path: Path,
    recipe: Recipe,
    args: argparse.Namespace,
    cells: Sequence[Cell],
    seeds: Sequence[int],
) -> dict[str, Any]:
    from benchmarks.__main__ import environment

    config = {"recipe": asdict(recipe), "hgb_params": HGB_PARAMS, "quick": bool(args.quick)}
    if path.exists() and not args.fresh:
        old = json.loads(path.read_text())
        if old.get("config") == config:
            old["cells"] = _merge_cells(old.get("cells", []), cells)
            old["seeds"] = sorted(set(old.get("seeds", [])) | set(seeds))
            old.setdefault("resumed", []).append(_stamp(environment()))
            return old
    return {
        "name": NAME,
        "config": config,
        "cells": [asdict(c) for c in cells],
        "seeds": list(seeds),
        "recipe_by_size": {
            str(rows): recipe.for_bank(rows) for rows in sorted({c.rows for c in cells})
        },
        "started": _stamp(environment()),
        "command": _command(),
        "environment": environment(),
        "records": [],
        "compute_seconds": 0.0,
    }


def _command() -> str:
    """The command as typed: `python -m benchmarks ...` or `python -m benchmarks.<module>`."""
    first = Path(sys.argv[0])
    if first.name == "__main__.py" and first.parent.name == "benchmarks":
        return shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
    if first.name == Path(__file__).name:
        return shlex.join(["python", "-m", f"benchmarks.{first.stem}", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def _stamp(env: dict[str, Any]) -> dict[str, Any]:
    return {
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": _command(),
        "git_commit": env["git_commit"],
        "load_average": env["load_average"],
    }


def _merge_cells(old: list[dict[str, Any]], cells: Sequence[Cell]) -> list[dict[str, Any]]:
    known = {(c["rows"], c["banks"]) for c in old}
    return old + [asdict(c) for c in cells if (c.rows, c.banks) not in known]


def _save(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def _pretrain(
    generator: LendingClubGenerator, recipe: Recipe, seed: int, work: Path
) -> tuple[Public, EncodedTable]:
    frame = generator.public(recipe.public_rows)
    out = work / "public"
    result = pretrain(
        frame,
        LABEL,
        POSITIVE_LABEL,
        out,
        PretrainConfig(epochs=recipe.pretrain_epochs, seed=seed),
        exclude=(STATE_COLUMN,),
        source="synthetic public source (West + Northeast)",
        progress=False,
    )
    checkpoint = load_encoder_checkpoint(out)
    head = load_source_head(out)
    assert head is not None
    table = checkpoint.schema.transform(frame, "public source")
    return Public(checkpoint, head, float(result.metrics["holdout"]["auc"])), table


def _banks(
    generator: LendingClubGenerator, public: Public, rows: int, count: int, recipe: Recipe
) -> Iterator[Bank]:
    schema = public.checkpoint.schema
    for index in range(count):
        train = schema.transform(
            generator.bank(index, rows, "train"), f"bank {index} train", strict_columns=True
        )
        test = schema.transform(
            generator.bank(index, recipe.test_rows, "test"), f"bank {index} test",
            strict_columns=True,
        )  # fmt: skip
        assert train.label is not None and test.label is not None
        yield Bank(index, train, test, int(train.label.sum()), int(test.label.sum()))


def run_size(
    seed: int,
    rows: int,
    cells: Sequence[Cell],
    generator: LendingClubGenerator,
    public: Public,
    public_table: EncodedTable,
    recipe: Recipe,
    work: Path,
    quick: bool,
) -> list[Row]:
    """All cells of one bank size for one seed. Banks are nested (a 5-bank cell is the first 5
    banks of the 20-bank one), so a bank's alone and gradient-boosting results are shared."""
    began = time.perf_counter()
    cpu_began = time.process_time()
    most = max(c.banks for c in cells)
    banks = list(_banks(generator, public, rows, most, recipe))
    data_seconds = time.perf_counter() - began
    timing: dict[str, float] = {"data": data_seconds}

    def timed(key: str, began_at: float) -> None:
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - began_at

    t = time.perf_counter()
    public_auc = {b.index: _auc(model_of(public, public.checkpoint.arrays, None, seed), b.test)
                  for b in banks}  # fmt: skip
    timed("a_public", t)
    t = time.perf_counter()
    categorical = len(public.checkpoint.schema.categorical)
    alone_banks = banks[: recipe.alone_banks]
    hgb = {b.index: hgb_auc(b, categorical, seed) for b in alone_banks}
    timed("hgb_alone", t)
    alone: dict[str, dict[int, dict[str, float]]] = {}
    for column in sorted({col for c in cells for col in c.columns}, key=_column_order):
        t = time.perf_counter()
        alone[column] = train_method(
            "c_alone", column, alone_banks, public, recipe, rows, seed, work / f"{seed}-{rows}"
        )
        timed("c_alone", t)
    shared_seconds = dict(timing)
    records = []
    for cell in sorted(cells, key=lambda c: c.banks):
        timing = {k: v / len(cells) for k, v in shared_seconds.items()}  # shared: split evenly
        cell_began = time.perf_counter()
        members = banks[: cell.banks]
        per_bank: list[Row] = []

        def add(
            method: str,
            column: str,
            index: int,
            auc: float,
            spent: float = 0.0,
            out: list[Row] = per_bank,
        ) -> None:
            out.append(
                {"method": method, "epsilon": column, "bank": index, "auc": auc,
                 "epsilon_spent": spent}
            )  # fmt: skip

        for b in members:
            add("a_public", NON_PRIVATE, b.index, public_auc[b.index])
            if b.index in hgb:
                add("hgb_alone", NON_PRIVATE, b.index, hgb[b.index])
            for column in cell.columns:
                if b.index in alone[column]:
                    got = alone[column][b.index]
                    add("c_alone", column, b.index, got["auc"], got["epsilon_spent"])
        t = time.perf_counter()
        for index, auc in pooled_auc(public, public_table, members, recipe, seed).items():
            add("f_pooled", NON_PRIVATE, index, auc)
        timed("f_pooled", t)
        for column in cell.columns:
            t = time.perf_counter()
            fed = train_method(
                "d_fedfin", column, members, public, recipe, rows, seed,
                work / f"{seed}-{rows}-{cell.banks}",
            )  # fmt: skip
            timed("d_fedfin", t)
            for index, got in fed.items():
                add("d_fedfin", column, index, got["auc"], got["epsilon_spent"])
        records.append(
            {
                "seed": seed,
                "rows": rows,
                "banks": cell.banks,
                "columns": list(cell.columns),
                "public_rows": recipe.public_rows,
                "public_holdout_auc": public.holdout_auc,
                "data": {
                    str(b.index): {
                        "train_defaults": b.train_defaults,
                        "test_rows": len(b.test.numeric),
                        "test_defaults": b.test_defaults,
                    }
                    for b in members
                },
                "per_bank": per_bank,
                "seconds_by_method": {k: round(v, 2) for k, v in timing.items()},
                "seconds": round(
                    time.perf_counter() - cell_began + sum(shared_seconds.values()) / len(cells),
                    1,
                ),
                # CPU seconds of this process for the whole bank size (all its cells): on a
                # shared machine, wall time also counts other people's work.
                "size_cpu_seconds": round(time.process_time() - cpu_began, 1),
            }
        )
    del banks
    return records


def _column_order(column: str) -> float:
    return math.inf if column == NON_PRIVATE else float(column)


# --- summaries ------------------------------------------------------------------------


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 with one value)."""
    from scipy.stats import t as student

    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, math.nan
    half = student.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, float(half)


def _aucs(record: Row, method: str, column: str) -> dict[int, float]:
    """Each bank's AUC under a method in one cell-seed; baselines are ε-free."""
    wanted = NON_PRIVATE if method in ("a_public", "hgb_alone", "f_pooled") else column
    return {
        r["bank"]: r["auc"]
        for r in record["per_bank"]
        if r["method"] == method and r["epsilon"] == wanted
    }


def _value(
    record: Row, method: str, column: str, reduce: str = "mean", versus: str | None = None
) -> float | None:
    """Mean (or worst) bank AUC of a method in one cell-seed, or, with `versus`, its mean (or
    worst-bank) difference from `versus` on the banks the method was run on: paired."""
    mine = _aucs(record, method, column)
    if not mine:
        return None
    if versus is None:
        return min(mine.values()) if reduce == "worst" else statistics.mean(mine.values())
    other = _aucs(record, versus, column)
    if reduce == "worst":  # the worst bank's AUC minus the other method's worst on those banks
        return min(mine.values()) - min(other[b] for b in mine)
    return statistics.mean(mine[b] - other[b] for b in mine)


def _must(
    record: Row, method: str, column: str, reduce: str = "mean", versus: str | None = None
) -> float:
    value = _value(record, method, column, reduce, versus)
    assert value is not None, (method, column)
    return value


def summarise(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell and column: each method's mean AUC and its paired gain over the public model."""
    out = []
    for cell in result["cells"]:
        records = [
            r
            for r in result["records"]
            if r["rows"] == cell["rows"] and r["banks"] == cell["banks"]
        ]
        if not records:
            continue
        for column in cell["columns"]:
            entry: dict[str, Any] = {
                "rows": cell["rows"], "banks": cell["banks"], "epsilon": column,
                "seeds": sorted(r["seed"] for r in records), "methods": {},
            }  # fmt: skip
            for method in METHODS:
                if any(_value(r, method, column) is None for r in records):
                    continue
                means = [_must(r, method, column) for r in records]
                worst = [_must(r, method, column, "worst") for r in records]
                gains = [_must(r, method, column, versus="a_public") for r in records]
                worst_gain = [_must(r, method, column, "worst", "a_public") for r in records]
                banks = sorted(_aucs(records[0], method, column))
                spent = [
                    max(x["epsilon_spent"] for x in r["per_bank"]
                        if x["method"] == method and x["epsilon"] == column)
                    if method in ("d_fedfin", "c_alone") else 0.0
                    for r in records
                ]  # fmt: skip
                mean, half = t_interval(means)
                gain, gain_half = t_interval(gains)
                worst_mean, worst_half = t_interval(worst)
                wgain, wgain_half = t_interval(worst_gain)
                entry["methods"][method] = {
                    "auc": mean, "auc_ci": half, "gain": gain, "gain_ci": gain_half,
                    "worst_auc": worst_mean, "worst_auc_ci": worst_half,
                    "worst_gain": wgain, "worst_gain_ci": wgain_half,
                    "max_epsilon_spent": max(spent), "banks": banks,
                }  # fmt: skip
            if "d_fedfin" in entry["methods"] and "c_alone" in entry["methods"]:
                # fedfin minus alone, paired on the banks that also ran alone
                diffs = [-_must(r, "c_alone", column, versus="d_fedfin") for r in records]
                entry["fedfin_minus_alone"] = dict(
                    zip(("gain", "gain_ci"), t_interval(diffs), strict=True)
                )
            out.append(entry)
    return out


def pays(entry: dict[str, Any], method: str = "d_fedfin") -> bool:
    """Federation pays in a cell: the lower end of its 95% CI of the gain over public is > 0."""
    m = entry["methods"].get(method)
    return bool(m and len(entry["seeds"]) > 1 and m["gain"] - m["gain_ci"] > 0)


def headline(result: dict[str, Any]) -> str:
    """From what bank size and ε federation pays, read off the summary."""
    summary = result.get("summary") or summarise(result)
    private = [e for e in summary if e["epsilon"] != NON_PRIVATE and "d_fedfin" in e["methods"]]
    if not private:
        return "**Privacy-utility map**: no finished private cells yet."
    parts = []
    for banks in sorted({e["banks"] for e in private}):
        for epsilon in sorted({e["epsilon"] for e in private}, key=float):
            cells = sorted(
                (e for e in private if e["banks"] == banks and e["epsilon"] == epsilon),
                key=lambda e: e["rows"],
            )
            if not cells:
                continue
            paying = [e["rows"] for e in cells if pays(e)]
            smallest = _smallest_from(cells)
            if not paying:
                said = f"at no measured size (up to {cells[-1]['rows']:,} loans per bank)"
            elif smallest is None:
                said = "only at " + ", ".join(f"{rows:,}" for rows in paying) + " loans per bank"
            else:
                e = next(c for c in cells if c["rows"] == smallest)
                m = e["methods"]["d_fedfin"]
                said = (
                    f"from {smallest:,} loans per bank (+{m['gain']:.3f} ± {m['gain_ci']:.3f} AUC)"
                )
            parts.append(f"{banks} banks at ε = {epsilon}: {said}")
    seeds = sorted({r["seed"] for r in result["records"]})
    return (
        "**Privacy-utility map** (synthetic Lending Club banks, fedfin's gain in mean bank AUC "
        f"over the public model, 95% CI over seeds {seeds}): federation pays "
        + "; ".join(parts)
        + ". "
        + _against_alone(private)
    )


def _against_alone(private: Sequence[dict[str, Any]]) -> str:
    """Where fedfin beats, or loses to, each bank fine-tuning alone with the same DP budget."""
    verdicts: dict[str, list[str]] = {"better": [], "worse": []}
    for e in private:
        versus = e.get("fedfin_minus_alone")
        if not versus or len(e["seeds"]) < 2:
            continue
        where = f"{e['rows']:,}×{e['banks']} ε {e['epsilon']} ({versus['gain']:+.3f})"
        if versus["gain"] - versus["gain_ci"] > 0:
            verdicts["better"].append(where)
        elif versus["gain"] + versus["gain_ci"] < 0:
            verdicts["worse"].append(where)
    return (
        "Against each bank alone with the same DP budget (paired on the banks that ran "
        "alone), fedfin is better at "
        + (", ".join(verdicts["better"]) or "no cell")
        + "; worse at "
        + (", ".join(verdicts["worse"]) or "no cell")
        + "; elsewhere the 95% interval includes 0."
    )


def _smallest_from(cells: Sequence[dict[str, Any]]) -> int | None:
    """The smallest size from which fedfin pays at every larger measured size."""
    answer = None
    for e in reversed(cells):
        if pays(e):
            answer = e["rows"]
        else:
            break
    return answer


def _fmt(value: float, half: float, sign: bool = False) -> str:
    text = f"{value:+.4f}" if sign else f"{value:.4f}"
    return text if math.isnan(half) else f"{text} ± {half:.4f}"


def _underspent(summary: Sequence[dict[str, Any]]) -> list[str]:
    """Cells whose banks spent well under their ε: the noise was set by something else."""
    cells = [
        f"{e['rows']:,}×{e['banks']} ε {e['epsilon']} (spent "
        f"{e['methods']['d_fedfin']['max_epsilon_spent']:.2f})"
        for e in summary
        if e["epsilon"] != NON_PRIVATE
        and "d_fedfin" in e["methods"]
        and e["methods"]["d_fedfin"]["max_epsilon_spent"] < 0.9 * float(e["epsilon"])
    ]
    if not cells:
        return []
    return [
        "",
        "ε spent well under the budget in " + ", ".join(cells) + ": there σ is not set by the "
        "budget but by the policy's floor σ = 0.5, or (1M loans, ε 1) by "
        "`fedfin.common.accounting.calibrate_noise_multiplier`, whose RDP bracket returns "
        "σ = 0.797 where the PRV accountant allows about 0.69: these cells are noisier than "
        "their ε needs.",
    ]


def _auc_cell(methods: dict[str, Any], method: str) -> str:
    m = methods.get(method)
    return _fmt(m["auc"], m["auc_ci"]) if m else "—"


def _gain_cell(methods: dict[str, Any], method: str, key: str = "gain") -> str:
    m = methods.get(method)
    return _fmt(m[key], m[f"{key}_ci"], sign=True) if m else "—"


def markdown(result: dict[str, Any]) -> str:
    summary = result.get("summary") or summarise(result)
    env = result["environment"]
    recipe = result["config"]["recipe"]
    seeds = sorted({r["seed"] for r in result["records"]})
    lines = [
        "## Privacy-utility map: synthetic Lending Club banks of 10^3 to 10^6 loans",
        "",
        f"- {headline(result)}",
        f"- Command: `{result['command']}`; wall {result.get('compute_seconds', 0)} s, "
        f"CPU {result.get('cpu_seconds', '—')} s of the benchmark process "
        f"({len(result['records'])} cell-seeds); seeds {seeds}; commit {env['git_commit']}"
        f"{' + uncommitted changes' if env['git_dirty'] else ''}.",
        f"- Machine: {env['cpu']}, {env['cores']} cores, 1 torch thread, load average "
        f"{env['load_average']} at the start; Python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + ".",
        f"- Data: `common/lending_club_generator.py` (see docs/synthetic-data.md), "
        f"{recipe['public_rows']:,} public-source rows (West + Northeast) for pretraining, "
        f"banks in the South and Midwest; every bank is tested on {recipe['test_rows']:,} rows of "
        "its own distribution, the same for every method within a seed.",
        f"- Recipe: {recipe['rounds']} rounds, at most {recipe['steps_per_round']} DP steps a "
        f"round (one epoch when a bank has fewer batches), expected batch "
        f"clamp(n/20, {recipe['min_batch']}, {recipe['max_batch']}), Poisson rate q = 1/k, "
        f"clip {recipe['max_grad_norm']}, Adam {recipe['learning_rate']}, δ = min(1e-5, 0.1/n), "
        f"{recipe['accountant'].upper()} accountant, noise calibrated by the bank's "
        "`approve_round` (floor σ = 0.5). "
        "Non-private: the same steps without clipping or noise. Gradient boosting: "
        f"{', '.join(f'{k}={v}' for k, v in result['config']['hgb_params'].items())}. Pooled: "
        f"the public model fine-tuned for {recipe['pooled_steps']} Adam steps of "
        f"{recipe['pooled_batch']} on public + all banks' train rows.",
        f"- Banks are nested (a 5-bank cell is the first 5 banks of the 20-bank one). The "
        f"alone baselines (c, gradient boosting) run on banks 0-{recipe['alone_banks'] - 1}, "
        "members of every federation; their gains, and fedfin − alone, are paired bank by bank "
        "on those banks. fedfin, public and pooled are averaged over all banks of the cell.",
        "",
        "| loans per bank | q | expected batch | steps per round | epochs per round | δ |",
        "|---|---|---|---|---|---|",
    ]
    for rows, shape in sorted(result["recipe_by_size"].items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"| {int(rows):,} | 1/{round(1 / shape['sample_rate'])} | {shape['expected_batch']} "
            f"| {shape['steps_per_round']} | {shape['epochs_per_round']:.3f} | {shape['delta']:g} |"
        )
    lines += [
        "",
        "**Mean bank AUC** (mean ± 95% t-interval over seeds); *gain* = paired difference "
        "from the public model (a), same seed, same test rows.",
        "",
        "| loans × banks | ε | a. public | d. fedfin | c. alone (DP) | GBT alone | f. pooled | "
        "fedfin − public | alone − public | fedfin − alone | worst bank: fedfin − public | "
        "ε spent (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        m = e["methods"]
        auc = partial(_auc_cell, m)
        gain = partial(_gain_cell, m)

        versus = e.get("fedfin_minus_alone")
        lines.append(
            f"| {e['rows']:,} × {e['banks']} | {e['epsilon']} | {auc('a_public')} | "
            f"{auc('d_fedfin')} | {auc('c_alone')} | {auc('hgb_alone')} | {auc('f_pooled')} | "
            f"{gain('d_fedfin')}{' **pays**' if pays(e) else ''} | {gain('c_alone')} | "
            + (_fmt(versus["gain"], versus["gain_ci"], sign=True) if versus else "—")
            + f" | {gain('d_fedfin', 'worst_gain')} | "
            + (f"{m['d_fedfin']['max_epsilon_spent']:.3f}" if e["epsilon"] != NON_PRIVATE else "—")
            + " |"
        )
    lines += [
        "",
        "*pays*: the 95% interval of fedfin's paired gain over the public model lies above 0. "
        "Gradient boosting, pooled and the public model spend no ε; they repeat in every "
        "column of a cell.",
        *_underspent(summary),
        "",
        "Distributed DP under secure aggregation against local DP, and a one-step-per-round "
        "recipe (`fedsgd`), on these same banks, encoder, test rows and budgets: "
        "`benchmarks/results/distributed_dp.md` (`python -m benchmarks distributed-dp`).",
        "",
        "**Worst bank AUC** (mean ± 95% t-interval over seeds of the lowest bank AUC in a cell)",
        "",
        "| loans × banks | ε | a. public | d. fedfin | c. alone (DP) | GBT alone | f. pooled |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        m = e["methods"]
        cells = [
            _fmt(m[k]["worst_auc"], m[k]["worst_auc_ci"]) if k in m else "—"
            for k in ("a_public", "d_fedfin", "c_alone", "hgb_alone", "f_pooled")
        ]
        lines.append(
            f"| {e['rows']:,} × {e['banks']} | {e['epsilon']} | " + " | ".join(cells) + " |"
        )
    lines += ["", f"![gain over the public model]({PLOT_NAME})", ""]
    return "\n".join(lines)


PLOT_NAME = "privacy_utility_map.png"


def plot(result: dict[str, Any], path: Path) -> None:
    """fedfin's gain over the public model against loans per bank, one line per ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result.get("summary") or summarise(result)
    bank_counts = sorted({e["banks"] for e in summary})
    figure, axes = plt.subplots(
        1, len(bank_counts), figsize=(6.5 * len(bank_counts), 4.8), squeeze=False, sharey=True
    )
    columns = sorted({e["epsilon"] for e in summary}, key=_column_order)
    for axis, banks in zip(axes[0], bank_counts, strict=True):
        for offset, column in enumerate(columns):
            cells = sorted(
                (e for e in summary if e["banks"] == banks and e["epsilon"] == column
                 and "d_fedfin" in e["methods"]),
                key=lambda e: e["rows"],
            )  # fmt: skip
            if not cells:
                continue
            x = [e["rows"] * 1.06 ** (offset - 1.5) for e in cells]
            y = [e["methods"]["d_fedfin"]["gain"] for e in cells]
            err = [np.nan_to_num(e["methods"]["d_fedfin"]["gain_ci"]) for e in cells]
            label = column if column == NON_PRIVATE else f"ε = {column}"
            axis.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        axis.axhline(0.0, color="grey", linestyle=":")
        axis.set_xscale("log")
        axis.set_xlabel("loans per bank (train rows)")
        axis.set_ylabel("fedfin mean bank AUC − public model's (95% CI)")
        axis.set_title(f"{banks} banks")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    seeds = sorted({r["seed"] for r in result["records"]})
    figure.suptitle(f"Gain of DP federation over the public model, synthetic banks, seeds {seeds}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(result: dict[str, Any], directory: Path) -> None:
    """results/privacy_utility_map.md and .png next to the JSON."""
    plot(result, directory / PLOT_NAME)
    (directory / "privacy_utility_map.md").write_text(
        "# Privacy-utility map\n\n"
        "Generated by `benchmarks/privacy_utility_map.py`; do not edit.\n\n" + markdown(result)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy_utility_map")
    add_arguments(parser)
    parser.add_argument("--report-only", dest="map_report_only", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = run(args)
    print(headline(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
