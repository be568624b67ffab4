"""Audit a bank's privacy ledger from its own records, with an independent accountant.

For each state directory: verify the hash chain, recompute cumulative ε from the recorded
DP events with Google's `dp-accounting` (PLD, tight; RDP, an upper bound), and compare
with what the bank recorded. A recorded ε below the independent PLD figure (beyond
numerical tolerance) is understated; ε above the bank's budget is an excess.
"""

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from common.accounting import DpEvent, merged_history
from common.errors import LedgerError
from common.ledger import LEDGER_FILE, PrivacyLedger, events_of

_MAX_CHECKPOINTS = 50  # entries re-checked per ledger (always including the last)
_CHECKPOINT_DISCRETIZATION = 1e-3  # 5x faster PLD; within 0.2% of the fine grid
_RELATIVE_TOLERANCE = 0.02  # PRV and PLD discretise differently; both are upper bounds
_ABSOLUTE_TOLERANCE = 0.01


def dp_accounting_epsilon(
    events: list[DpEvent], delta: float, method: str, discretization: float = 1e-4
) -> float:
    """Cumulative ε of `events` by dp-accounting's PLD (pessimistic) or RDP accountant."""
    history = merged_history(events)
    if not history:
        return 0.0
    composed = dp_event.ComposedDpEvent(
        [
            dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
            )
            for sigma, q, steps in history
        ]
    )
    accountant: Any = (
        pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)
        if method == "pld"
        else rdp_privacy_accountant.RdpAccountant()
    )
    accountant.compose(composed)
    return float(accountant.get_epsilon(delta))


def understates(recorded: float, independent: float) -> bool:
    return recorded + _ABSOLUTE_TOLERANCE < independent * (1 - _RELATIVE_TOLERANCE)


@dataclass
class BankAudit:
    """What one bank released and spent, proven from its ledger."""

    bank: str
    state_dir: str
    entries: int = 0
    train_releases: int = 0
    evaluate_releases: int = 0
    runs: int = 0
    delta: float | None = None
    budget: float | None = None
    epsilon_recorded: float = 0.0
    epsilon_pld: float = 0.0
    epsilon_rdp: float = 0.0
    chain_problems: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    partial_tail: bool = False
    checked_entries: int = 0
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (seq, round, ε)

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else self.budget - self.epsilon_recorded

    @property
    def chain_broken(self) -> bool:
        return bool(self.chain_problems)

    @property
    def exceeded(self) -> bool:
        spent = max(self.epsilon_recorded, self.epsilon_pld)
        return self.budget is not None and spent > self.budget * (1 + 1e-9)

    @property
    def understated(self) -> bool:
        return any(p.startswith("understated") for p in self.problems)

    @property
    def ok(self) -> bool:
        return not self.chain_problems and not self.problems and not self.exceeded

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "remaining": self.remaining,
            "chain_ok": not self.chain_broken,
            "understated": self.understated,
            "exceeded": self.exceeded,
            "ok": self.ok,
        }


def audit_state_dir(state_dir: Path) -> BankAudit:
    ledger = PrivacyLedger(state_dir)
    check = ledger.check()
    entries = check.entries
    audit = BankAudit(bank=state_dir.name, state_dir=str(state_dir), entries=len(entries))
    audit.chain_problems += check.problems
    audit.partial_tail = check.partial_tail
    if not entries:
        return audit
    audit.bank = str(entries[-1].get("bank", state_dir.name))
    audit.train_releases = sum(e.get("kind") == "train" for e in entries)
    audit.evaluate_releases = sum(e.get("kind") == "evaluate" for e in entries)
    audit.runs = len({e.get("run_id") for e in entries})
    audit.delta = float(entries[-1].get("delta", 0.0))
    audit.budget = float(entries[-1]["epsilon_budget"]) if "epsilon_budget" in entries[-1] else None
    try:
        events_per_entry = [events_of(e) for e in entries]
    except TypeError as exc:
        audit.problems.append(f"unreadable DP events ({exc})")
        return audit
    all_events = [event for events in events_per_entry for event in events]
    audit.epsilon_recorded = float(entries[-1].get("epsilon_cumulative", 0.0))
    audit.epsilon_pld = dp_accounting_epsilon(all_events, audit.delta, "pld")
    audit.epsilon_rdp = dp_accounting_epsilon(all_events, audit.delta, "rdp")
    audit.curve = [  # one point per training release: ε only moves when the bank trains
        (int(e.get("seq", i + 1)), int(e.get("server_round", 0)), float(e["epsilon_cumulative"]))
        for i, e in enumerate(entries)
        if "epsilon_cumulative" in e and e.get("kind") == "train"
    ]
    for index in _checkpoints(entries):
        prefix = [event for events in events_per_entry[: index + 1] for event in events]
        recorded = float(entries[index].get("epsilon_cumulative", 0.0))
        independent = dp_accounting_epsilon(
            prefix, float(entries[index]["delta"]), "pld", _CHECKPOINT_DISCRETIZATION
        )
        audit.checked_entries += 1
        if understates(recorded, independent):
            audit.problems.append(
                f"understated ε at line {index + 1}: recorded {recorded:.4f}, "
                f"independent PLD {independent:.4f}"
            )
    return audit


def _checkpoints(entries: list[dict[str, Any]]) -> list[int]:
    """Up to `_MAX_CHECKPOINTS` entries: the last, each run's last, the rest spread evenly.

    Every entry's ε is checked when the ledger is short; on a long one the sample keeps the
    audit to seconds, and the last entry (what the bank has spent) is always checked.
    """
    last = len(entries) - 1
    if len(entries) <= _MAX_CHECKPOINTS:
        return list(range(len(entries)))
    last_of_run: dict[Any, int] = {}
    for index, entry in enumerate(entries):
        last_of_run[entry.get("run_id")] = index
    runs = sorted(set(last_of_run.values()) - {last})
    spread = [round(i * last / _MAX_CHECKPOINTS) for i in range(_MAX_CHECKPOINTS)]
    candidates = runs if len(runs) <= _MAX_CHECKPOINTS // 2 else runs[:: len(runs) // 25 + 1]
    chosen = {last, *candidates}
    for index in spread:
        if len(chosen) >= _MAX_CHECKPOINTS:
            break
        chosen.add(index)
    return sorted(chosen)


def find_state_dirs(path: Path) -> list[Path]:
    """A bank's state dir itself, or every state dir below a run directory."""
    if not path.exists():
        raise LedgerError(f"{path}: no such file or directory")
    if path.is_file():
        path = path.parent
    if (path / LEDGER_FILE).exists():
        return [path]
    found = sorted(p.parent for p in path.rglob(LEDGER_FILE))
    if not found:
        raise LedgerError(f"{path}: no {LEDGER_FILE} here or below; is this a state or run dir?")
    return found


def audit_path(path: Path) -> list[BankAudit]:
    return [audit_state_dir(state_dir) for state_dir in find_state_dirs(path)]
