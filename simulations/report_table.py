"""Tables for people: the per-bank result of a simulation."""

from collections.abc import Sequence
from typing import Any


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: Sequence[float | None] | None) -> str:
    """AUC and its 95% interval: `0.6971 [0.560-0.834]`."""
    if value is None:
        return "-"
    if not ci or ci[0] is None or ci[1] is None:
        return _fmt(value)
    return f"{value:.4f} [{ci[0]:.3f}-{ci[1]:.3f}]"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def bank_table(report: dict[str, Any]) -> str:
    """Per bank: test defaults, AUC of the public and federated models with 95% intervals,
    the model the bank serves (chosen on its validation rows) with its test AUC, the served
    model's mean predicted default probability against the observed rate, and ε spent.

    Every figure is what the bank measured itself and kept in its local report (its
    evaluations and `serving.json`); a simulation, which plays every bank, puts them side
    by side.
    """
    header = (
        "bank",
        "train rows",
        "test rows (defaults)",
        "AUC public model",
        "AUC federated",
        "served (validation AUC public/fed)",
        "AUC served",
        "mean PD",
        "observed",
        "ε spent",
        "ε budget",
    )
    banks = report["per_bank"]
    rows = []
    for name, bank in banks.items():
        served = bank.get("served")
        validation = (
            f"{served} ({_fmt(bank.get('validation_auc_public_model'), 3)}/"
            f"{_fmt(bank.get('validation_auc_federated'), 3)})"
            if served
            else "-"
        )
        defaults = bank.get("test_defaults")
        test_rows = f"{bank.get('test_rows', '-')}" + (
            f" ({defaults})" if defaults is not None else ""
        )
        rows.append(
            (
                name,
                str(bank.get("dp_train_rows", bank["train_rows"])),
                test_rows,
                _with_ci(bank["auc_public_model"], bank.get("auc_public_model_ci")),
                _with_ci(bank["auc_federated"], bank.get("auc_federated_ci")),
                validation,
                _with_ci(bank.get("auc_served"), bank.get("auc_served_ci")),
                _fmt(bank.get("mean_pd_served")),
                _fmt(bank.get("default_rate_test")),
                _fmt(bank["epsilon_spent"], 3),
                _fmt(bank["epsilon_budget"], 3),
            )
        )
    values = list(banks.values())
    rows.append(
        (
            "mean",
            "",
            "",
            _fmt(_mean([b["auc_public_model"] for b in values])),
            _fmt(_mean([b["auc_federated"] for b in values])),
            "",
            _fmt(_mean([b.get("auc_served") for b in values])),
            _fmt(_mean([b.get("mean_pd_served") for b in values])),
            _fmt(_mean([b.get("default_rate_test") for b in values])),
            "",
            "",
        )
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines += [
        "train rows: the rows each bank trained on with DP (its validation rows left out); "
        "test rows: its own test split, (defaults) in it",
        "AUC [95% CI, DeLong] on each bank's test split; federated: the final global encoder "
        "with the bank's private head; served: the federated model only if it beats the "
        "public one on the bank's validation rows beyond chance (DeLong, one-sided 95%), "
        "else the public model; calibrated",
        "mean PD: the served model's mean predicted default probability on the test split, "
        "after the bank's own Platt calibration; observed: the test split's default rate",
        "all read from each bank's local report (evaluations.jsonl, serving.json); banks never "
        "send them",
    ]
    return "\n".join(lines)
