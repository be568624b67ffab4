"""Tables for people: the per-bank result of a simulation."""

from typing import Any


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def bank_table(report: dict[str, Any]) -> str:
    """AUC before (public model) and after federation, and ε spent of the budget, per bank.

    The federated AUC is what each bank measured itself and kept in its local report; in a
    simulation, which plays every bank, the table gathers those reports side by side.
    """
    header = ("bank", "train rows", "AUC public model", "AUC federated", "ε spent", "ε budget")
    rows = [
        (
            name,
            str(bank["train_rows"]),
            _fmt(bank["auc_public_model"]),
            _fmt(bank["auc_federated"]),
            _fmt(bank["epsilon_spent"], 3),
            _fmt(bank["epsilon_budget"], 3),
        )
        for name, bank in report["per_bank"].items()
    ]
    aucs = [
        b["auc_federated"] for b in report["per_bank"].values() if b["auc_federated"] is not None
    ]
    before = [b["auc_public_model"] for b in report["per_bank"].values()]
    rows.append(
        (
            "mean",
            "",
            _fmt(sum(before) / len(before) if before else None),
            _fmt(sum(aucs) / len(aucs) if aucs else None),
            "",
            "",
        )
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(
        "AUC federated: the final global encoder with each bank's private head on the bank's "
        "own test split, read from each bank's local report (banks never send it)"
    )
    return "\n".join(lines)
