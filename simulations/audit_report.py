"""`fedfin audit` output: a table for people, JSON for programs, a PNG of ε over rounds."""

import json
from pathlib import Path
from typing import Any

from fedfin.common.atomic import write_atomically
from fedfin.common.audit import BankAudit


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def audit_status(audit: BankAudit) -> str:
    """The first thing wrong with a bank's ledger, in capitals; "ok" when nothing is."""
    if audit.chain_broken:
        return "CHAIN BROKEN"
    if audit.field_problems:
        return "INVALID FIELD"
    if audit.duplicate_problems:
        return "DUPLICATE"
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
        "ε recorded (PRV)",
        "ε PLD (check)",
        "ε RDP (looser)",
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
    lines += [
        "releases = train + evaluate; anchored = replies whose (seq, hash) the server recorded "
        "and the ledger was checked against.",
        "Authoritative: ε recorded, by the bank's PRV accountant, which enforces the budget; "
        "ε PLD recomputes it independently with dp-accounting (both tight); status and "
        "remaining use these.",
        "ε RDP (dp-accounting) is a looser upper bound, for reference only: it may exceed the "
        "budget while the status is ok.",
    ]
    for a in audits:
        if a.epsilon_against_aggregate is not None:
            lines.append(distributed_line(a))
        lines += [f"{a.bank}: {problem}" for problem in a.all_problems]
        if a.anchors_checked == 0:
            lines.append(
                f"{a.bank}: note: no anchor names this bank, so its ledger was not checked "
                "against the server's record (did it reply under another name?)"
            )
    return "\n".join(lines)


def distributed_line(a: BankAudit) -> str:
    """Both guarantees of a bank's distributed-DP rounds, and which one its budget holds."""
    shares = a.aggregate_charged_rounds
    enforced = (
        f"{shares} of them charged for the K-bank sum's noise (the bank added a share σ/√K; "
        "fedsgd, one linear step)"
        if shares
        else "each charged for the bank's own full noise"
    )
    return (
        f"{a.bank}: distributed DP in {a.distributed_rounds} round(s), {enforced}: ε against a "
        f"recipient of K-bank sums only {_fmt(a.epsilon_against_aggregate)}"
        f"{'' if shares else ' (proven for fedsgd rounds only)'}; against the server if "
        f"secure aggregation were broken {_fmt(a.epsilon_against_server)} "
        "(PLD, from the ledger alone)"
    )


def audit_json(audits: list[BankAudit]) -> dict[str, Any]:
    return {"ok": all(a.ok for a in audits), "banks": [a.as_dict() for a in audits]}


def write_audit_json(path: Path, audits: list[BankAudit]) -> None:
    text = json.dumps(audit_json(audits), indent=2) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
_LINE_STYLES = ("-", "--", "-.", ":")
BUDGET_COLOUR = "black"  # no bank's colour: matplotlib's C0-C9 cycle has no black


def write_epsilon_plot(path: Path, audits: list[BankAudit]) -> None:
    """Cumulative ε per bank over its releases, with each budget as a black dotted line.

    Banks that spend alike draw the same curve; each gets its own marker, line style and
    a small sideways offset, and later banks smaller markers, so every one stays visible.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(8, 4.5))
    drawn = [a for a in audits if a.curve]
    width = 0.25  # the offsets spread the banks over a quarter of a round
    for index, audit in enumerate(drawn):
        offset = (index / max(len(drawn) - 1, 1) - 0.5) * width if len(drawn) > 1 else 0.0
        xs = [x + offset for x in range(len(audit.curve) + 1)]
        ys = [0.0] + [e for _, _, e in audit.curve]
        axes.plot(
            xs,
            ys,
            color=f"C{index % 10}",
            marker=_MARKERS[index % len(_MARKERS)],
            markersize=max(7 - 0.4 * index, 3),
            markerfacecolor="none" if index % 2 else None,
            linestyle=_LINE_STYLES[index % len(_LINE_STYLES)],
            linewidth=1.2,
            alpha=0.85,
            label=audit.bank,
        )
    budgets: dict[float, list[str]] = {}
    for audit in audits:
        if audit.budget is not None:
            budgets.setdefault(audit.budget, []).append(audit.bank)
    for budget, banks in sorted(budgets.items()):
        who = banks[0] if len(banks) == 1 else f"{len(banks)} banks"
        axes.axhline(
            budget,
            color=BUDGET_COLOUR,
            linestyle=":",
            linewidth=1.0,
            label=f"budget ε = {budget:g} ({who})",
        )
    axes.set_xlabel("training rounds released (all runs, in order; banks offset sideways)")
    axes.set_ylim(bottom=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("cumulative ε (recorded, PRV)")
    axes.set_title("Privacy spent per bank (black dotted: budget)")
    if drawn or budgets:
        axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()

    def save(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=110)

    try:
        write_atomically(path, save)
    finally:
        plt.close(figure)
