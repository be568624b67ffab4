"""Distributed against local DP, on the privacy-utility map's banks: does the √K pay?

Same synthetic Lending Club banks, public encoder, test rows, recipe, δ and sample rate as
`benchmarks/privacy_utility_map.py`, for a few of its cells. Per seed, cell and ε:
  a_public        the public model (pretrained encoder + source head);
  d_fedfin        the map's fedfin: 4 rounds of up to 12 local DP Adam steps per bank,
                  FedAvg of the encoders, private heads (local DP: each bank adds σ);
  s_local         fedsgd: 48 rounds (the same number of DP steps) of one DP step per bank on
                  the encoder, head frozen at the public one; the server applies Adam to the
                  mean of the banks' releases. Each bank adds its full σ (local DP);
  s_distributed   the same, each bank adding a share σ/√K (K = every bank of the cell), as
                  under secure aggregation with `distributed-dp-accounting = "aggregate"`:
                  each bank is charged for the sum's σ, so the mean carries √K less noise;
  s_nonprivate    the same fedsgd rounds without clipping or noise (the ceiling).
Every DP method goes through the bank's own `approve_round` (same ε, δ, q and planned steps,
so the same calibrated σ for the charged figure) and `train_with_dp`. Secure aggregation's
masking is exact up to 2c/2^22 per coordinate (tests/test_secure_aggregation.py), so the
sum is taken in the clear here; its cost is in benchmarks/results/secure_aggregation.md.

    python -m benchmarks distributed-dp                    # the cells below, seeds 0-4
    python -m benchmarks.distributed_dp --ddp-quick        # a smoke test in about a minute
"""

import argparse
import json
import math
import statistics
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.privacy_utility_map import (
    NON_PRIVATE,
    QUICK_RECIPE,
    Bank,
    Public,
    Recipe,
    _auc,
    _banks,
    _pretrain,
    _seed,
    cell_policy,
    model_of,
    t_interval,
    train_method,
)
from fedfin.common.accounting import DpEvent
from fedfin.common.config import TrainPlanConfig
from fedfin.common.errors import PrivacyBudgetError
from fedfin.common.lending_club_generator import LendingClubGenerator
from fedfin.common.protocol import RoundInstructions
from fedfin.common.shared_weights import shared_arrays
from fedfin.common.tensors import as_dataset

NAME = "distributed-dp"
RESULT_FILE = Path(__file__).resolve().parent / "results" / "distributed_dp.json"
CELLS = ((1_000, 5), (10_000, 5), (10_000, 20))
COLUMNS = ("1", "3", "8")
QUICK_CELLS = ((300, 3),)
METHODS = {
    "a_public": "public model",
    "d_fedfin": "fedfin, local DP (multi-step rounds, private heads)",
    "s_local": "fedsgd, local DP (each bank adds σ)",
    "s_distributed": "fedsgd, distributed DP (each bank adds σ/√K)",
    "s_nonprivate": "fedsgd, no DP",
}
SERVER_LEARNING_RATE = 2e-3  # the map's Adam rate, untuned for fedsgd
SERVER_BUDGET = 1000.0  # not binding here: the against-server ε is reported, not limited


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--ddp-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    group.add_argument("--ddp-quick", action="store_true", help="a tiny smoke test")
    group.add_argument(
        "--ddp-cells",
        nargs="+",
        metavar="ROWSxBANKS",
        help=f"these cells instead of {' '.join(f'{r}x{b}' for r, b in CELLS)}",
    )


@dataclass
class FedsgdBank:
    """One bank in a fedsgd run: what it was charged, and what its own noise gave."""

    bank: Bank
    state_dir: Path
    charged: list[DpEvent] = field(default_factory=list)
    own: list[DpEvent] = field(default_factory=list)
    epsilon: float = 0.0
    epsilon_against_server: float = 0.0
    sigma_added: float = 0.0
    declined: int = 0


