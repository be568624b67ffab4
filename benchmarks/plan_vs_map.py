"""`fedfin plan` against the privacy-utility map: predicted and measured share of the gain.

For every map cell (loans per bank × banks × ε) the planner is asked about the plan the map
actually ran (its sample rate, steps, rounds and δ). What it predicts is the retained
fraction of the non-private gain; what the map measured is fedfin's gain over the public
model divided by the non-private federation's gain (paired, mean over seeds).

Two signals go in: the one `fedfin plan` would use (public rows grouped by state, seed 0's
public pool and encoder), and, to check the noise model apart from that estimate, the banks'
real one (computed here on the synthetic banks' rows, which no coordinator could do). The one
constant of the model (`NOISE_TOLERANCE`, τ) is fitted with the banks' signal on the 5-bank
cells up to 100,000 loans and checked on the others (20 banks, 1M loans), out of sample.

    python -m benchmarks.plan_vs_map            # reads results/privacy_utility_map.json
"""

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmarks.privacy_utility_map import (
    NON_PRIVATE,
    RESULT_FILE,
    RESULTS,
    Recipe,
    _pretrain,
    model_of,
)
from fedfin.common.gradient_signal import (
    GradientSignal,
    measure_gradient_signal,
    pooled_clipped_mean,
)
from fedfin.common.lending_club import STATE_COLUMN
from fedfin.common.lending_club_generator import LendingClubGenerator
from fedfin.common.planning import KEEP_PUBLIC_BELOW, PlanQuestion, evaluate

OUT_JSON = RESULTS / "plan_vs_map.json"
OUT_MD = RESULTS / "plan_vs_map.md"
FIT_BANKS, FIT_MAX_ROWS = 5, 100_000  # τ is fitted on these cells, checked on all others
_TAUS = np.exp(np.linspace(np.log(0.05), np.log(200.0), 400))
_MIN_NONPRIVATE_GAIN = 0.002  # below this the ratio measured/non-private is noise
_ORACLE_BANKS, _ORACLE_ROWS = 5, 4_000


def signals(recipe: Recipe, seed: int = 0) -> tuple[GradientSignal, GradientSignal]:
    """The planner's input as a coordinator computes it (public rows grouped by state), and,
    for this check only, the banks' real signal: each bank's mean clipped gradient at the
    public model, offset from the public pool's (the clipping bias), on its training rows."""
    torch.set_num_threads(1)
    generator = LendingClubGenerator(seed, calibration_rows=recipe.calibration_rows)
    with tempfile.TemporaryDirectory(prefix="fedfin-plan-") as tmp:
        public, table = _pretrain(generator, recipe, seed, Path(tmp))
    groups = np.asarray(generator.public(recipe.public_rows)[STATE_COLUMN].astype(str))
    model = model_of(public, public.checkpoint.arrays, None, seed)
    from_public = measure_gradient_signal(model, table, groups, recipe.max_grad_norm)
    schema = public.checkpoint.schema
    frames = [generator.bank(i, _ORACLE_ROWS, "train") for i in range(_ORACLE_BANKS)]
    banks = schema.transform(pd.concat(frames, ignore_index=True), "banks' training rows")
    bank_of_row = np.repeat(np.arange(_ORACLE_BANKS), _ORACLE_ROWS)
    reference = pooled_clipped_mean(model, table, recipe.max_grad_norm)
    from_banks = measure_gradient_signal(
        model, banks, bank_of_row, recipe.max_grad_norm, reference=reference
    )
    return from_public, from_banks


