"""`fedfin plan`: predict, from public data only, whether DP federation pays and how to run it.

It lives with the server role (the coordinator plans a federation before inviting banks),
but reads only public files, so a bank can run it too before it agrees to join.
"""

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from fedfin.common.atomic import write_json_atomically
from fedfin.common.errors import ConfigError
from fedfin.common.planning import (
    KEEP_PUBLIC_BELOW,
    NOISE_TOLERANCE,
    ROUND_CANDIDATES,
    PlanQuestion,
    Recommendation,
)


def _bounded(
    flag: str, kind: type, low: float, high: float, open_low: bool = True, open_high: bool = False
) -> Any:
    """One number between low and high (each end open or closed), naming the flag."""

    def shown(value: float) -> str:
        return str(int(value)) if float(value).is_integer() else f"{value:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got '{text}'") from None
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if not (above and below):
            interval = "(["[not open_low] + f"{shown(low)}, {shown(high)}" + "])"[open_high]
            raise argparse.ArgumentTypeError(f"{flag} must be in {interval}, got {text}")
        return value

    return parse


_MAX = {"--bank-rows": 1e9, "--num-banks": 1000, "--rounds": 100, "--epsilon": 1000}


def _numbers(flag: str, kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        values = []
        for part in text.split(","):
            word = part.strip().lower()
            try:
                if kind is float and word in ("inf", "non-private", "none"):
                    values.append(math.inf)
                    continue
                value = kind(float(word)) if kind is int else kind(word)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{flag} takes comma-separated numbers, got '{text}'"
                ) from None
            if not value > 0 or (kind is int and float(word) != value):
                raise argparse.ArgumentTypeError(f"{flag} values must be positive, got '{part}'")
            if value > _MAX.get(flag, math.inf):
                raise argparse.ArgumentTypeError(
                    f"{flag} values must be at most {_MAX[flag]:g}, got '{part}'"
                )
            values.append(value)
        return values

    return parse


def add_plan_command(commands: "argparse._SubParsersAction[Any]") -> None:
    """Add `plan` to the `fedfin` command line."""
    plan = commands.add_parser(
        "plan",
        help="from public data only: will DP federation beat the public model, and how to run it",
        description=(
            "Measure the public model's per-example gradients on the public pool, grouped by "
            "--group-by (regions, products: the assumption is that banks differ from the "
            "public optimum as much as public groups differ from each other). For each bank "
            "size, number of banks and ε, find the sample rate, batch size and rounds that "
            "keep the most of the non-private gain under the banks' own noise calibration, "
            "and say plainly when to keep the public model. No private data is read and no "
            "budget is spent."
        ),
    )
    plan.add_argument("--encoder", type=Path, required=True, help="pretrained checkpoint dir")
    plan.add_argument(
        "--public-data",
        default="lending-club",
        help="'lending-club' (the built-in public pool, as `fedfin pretrain` splits it) or a "
        "CSV/Parquet file whose rows are all public (default: %(default)s)",
    )
    plan.add_argument(
        "--group-by",
        help="column whose groups stand in for banks (default: the built-in data's addr_state)",
    )
    plan.add_argument(
        "--split-banks",
        type=_bounded("--split-banks", int, 1, 1000, open_low=False),
        default=5,
        help="built-in data: --banks given to `fedfin pretrain` (default: %(default)s)",
    )
    plan.add_argument(
        "--seed",
        type=_bounded("--seed", int, 0, 2**32 - 1, open_low=False),
        default=0,
        help="built-in data: pretrain's --seed (default: 0)",
    )
    plan.add_argument(
        "--bank-rows",
        type=_numbers("--bank-rows", int),
        default=[1_000, 10_000, 100_000],
        help="loans per bank, comma-separated (default: 1000,10000,100000)",
    )
    plan.add_argument(
        "--num-banks",
        type=_numbers("--num-banks", int),
        default=[5],
        help="banks in the federation, comma-separated (default: 5)",
    )
    plan.add_argument(
        "--epsilon",
        type=_numbers("--epsilon", float),
        default=[1.0, 3.0, 8.0],
        help="each bank's ε budget, comma-separated; 'inf' = non-private (default: 1,3,8)",
    )
    plan.add_argument(
        "--rounds",
        type=_numbers("--rounds", int),
        default=list(ROUND_CANDIDATES),
        help="rounds to consider (default: 3,5,10,20)",
    )
    plan.add_argument(
        "--delta",
        type=_bounded("--delta", float, 0, 0.01, open_high=True),
        default=1e-5,
        help="each bank's δ, below 0.01 (default: 1e-5)",
    )
    plan.add_argument(
        "--max-grad-norm",
        type=_bounded("--max-grad-norm", float, 0, 1000),
        default=1.0,
        help="clipping norm C (default: 1.0)",
    )
    plan.add_argument(
        "--local-epochs",
        type=_bounded("--local-epochs", float, 0, 100),
        default=1.0,
        help="epochs per round (default: 1.0)",
    )
    plan.add_argument(
        "--min-noise",
        type=_bounded("--min-noise", float, 0, 20),
        default=0.5,
        help="banks' noise floor (default: 0.5)",
    )
    plan.add_argument(
        "--nonprivate-gain",
        type=_bounded("--nonprivate-gain", float, 0, 1),
        help="AUC gain non-private federation would bring, if known: shown as expected gain",
    )
    plan.add_argument(
        "--signal",
        type=_bounded("--signal", float, 0, 1000, open_low=False),
        help="the banks' gradient signal |g| if known (a pilot, an earlier federation's "
        "aggregate); default: estimated from the public groups",
    )
    plan.add_argument("--json", type=Path, help="also write the plan as JSON here")
    plan.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from fedfin.common.sources import load_source
    from fedfin.server.planner import make_plan, public_gradient_signal

    if args.max_grad_norm <= 0 or not math.isfinite(args.max_grad_norm):
        raise ConfigError(f"--max-grad-norm must be positive, got {args.max_grad_norm}")
    if args.local_epochs <= 0 or args.local_epochs > 100:
        raise ConfigError(f"--local-epochs must be in (0, 100], got {args.local_epochs}")
    if args.json is not None and args.json.exists() and args.json.is_dir():
        raise ConfigError(f"--json {args.json}: is a directory")
    if args.public_data == "lending-club":
        from fedfin.common import lending_club
        from fedfin.common.config import SplitConfig

        source = load_source("lending-club", seed=args.seed)
        public = source.split(SplitConfig(num_banks=args.split_banks, seed=args.seed)).public
        group_by = args.group_by or source.partition_by or lending_club.STATE_COLUMN
        name = "built-in public pool"
    else:
        from fedfin.common.tables import read_table

        public = read_table(Path(args.public_data))
        group_by = args.group_by
        name = args.public_data
        if group_by is None:
            raise ConfigError(
                "--group-by is required with a file: name a column whose groups are like banks"
            )
    questions = [
        PlanQuestion(
            bank_rows=n,
            banks=k,
            epsilon=eps,
            delta=args.delta,
            max_grad_norm=args.max_grad_norm,
            local_epochs=args.local_epochs,
            min_noise_multiplier=args.min_noise,
        )
        for k in args.num_banks
        for n in args.bank_rows
        for eps in args.epsilon
    ]
    if args.signal is not None and not (args.signal >= 0 and math.isfinite(args.signal)):
        raise ConfigError(f"--signal must be a non-negative number, got {args.signal}")
    signal = public_gradient_signal(args.encoder, public, group_by, name, args.max_grad_norm)
    print(
        f"public signal: |g| = {signal.signal_norm:.4f} (clip {signal.max_grad_norm}) over "
        f"{signal.groups} groups of '{group_by}', {signal.rows} public rows; "
        f"d = {signal.dimension} parameters"
    )
    if args.signal is not None:
        signal = dataclasses.replace(signal, signal_norm=args.signal)
        print(f"planning with the given --signal {args.signal:g} instead")
    plan = make_plan(signal, questions, rounds=args.rounds)
    print(_table(plan.recommendations, args.nonprivate_gain))
    print(
        f"noise/signal = σC√d/(B|g|) per step; retained = 1/(1+(noise/signal / "
        f"{NOISE_TOLERANCE:.3g})²) of the non-private gain; keep the public model when retained "
        f"< {KEEP_PUBLIC_BELOW}, i.e. |g| under 'needs |g|'. An empirical "
        "first-order model: docs/plan.md."
    )
    if args.json is not None:
        write_json_atomically(args.json, _as_json(plan.signal, plan.recommendations))
        print(f"plan: {args.json}")
    return 0