def fedsgd_method(
    method: str,
    column: str,
    banks: Sequence[Bank],
    public: Public,
    recipe: Recipe,
    rows: int,
    seed: int,
    work: Path,
) -> dict[int, dict[str, float]]:
    """s_local, s_distributed or s_nonprivate: each bank's test AUC, ε and the σ it added."""
    from fedfin.client.bank_state import BankState
    from fedfin.client.budget import approve_round
    from fedfin.client.dp_training import train_with_dp

    shape = recipe.for_bank(rows)
    rounds = recipe.rounds * shape["steps_per_round"]  # the map's DP steps, one a round
    shares = len(banks) if method == "s_distributed" else None
    policy = cell_policy(
        recipe,
        rows,
        column,
        min_planned_rounds=min(3, rounds),
        max_planned_rounds=max(100, rounds),
        distributed_dp=shares is not None,
        distributed_dp_accounting="aggregate" if shares else "conservative",
        distributed_dp_server_budget=SERVER_BUDGET if shares else 0.0,
        secagg_min_banks=shares or 2,
    )
    plan = TrainPlanConfig(mode="fedsgd", batch_size=shape["expected_batch"], learning_rate=1.0)
    checkpoint = public.checkpoint
    runs = [FedsgdBank(b, work / f"{method}-{column}-{b.index}") for b in banks]
    encoder = OrderedDict((k, np.asarray(v, np.float32)) for k, v in checkpoint.arrays.items())
    server = {k: torch.tensor(v) for k, v in encoder.items()}
    optimizer = torch.optim.Adam(list(server.values()), lr=SERVER_LEARNING_RATE)
    for server_round in range(1, rounds + 1):
        updates = []
        for run in runs:
            noise_seed = _seed(seed, rows, len(banks), method, column, run.bank.index, server_round)
            model = model_of(public, encoder, None, noise_seed)
            generator = torch.Generator().manual_seed(noise_seed)
            if method == "s_nonprivate":
                _plain_sgd_step(model, run.bank, plan.batch_size, generator)
            else:
                instructions = RoundInstructions(
                    server_round, rounds, plan, checkpoint.schema, checkpoint.model_config
                )
                try:
                    approved = approve_round(
                        BankState(run.state_dir),
                        policy,
                        instructions,
                        1,
                        list(run.charged),
                        noise_share_banks=shares,
                        server_past=list(run.own) if shares else None,
                    )
                except PrivacyBudgetError:
                    run.declined += 1
                    continue
                train_with_dp(model, run.bank.train, approved.plan, approved.past, generator)
                run.charged.append(approved.charged)
                run.own.append(approved.plan.event())
                run.epsilon = approved.epsilon_after
                run.epsilon_against_server = approved.epsilon_against_server or run.epsilon
                run.sigma_added = approved.plan.noise_multiplier
            trained = shared_arrays(model)
            updates.append({k: trained[k] - encoder[k] for k in encoder})
        if not updates:
            continue
        optimizer.zero_grad()
        for key, parameter in server.items():  # the mean release is -(noisy mean gradient)
            parameter.grad = -torch.from_numpy(np.mean([u[key] for u in updates], axis=0))
        optimizer.step()
        encoder = OrderedDict((k, v.detach().numpy().copy()) for k, v in server.items())
    return {
        run.bank.index: {
            "auc": _auc(model_of(public, encoder, None, seed), run.bank.test),
            "epsilon_spent": run.epsilon,
            "epsilon_against_server": run.epsilon_against_server,
            "sigma_added": run.sigma_added,
            "sigma_charged": run.charged[-1].noise_multiplier if run.charged else 0.0,
            "declined_rounds": run.declined,
        }
        for run in runs
    }


