"""`fedfin audit` output: a table for people, JSON for programs, a PNG of ε over rounds."""

import json
from pathlib import Path
from typing import Any

from common.atomic import write_atomically
from common.audit import BankAudit


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def audit_status(audit: BankAudit) -> str:
    """The first thing wrong with a bank's ledger, in capitals; "ok" when nothing is."""
    if audit.chain_broken:
        return "CHAIN BROKEN"
    if audit.anchor_problems:
        truncated = any(p.startswith("truncated") for p in audit.anchor_problems)
        return "TRUNCATED" if truncated else "REWRITTEN"
    if audit.partial_tail:
        return "PARTIAL LAST LINE"
    if audit.ledger_problems:
        return "UNCHARGED TRAIN"
    if audit.understated:
        return "ε UNDERSTATED"
    if audit.exceeded:
        return "BUDGET EXCEEDED"
    if audit.problems:
        return "PROBLEM"
    return "ok"


def audit_table(audits: list[BankAudit]) -> str:
    header = (
        "bank",
        "releases",
        "anchored",
        "runs",
        "ε recorded",
        "ε PLD",
        "ε RDP",
        "δ",
        "budget",
        "remaining",
        "status",
    )
    rows = []
    for a in audits:
        rows.append(
            (
                a.bank,
                f"{a.train_releases}+{a.evaluate_releases}",
                "-" if a.anchors_checked is None else str(a.anchors_checked),
                str(a.runs),
                _fmt(a.epsilon_recorded),
                _fmt(a.epsilon_pld),
                _fmt(a.epsilon_rdp),
                "-" if a.delta is None else f"{a.delta:.0e}",
                _fmt(a.budget, 3),
                _fmt(a.remaining),
                audit_status(a),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.append(
        "releases = train + evaluate; anchored = replies whose (seq, hash) the server recorded "
        "and the ledger was checked against; ε PLD/RDP recomputed with dp-accounting from the "
        "ledger's DP events"
    )
    for a in audits:
        problems = [*a.chain_problems, *a.anchor_problems, *a.ledger_problems, *a.problems]
        lines += [f"{a.bank}: {problem}" for problem in problems]
        if a.anchors_checked == 0:
            lines.append(
                f"{a.bank}: note: no anchor names this bank, so its ledger was not checked "
                "against the server's record (did it reply under another name?)"
            )
    return "\n".join(lines)


def audit_json(audits: list[BankAudit]) -> dict[str, Any]:
    return {"ok": all(a.ok for a in audits), "banks": [a.as_dict() for a in audits]}


def write_audit_json(path: Path, audits: list[BankAudit]) -> None:
    text = json.dumps(audit_json(audits), indent=2) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_epsilon_plot(path: Path, audits: list[BankAudit]) -> None:
    """Cumulative ε per bank over its releases, with each bank's budget as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for index, audit in enumerate(audits):
        colour = f"C{index % 10}"
        if audit.curve:
            xs = list(range(len(audit.curve) + 1))
            ys = [0.0] + [e for _, _, e in audit.curve]
            axes.plot(xs, ys, marker="o", markersize=3, color=colour, label=audit.bank)
        if audit.budget is not None:
            axes.axhline(audit.budget, color=colour, linestyle="--", linewidth=0.8)
    axes.set_xlabel("training rounds released (all runs, in order)")
    axes.set_ylim(bottom=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("cumulative ε")
    axes.set_title("Privacy spent per bank (dashed: budget)")
    if any(a.curve for a in audits):
        axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()

    def save(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=110)

    write_atomically(path, save)
    plt.close(figure)