def _table(recommendations: list[Recommendation], gain: float | None) -> str:
    header = (
        f"{'loans/bank':>10} {'banks':>5} {'ε':>5} {'q':>9} {'batch':>6} {'rounds':>6} "
        f"{'σ':>6} {'noise/signal':>12} {'retained':>8} {'needs |g|':>9}"
        + (f" {'exp. gain':>9}" if gain is not None else "")
        + "  verdict"
    )
    lines = [header]
    for rec in recommendations:
        q = rec.question
        eps = "∞" if math.isinf(q.epsilon) else f"{q.epsilon:g}"
        best = rec.best
        if best is None:
            lines.append(f"{q.bank_rows:>10} {q.banks:>5} {eps:>5} {'-':>9}  {rec.verdict}")
            continue
        expected = f" {gain * best.retained:>+9.4f}" if gain is not None else ""
        lines.append(
            f"{q.bank_rows:>10} {q.banks:>5} {eps:>5} {'1/' + str(round(1 / best.sample_rate)):>9} "
            f"{best.batch_size:>6} {best.rounds:>6} {best.noise_multiplier:>6.2f} "
            f"{best.step_noise_to_signal:>12.3g} {best.retained:>8.2f} "
            f"{best.break_even_signal:>9.3g}"
            f"{expected}  {rec.verdict}: {rec.reason}"
        )
    return "\n".join(lines)


def _as_json(signal: Any, recommendations: list[Recommendation]) -> dict[str, Any]:
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    rows = []
    for rec in recommendations:
        best = rec.best
        rows.append(
            {
                "bank_rows": rec.question.bank_rows,
                "banks": rec.question.banks,
                "epsilon": finite(rec.question.epsilon),
                "delta": rec.question.delta,
                "verdict": rec.verdict,
                "reason": rec.reason,
                "plan": None
                if best is None
                else {
                    "sample_rate": best.sample_rate,
                    "batch_size": best.batch_size,
                    "rounds": best.rounds,
                    "steps": best.steps,
                    "noise_multiplier": best.noise_multiplier,
                    "step_noise_to_signal": finite(best.step_noise_to_signal),
                    "retained": best.retained,
                    "break_even_signal": best.break_even_signal,
                },
            }
        )
    return {
        "signal": {
            "signal_norm": signal.signal_norm,
            "dimension": signal.dimension,
            "mean_clipped_norm": signal.mean_clipped_norm,
            "max_grad_norm": signal.max_grad_norm,
            "rows": signal.rows,
            "groups": signal.groups,
        },
        "plans": rows,
    }