def _plain_sgd_step(model: nn.Module, bank: Bank, batch: int, generator: torch.Generator) -> None:
    """One encoder step of lr 1 on a plain mean gradient: the non-private fedsgd release."""
    dataset = as_dataset(bank.train)
    index = torch.randint(0, len(dataset), (min(batch, len(dataset)),), generator=generator)
    numeric, categorical, target = dataset[index]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("encoder."))
    loss = nn.BCEWithLogitsLoss()(model(numeric, categorical), target)
    loss.backward()
    with torch.no_grad():
        for parameter in model.encoder.parameters():
            assert parameter.grad is not None
            parameter.sub_(parameter.grad)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    quick = bool(args.ddp_quick)
    recipe = QUICK_RECIPE if quick else Recipe()
    cells = QUICK_CELLS if quick else _cells(args.ddp_cells) if args.ddp_cells else CELLS
    columns = ("8",) if quick else COLUMNS
    seeds = [0] if quick else list(args.ddp_seeds)
    records: list[dict[str, Any]] = []
    began = time.perf_counter()
    from benchmarks.privacy_utility import memoised_epsilon

    with tempfile.TemporaryDirectory(prefix="fedfin-ddp-") as tmp, memoised_epsilon():
        work = Path(tmp)
        for seed in seeds:
            generator = LendingClubGenerator(seed, calibration_rows=recipe.calibration_rows)
            public, _ = _pretrain(generator, recipe, seed, work / f"seed-{seed}")
            for rows, count in cells:
                t = time.perf_counter()
                banks = list(_banks(generator, public, rows, count, recipe))
                out = work / f"{seed}-{rows}-{count}"
                per_bank = [
                    {"method": "a_public", "epsilon": NON_PRIVATE, "bank": b.index,
                     "auc": _auc(model_of(public, public.checkpoint.arrays, None, seed), b.test)}
                    for b in banks
                ]  # fmt: skip
                for index, got in fedsgd_method(
                    "s_nonprivate", NON_PRIVATE, banks, public, recipe, rows, seed, out
                ).items():
                    per_bank.append(
                        {"method": "s_nonprivate", "epsilon": NON_PRIVATE, "bank": index, **got}
                    )
                for column in columns:
                    fed = train_method("d_fedfin", column, banks, public, recipe, rows, seed, out)
                    for index, got in fed.items():
                        per_bank.append(
                            {"method": "d_fedfin", "epsilon": column, "bank": index, **got}
                        )
                    for method in ("s_local", "s_distributed"):
                        got_all = fedsgd_method(
                            method, column, banks, public, recipe, rows, seed, out
                        )
                        for index, got in got_all.items():
                            per_bank.append(
                                {"method": method, "epsilon": column, "bank": index, **got}
                            )
                seconds = round(time.perf_counter() - t, 1)
                records.append(
                    {"seed": seed, "rows": rows, "banks": count, "per_bank": per_bank,
                     "seconds": seconds}
                )  # fmt: skip
                print(f"[{NAME}] seed {seed} cell {rows}x{count}: {seconds:.0f} s", flush=True)
    shape = {str(rows): recipe.for_bank(rows) for rows, _ in cells}
    return {
        "name": NAME,
        "quick": quick,
        "cells": [list(c) for c in cells],
        "columns": list(columns),
        "seeds": seeds,
        "recipe": {
            "map_recipe": {
                "rounds": recipe.rounds,
                "steps_per_round": recipe.steps_per_round,
                "learning_rate": recipe.learning_rate,
                "accountant": recipe.accountant,
            },
            "fedsgd_rounds": {k: recipe.rounds * v["steps_per_round"] for k, v in shape.items()},
            "server_learning_rate": SERVER_LEARNING_RATE,
            "by_size": shape,
        },
        "records": records,
        "summary": summarise(records, cells, columns),
        "compute_seconds": round(time.perf_counter() - began, 1),
    }


def _cells(texts: Sequence[str]) -> tuple[tuple[int, int], ...]:
    cells = []
    for text in texts:
        rows, _, banks = text.partition("x")
        if not rows.isdigit() or not banks.isdigit() or int(banks) < 2:
            raise SystemExit(f"--ddp-cells: '{text}' is not ROWSxBANKS, e.g. 100000x5")
        cells.append((int(rows), int(banks)))
    return tuple(cells)


def _mean_of(record: dict[str, Any], method: str, column: str, key: str = "auc") -> float:
    wanted = NON_PRIVATE if method in ("a_public", "s_nonprivate") else column
    values = [
        r[key] for r in record["per_bank"] if r["method"] == method and r["epsilon"] == wanted
    ]
    return statistics.mean(values)


def summarise(
    records: Sequence[dict[str, Any]], cells: Sequence[Sequence[int]], columns: Sequence[str]
) -> list[dict[str, Any]]:
    """Per cell and ε: mean AUC per method (mean ± 95% t over seeds) and paired differences."""
    out = []
    for rows, count in cells:
        mine = [r for r in records if r["rows"] == rows and r["banks"] == count]
        for column in columns:
            entry: dict[str, Any] = {"rows": rows, "banks": count, "epsilon": column}
            for method in METHODS:
                entry[method] = t_interval([_mean_of(r, method, column) for r in mine])
            for name, a, b in (
                ("distributed_minus_local", "s_distributed", "s_local"),
                ("distributed_minus_fedfin", "s_distributed", "d_fedfin"),
                ("distributed_minus_public", "s_distributed", "a_public"),
                ("local_minus_fedfin", "s_local", "d_fedfin"),
                ("local_minus_public", "s_local", "a_public"),
                ("fedfin_minus_public", "d_fedfin", "a_public"),
            ):
                entry[name] = t_interval(
                    [_mean_of(r, a, column) - _mean_of(r, b, column) for r in mine]
                )
            for method in ("s_local", "s_distributed"):
                entry[f"{method}_sigma_added"] = _mean_of(mine[0], method, column, "sigma_added")
                entry[f"{method}_epsilon"] = max(
                    _mean_of(r, method, column, "epsilon_spent") for r in mine
                )
            entry["s_distributed_sigma_charged"] = _mean_of(
                mine[0], "s_distributed", column, "sigma_charged"
            )
            entry["s_distributed_epsilon_against_server"] = max(
                _mean_of(r, "s_distributed", column, "epsilon_against_server") for r in mine
            )
            out.append(entry)
    return out