def measured_cells(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per cell and private ε: fedfin's gain, the non-private gain, and their ratio."""
    from benchmarks.privacy_utility_map import summarise

    summary = result.get("summary") or summarise(result)
    nonprivate = {
        (e["rows"], e["banks"]): e["methods"]["d_fedfin"]
        for e in summary
        if e["epsilon"] == NON_PRIVATE and "d_fedfin" in e["methods"]
    }
    out = []
    for e in summary:
        if e["epsilon"] == NON_PRIVATE or "d_fedfin" not in e["methods"]:
            continue
        full = nonprivate.get((e["rows"], e["banks"]))
        if full is None:
            continue
        fed = e["methods"]["d_fedfin"]
        ratio = fed["gain"] / full["gain"] if full["gain"] > _MIN_NONPRIVATE_GAIN else math.nan
        out.append(
            {
                "rows": e["rows"],
                "banks": e["banks"],
                "epsilon": float(e["epsilon"]),
                "seeds": len(e["seeds"]),
                "gain": fed["gain"],
                "gain_ci": fed["gain_ci"],
                "nonprivate_gain": full["gain"],
                "measured_retained": ratio,
                "pays": len(e["seeds"]) > 1 and fed["gain"] - fed["gain_ci"] > 0,
            }
        )
    return out


def predicted(
    cell: dict[str, Any], signal: GradientSignal, recipe: Recipe, tolerance: float
) -> float:
    """The planner's retained fraction for the plan the map ran in this cell."""
    shape = recipe.for_bank(cell["rows"])
    question = PlanQuestion(
        bank_rows=cell["rows"],
        banks=cell["banks"],
        epsilon=cell["epsilon"],
        delta=shape["delta"],
        max_grad_norm=recipe.max_grad_norm,
        local_epochs=shape["epochs_per_round"],
        min_planned_rounds=min(3, recipe.rounds),
    )
    candidate = evaluate(question, signal, shape["sample_rate"], recipe.rounds, tolerance)
    return 0.0 if candidate is None else candidate.retained


def _fits(cell: dict[str, Any]) -> bool:
    """The cells τ is fitted on: 5 banks up to 100,000 loans; 20 banks and 1M are checks."""
    return bool(cell["banks"] == FIT_BANKS and cell["rows"] <= FIT_MAX_ROWS)


def fit_tolerance(
    cells: list[dict[str, Any]], signal: GradientSignal, recipe: Recipe
) -> tuple[float, float]:
    """τ minimising the squared error of the retained fraction on the fitting cells."""
    usable = [c for c in cells if _fits(c) and math.isfinite(c["measured_retained"])]
    if not usable:
        raise SystemExit("plan_vs_map: no finished 5-bank cells with a non-private gain to fit on")
    target = np.clip([c["measured_retained"] for c in usable], 0.0, 1.0)
    errors = [
        float(np.mean((np.array([predicted(c, signal, recipe, t) for c in usable]) - target) ** 2))
        for t in _TAUS
    ]
    best = int(np.argmin(errors))
    return float(_TAUS[best]), math.sqrt(errors[best])


def report(
    cells: list[dict[str, Any]],
    public: GradientSignal,
    banks: GradientSignal,
    tau: float,
    rmse: float,
) -> str:
    lines = [
        "# fedfin plan against the privacy-utility map",
        "",
        "Two questions: is the planner's noise model right when it knows the banks' gradient "
        "signal, and does the signal it estimates from public data alone match the banks'?",
        "",
        f"- Signal from public data only (seed 0's public source, {public.rows} rows grouped by "
        f"state into {public.groups} groups), what `fedfin plan` uses: |g| = "
        f"{public.signal_norm:.4f}.",
        f"- The banks' real signal (benchmark only: banks 0-{_ORACLE_BANKS - 1}, "
        f"{_ORACLE_ROWS} training rows each, offset from the public pool's clipped mean): "
        f"|g| = {banks.signal_norm:.4f}. d = {banks.dimension} parameters.",
        f"- τ fitted with the banks' real signal on the {FIT_BANKS}-bank cells up to "
        f"{FIT_MAX_ROWS:,} loans: **{tau:.3g}** "
        f"(RMSE of the retained fraction {rmse:.3f}); every other cell is out of sample.",
        "",
        "Retained = fedfin's gain over the public model / the non-private federation's gain "
        f"(NaN where the non-private gain is under {_MIN_NONPRIVATE_GAIN}). The planner says "
        f"*keep the public model* when its retained fraction is under {KEEP_PUBLIC_BELOW}; "
        "*pays* = the measured gain's 95% interval is above 0.",
        "",
        "| loans/bank | banks | ε | set | predicted (banks' signal) | predicted (public "
        "only) | measured retained | fedfin gain | non-private gain | plan says (public only) "
        "| measured |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    agree = {"oracle": 0, "public": 0}
    for c in cells:
        verdict = "federate" if c["predicted_public"] >= KEEP_PUBLIC_BELOW else "keep public"
        agree["public"] += (verdict == "federate") == c["pays"]
        agree["oracle"] += (c["predicted_retained"] >= KEEP_PUBLIC_BELOW) == c["pays"]
        lines.append(
            f"| {c['rows']:,} | {c['banks']} | {c['epsilon']:g} | "
            f"{'fit' if _fits(c) else 'check'} | {c['predicted_retained']:.2f} | "
            f"{c['predicted_public']:.2f} | {c['measured_retained']:.2f} | "
            f"{c['gain']:+.4f} ± {c['gain_ci']:.4f} | {c['nonprivate_gain']:+.4f} | {verdict} | "
            f"{'pays' if c['pays'] else 'does not pay'} |"
        )
    lines += [
        "",
        f"Verdict (retained ≥ {KEEP_PUBLIC_BELOW} vs measured gain's interval above 0) agrees "
        f"in {agree['oracle']} of {len(cells)} cells with the banks' signal and in "
        f"{agree['public']} of {len(cells)} with the public-only estimate.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--map", type=Path, default=RESULT_FILE, help="the map's JSON")
    args = parser.parse_args(argv)
    if not args.map.exists():
        print(f"plan_vs_map: {args.map} not found; run the map first", file=sys.stderr)
        return 2
    result = json.loads(args.map.read_text())
    recipe = Recipe()
    cells = measured_cells(result)
    public, banks = signals(recipe)
    tau, rmse = fit_tolerance(cells, banks, recipe)
    for cell in cells:
        cell["predicted_retained"] = predicted(cell, banks, recipe, tau)
        cell["predicted_public"] = predicted(cell, public, recipe, tau)
    out = {
        "public_signal": public.__dict__,
        "bank_signal": banks.__dict__,
        "tolerance": tau,
        "fit_rmse": rmse,
        "fit_banks": FIT_BANKS,
        "fit_max_rows": FIT_MAX_ROWS,
        "cells": cells,
    }
    OUT_JSON.write_text(json.dumps(out, indent=1, default=float) + "\n")
    OUT_MD.write_text(report(cells, public, banks, tau, rmse))
    print(OUT_MD.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