def _fmt(pair: Sequence[float], sign: bool = False) -> str:
    mean, half = pair
    text = f"{mean:+.4f}" if sign else f"{mean:.4f}"
    return text if math.isnan(half) else f"{text} ± {half:.4f}"


def _above_zero(pair: Sequence[float]) -> bool:
    return not math.isnan(pair[1]) and pair[0] - pair[1] > 0


def headline(result: dict[str, Any]) -> str:
    rows = result["summary"]
    wins = [
        f"{e['rows']:,}×{e['banks']} ε {e['epsilon']} ({e['distributed_minus_local'][0]:+.4f})"
        for e in rows
        if _above_zero(e["distributed_minus_local"])
    ]
    over_fedfin = [
        f"{e['rows']:,}×{e['banks']} ε {e['epsilon']} ({e['distributed_minus_fedfin'][0]:+.4f})"
        for e in rows
        if _above_zero(e["distributed_minus_fedfin"])
    ]
    over_public = [
        f"{e['rows']:,}×{e['banks']} ε {e['epsilon']} ({e['distributed_minus_public'][0]:+.4f})"
        for e in rows
        if _above_zero(e["distributed_minus_public"])
    ]
    below_public = [
        f"{e['rows']:,}×{e['banks']} ε {e['epsilon']} ({e['distributed_minus_public'][0]:+.4f})"
        for e in rows
        if _above_zero([-e["distributed_minus_public"][0], e["distributed_minus_public"][1]])
    ]
    fedsgd_over_fedfin = [
        f"{e['rows']:,}×{e['banks']} ε {e['epsilon']} ({e['local_minus_fedfin'][0]:+.4f})"
        for e in rows
        if _above_zero(e["local_minus_fedfin"])
    ]
    return (
        "**Distributed vs local DP** (fedsgd, same ε charged, seeds "
        f"{result['seeds']}): distributed DP beats local DP fedsgd at "
        f"{', '.join(wins) or 'no cell'}; beats fedfin's default local-DP rounds at "
        f"{', '.join(over_fedfin) or 'no cell'}; beats the public model at "
        f"{', '.join(over_public) or 'no cell'}, and loses to it at "
        f"{', '.join(below_public) or 'no cell'}. fedsgd with local DP alone beats fedfin's "
        f"default rounds at {', '.join(fedsgd_over_fedfin) or 'no cell'} (95% intervals "
        "above 0, paired by seed)."
    )


def markdown(result: dict[str, Any]) -> str:
    recipe = result["recipe"]
    lines = [
        "## Distributed against local DP (fedsgd under secure aggregation)",
        "",
        "Generated by `benchmarks/distributed_dp.py`; do not edit.",
        "",
        f"- {headline(result)}",
        f"- Banks, public encoder, test rows, q, δ and ε as in the privacy-utility map "
        f"(its recipe: {recipe['map_recipe']}). fedsgd: "
        f"{recipe['fedsgd_rounds']} rounds (by bank size) of one DP step per bank on the "
        "encoder, head frozen at the public head, server Adam "
        f"{recipe['server_learning_rate']} on the mean release; K = every bank of the cell "
        "(threshold = all banks). Seeds "
        f"{result['seeds']}; compute {result['compute_seconds']} s.",
        *(
            [
                "- Runs, merged with `--ddp-merge`: "
                + "; ".join(
                    f"`{run['command']}` (commit {run['git_commit']}"
                    f"{' + uncommitted changes' if run['git_dirty'] else ''}, "
                    f"{run['compute_seconds']} s)"
                    for run in result["runs"]
                )
                + "."
            ]
            if result.get("runs")
            else []
        ),
        "",
        "| loans × banks | ε | public | fedfin (local DP) | fedsgd local DP | fedsgd distributed "
        "| fedsgd no DP | distributed − local | distributed − fedfin | distributed − public "
        "| fedsgd local − public | fedsgd local − fedfin | σ added: local / share (charged) "
        "| ε charged / against server |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["summary"]:
        lines.append(
            f"| {e['rows']:,} × {e['banks']} | {e['epsilon']} | {_fmt(e['a_public'])} | "
            f"{_fmt(e['d_fedfin'])} | {_fmt(e['s_local'])} | {_fmt(e['s_distributed'])} | "
            f"{_fmt(e['s_nonprivate'])} | {_fmt(e['distributed_minus_local'], True)} | "
            f"{_fmt(e['distributed_minus_fedfin'], True)} | "
            f"{_fmt(e['distributed_minus_public'], True)} | "
            f"{_fmt(e['local_minus_public'], True)} | "
            f"{_fmt(e['local_minus_fedfin'], True)} | "
            f"{e['s_local_sigma_added']:.3f} / {e['s_distributed_sigma_added']:.3f} "
            f"({e['s_distributed_sigma_charged']:.3f}) | "
            f"{e['s_distributed_epsilon']:.2f} / {e['s_distributed_epsilon_against_server']:.2f} |"
        )
    lines += [
        "",
        "σ added: the noise multiplier each bank adds per step (local: its full σ; "
        "distributed: its share σ/√K, never below the policy's floor 0.5, so the charged σ "
        "is at least 0.5·√K); ε against server: what a server that broke secure aggregation "
        "would get from one bank's releases (bounded by `distributed-dp-server-budget`, here "
        f"{SERVER_BUDGET:g}, i.e. not binding). Where 0.5·√K is above the σ the budget "
        "needs, the floor binds: the distributed banks add more noise than their ε requires "
        "and spend less than their budget (ε charged below the column's ε).",
        "Differences are paired by seed (same banks, encoder and test rows); intervals are "
        "95% t over seeds. The public and no-DP columns spend no ε and repeat across ε.",
    ]
    return "\n".join(lines)


def merge_results(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs of other cells with the same recipe, ε columns and seeds; each
    run's command, commit and time are kept under "runs"."""
    first = results[0]
    for other in results[1:]:
        for key in ("recipe_map", "columns", "seeds", "quick"):
            mine = first["recipe"]["map_recipe"] if key == "recipe_map" else first[key]
            theirs = other["recipe"]["map_recipe"] if key == "recipe_map" else other[key]
            if mine != theirs:
                raise SystemExit(f"--ddp-merge: the runs differ in {key}; not merged")
    runs = [
        run
        for r in results
        for run in r.get("runs")
        or [
            {
                "command": r["command"],
                "git_commit": r["environment"]["git_commit"],
                "git_dirty": r["environment"]["git_dirty"],
                "compute_seconds": r["compute_seconds"],
                "finished": r["finished"],
                "cells": r["cells"],
            }
        ]
    ]
    cells = [cell for r in results for cell in r["cells"]]
    records = [record for r in results for record in r["records"]]
    recipe = {
        **first["recipe"],
        "fedsgd_rounds": {k: v for r in results for k, v in r["recipe"]["fedsgd_rounds"].items()},
        "by_size": {k: v for r in results for k, v in r["recipe"]["by_size"].items()},
    }
    return {
        **first,
        "cells": cells,
        "recipe": recipe,
        "records": records,
        "summary": summarise(records, cells, first["columns"]),
        "compute_seconds": round(sum(run["compute_seconds"] for run in runs), 1),
        "wall_seconds": round(sum(run["compute_seconds"] for run in runs), 1),
        "command": "; ".join(run["command"] for run in runs),
        "finished": max(run["finished"] for run in runs),
        "runs": runs,
    }


def _write(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text("# Distributed DP\n\n" + markdown(result) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Standalone: the JSON and an md beside it (`python -m benchmarks distributed-dp` also
    rewrites RESULTS.md)."""
    import datetime
    import shlex
    import sys

    from benchmarks.__main__ import environment

    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed_dp")
    add_arguments(parser)
    parser.add_argument("--out", type=Path, help="result JSON (default: benchmarks/results)")
    parser.add_argument(
        "--ddp-merge",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="only merge these results (same recipe and seeds, other cells) into --out",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.ddp_merge:
        merged = merge_results([json.loads(p.read_text()) for p in args.ddp_merge])
        _write(merged, args.out or RESULT_FILE)
        print(markdown(merged))
        return 0
    result = run(args)
    result["command"] = shlex.join(["python", "-m", "benchmarks.distributed_dp", *argv])
    result["environment"] = environment()
    result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    result["wall_seconds"] = result["compute_seconds"]
    _write(result, args.out or RESULT_FILE)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
