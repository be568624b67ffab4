"""Audit a bank's privacy ledger from its own records, with an independent accountant.

For each state directory: verify the hash chain, recompute cumulative ε from the recorded
DP events with Google's `dp-accounting` (PLD, tight; RDP, an upper bound), and compare
with what the bank recorded. A recorded ε below the independent PLD figure (beyond
numerical tolerance) is understated; ε above the bank's budget is an excess.

Which figure is authoritative: the bank enforces its budget with Opacus' PRV accountant
(the "ε recorded" column), and the independent PLD figure checks it; both are tight. RDP is a
looser upper bound, shown for reference: it can exceed the budget while the bank is within
it, so it never decides the status.

Every number the audit reads is checked first: a NaN, infinite, negative or non-numeric ε,
budget, δ or DP event makes the ledger fail the audit with the line and field named, and
the same ledger (or the same bank) found twice below a run dir is flagged as a duplicate.

A chain only proves that no line inside it was edited. Cutting lines off the end, or
rebuilding the chain with smaller charges and fresh hashes, leaves a valid chain; only a
record kept outside the bank shows it: the anchors the server recorded from each reply
(common/ledger_anchors.py). With anchors, every anchored (seq, hash) must still be in the
ledger. Even without them, a partial last line and a train release that carries no DP
events (itself or through the "charge" entry it names) make the ledger fail the audit.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedfin.common.accounting import DpEvent, merged_history
from fedfin.common.distributed_dp import (
    FACTS,
    aggregate_charged,
    aggregate_view_events,
    distributed_rounds,
    server_view_events,
)
from fedfin.common.errors import ConfigError
from fedfin.common.ledger import GENESIS_HASH, LEDGER_FILE, PrivacyLedger, events_of
from fedfin.common.ledger_anchors import LedgerAnchor

_MAX_CHECKPOINTS = 50  # entries re-checked per ledger (always including the last)
_CHECKPOINT_DISCRETIZATION = 1e-3  # 5x faster PLD; within 0.2% of the fine grid
_RELATIVE_TOLERANCE = 0.02  # PRV and PLD discretise differently; both are upper bounds
_ABSOLUTE_TOLERANCE = 0.01
AUTHORITATIVE = (
    "epsilon_recorded (the bank's PRV accountant, which enforces its budget), checked against "
    "epsilon_pld; epsilon_rdp is a looser upper bound, for reference only"
)


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
    anchor_problems: list[str] = field(default_factory=list)  # truncated or rewritten
    ledger_problems: list[str] = field(default_factory=list)  # partial line, uncharged train
    problems: list[str] = field(default_factory=list)  # ε understated
    partial_tail: bool = False
    anchors_checked: int | None = None  # None: audited without anchors
    checked_entries: int = 0
    curve: list[tuple[int, int, float]] = field(default_factory=list)  # (seq, round, ε)
    field_problems: list[str] = field(default_factory=list)  # NaN, negative, not a number
    duplicate_problems: list[str] = field(default_factory=list)  # same ledger or bank twice
    first_entry_hash: str | None = None  # one ledger's identity: copies share it
    # Distributed DP (common/distributed_dp.py): rounds whose sum carried K banks' noise
    # shares; ε (PLD) of the whole ledger against a recipient of such sums only, and against
    # a server that broke secure aggregation (above the enforced ε where a bank added shares).
    distributed_rounds: int = 0
    aggregate_charged_rounds: int = 0
    epsilon_against_aggregate: float | None = None
    epsilon_against_server: float | None = None

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else self.budget - self.epsilon_recorded

    @property
    def chain_broken(self) -> bool:
        return bool(self.chain_problems)

    @property
    def ledger_broken(self) -> bool:
        """The ledger cannot be trusted as the record of what was released."""
        return bool(
            self.chain_problems
            or self.anchor_problems
            or self.ledger_problems
            or self.field_problems
            or self.duplicate_problems
        )

    @property
    def all_problems(self) -> list[str]:
        """Every problem found, the ones that break the ledger first."""
        return [
            *self.chain_problems,
            *self.field_problems,
            *self.duplicate_problems,
            *self.anchor_problems,
            *self.ledger_problems,
            *self.problems,
        ]

    @property
    def exceeded(self) -> bool:
        """Over budget by the authoritative figures: PRV (recorded) or PLD; never by RDP."""
        spent = max(self.epsilon_recorded, self.epsilon_pld)
        return self.budget is not None and spent > self.budget * (1 + 1e-9)

    @property
    def understated(self) -> bool:
        return any(p.startswith("understated") for p in self.problems)

    @property
    def ok(self) -> bool:
        return not self.ledger_broken and not self.problems and not self.exceeded

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "remaining": self.remaining,
            "chain_ok": not self.chain_broken,
            "anchors_ok": not self.anchor_problems,
            "ledger_ok": not self.ledger_broken,
            "understated": self.understated,
            "exceeded": self.exceeded,
            "ok": self.ok,
            "authoritative": AUTHORITATIVE,
        }


def audit_state_dir(state_dir: Path, anchors: list[LedgerAnchor] | None = None) -> BankAudit:
    """Audit one bank's ledger; with `anchors`, also against what the server saw of it."""
    ledger = PrivacyLedger(state_dir)
    check = ledger.check()
    entries = check.entries
    name = bank_name_of_dir(state_dir)
    audit = BankAudit(bank=name, state_dir=str(state_dir), entries=len(entries))
    audit.chain_problems += check.problems
    audit.partial_tail = check.partial_tail
    if check.partial_tail:
        audit.ledger_problems.append(
            f"the ledger ends in a partial line after entry {len(entries)}: cut mid-write "
            "(a crash during an append, or a truncated file); what it recorded is unknown"
        )
    if entries:
        audit.bank = str(entries[-1].get("bank", name))
        audit.first_entry_hash = str(entries[0].get("hash"))
    audit.field_problems += [
        f"{ledger.path}: {problem}"
        for line, entry in enumerate(entries, start=1)
        for problem in entry_field_problems(entry, line)
    ]
    if audit.field_problems:  # nothing below can be computed from such numbers
        return audit
    audit.ledger_problems += uncharged_train_releases(entries)
    if anchors is not None:
        names = {audit.bank, name} | {str(e["bank"]) for e in entries if "bank" in e}
        mine = [a for a in anchors if a.bank in names]
        audit.anchors_checked = len(mine)
        audit.anchor_problems += anchor_mismatches(entries, mine)
    if not entries:
        return audit
    audit.train_releases = sum(e.get("kind") == "train" for e in entries)
    audit.evaluate_releases = sum(e.get("kind") == "evaluate" for e in entries)
    audit.runs = len({e.get("run_id") for e in entries})
    audit.delta = float(entries[-1].get("delta", 0.0))
    audit.budget = float(entries[-1]["epsilon_budget"]) if "epsilon_budget" in entries[-1] else None
    events_per_entry = [events_of(e) for e in entries]  # checked by entry_field_problems
    all_events = [event for events in events_per_entry for event in events]
    audit.epsilon_recorded = float(entries[-1].get("epsilon_cumulative", 0.0))
    audit.epsilon_pld = dp_accounting_epsilon(all_events, audit.delta, "pld")
    audit.epsilon_rdp = dp_accounting_epsilon(all_events, audit.delta, "rdp")
    audit.distributed_rounds = distributed_rounds(entries)
    if audit.distributed_rounds:
        audit.aggregate_charged_rounds = sum(aggregate_charged(e) for e in entries)
        audit.epsilon_against_aggregate = dp_accounting_epsilon(
            aggregate_view_events(entries), audit.delta, "pld"
        )
        audit.epsilon_against_server = dp_accounting_epsilon(
            server_view_events(entries), audit.delta, "pld"
        )
        audit.problems += _server_view_problems(entries, audit.delta)
    audit.curve = [  # one point per training release: ε only moves when the bank trains
        (i + 1, int(e.get("server_round", 0)), float(e["epsilon_cumulative"]))
        for i, e in enumerate(entries)
        if "epsilon_cumulative" in e and e.get("kind") == "train"
    ]
    for index in _checkpoints(entries):
        prefix = [event for events in events_per_entry[: index + 1] for event in events]
        recorded = float(entries[index].get("epsilon_cumulative", 0.0))
        independent = dp_accounting_epsilon(
            prefix,
            float(entries[index].get("delta", audit.delta)),
            "pld",
            _CHECKPOINT_DISCRETIZATION,
        )
        audit.checked_entries += 1
        if understates(recorded, independent):
            audit.problems.append(
                f"understated ε at line {index + 1}: recorded {recorded:.4f}, "
                f"independent PLD {independent:.4f}"
            )
    return audit


_DP_EVENT_FIELDS = {"noise_multiplier", "sample_rate", "steps", "max_grad_norm"}


def entry_field_problems(entry: dict[str, Any], line: int) -> list[str]:
    """Each number in a ledger entry that no bank writes: NaN, infinite, negative, not a number.

    Checked before any accounting, so a hand-edited or corrupted value is named with its line
    and field instead of ending in a traceback (or, worse, in a number).
    """
    problems: list[str] = []

    def check(where: str, value: Any, valid: Any, wanted: str) -> None:
        if not _is_number(value):
            problems.append(f"line {line}: {where} is {value!r}, not a number ({wanted})")
        elif not math.isfinite(value) or not valid(value):
            problems.append(f"line {line}: {where} is {value!r}; it must be {wanted}")

    optional = {
        "epsilon_cumulative": (lambda v: v >= 0, "a finite ε of 0 or more"),
        "epsilon_budget": (lambda v: v > 0, "a finite, positive ε budget"),
        "delta": (lambda v: 0 < v < 1, "a δ in (0, 1)"),
    }
    for key, (valid, wanted) in optional.items():
        if key in entry:
            check(key, entry[key], valid, wanted)
    if "server_round" in entry:
        check("server_round", entry["server_round"], _whole_non_negative, "a round number")
    events = entry.get("dp_events", [])
    if not isinstance(events, list):
        return [*problems, f"line {line}: dp_events is {events!r}, not a list of DP events"]
    for number, event in enumerate(events, start=1):
        where = f"dp_events[{number}]"
        if not isinstance(event, dict) or set(event) != _DP_EVENT_FIELDS:
            problems.append(
                f"line {line}: {where} is not a DP event (wanted exactly "
                f"{', '.join(sorted(_DP_EVENT_FIELDS))})"
            )
            continue
        check(f"{where}.noise_multiplier", event["noise_multiplier"], lambda v: v > 0, "> 0")
        check(f"{where}.sample_rate", event["sample_rate"], lambda v: 0 < v <= 1, "in (0, 1]")
        check(f"{where}.steps", event["steps"], _plausible_steps, "a whole number, 0 to 10^9")
        check(f"{where}.max_grad_norm", event["max_grad_norm"], lambda v: v > 0, "> 0")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole_non_negative(value: float) -> bool:
    return value >= 0 and float(value).is_integer()


def _plausible_steps(value: float) -> bool:
    return _whole_non_negative(value) and value <= 1e9


def duplicate_ledgers(audits: list[BankAudit]) -> None:
    """Flag the same ledger (a copied state dir) or the same bank found twice in one audit.

    Each bank has one accountant for its whole life: two copies of its ledger would count
    its spending twice, or hide one copy's later releases behind the other's.
    """
    for key, what in (
        (lambda a: a.first_entry_hash, "the same ledger (same first entry) as"),
        (lambda a: a.bank if a.entries else None, "ledger of the same bank name as"),
    ):
        groups: dict[str, list[BankAudit]] = {}
        for audit in audits:
            value = key(audit)
            if value is not None:
                groups.setdefault(value, []).append(audit)
        for group in groups.values():
            for audit in group if len(group) > 1 else []:
                others = ", ".join(a.state_dir for a in group if a is not audit)
                problem = (
                    f"{audit.state_dir}: {what} {others}: one bank's state twice (a copy?); "
                    "audit each bank's state dir once"
                )
                if not audit.duplicate_problems:  # which copy is the bank's own is unknown
                    audit.duplicate_problems.append(problem)


def bank_name_of_dir(state_dir: Path) -> str:
    """A bank's name from where its state lives: `<bank>/state` (a run dir) or `<bank>`.

    Used when the ledger is empty, so anchors still find the bank whose lines were all cut.
    """
    return state_dir.parent.name if state_dir.name == "state" else state_dir.name


def anchor_mismatches(entries: list[dict[str, Any]], anchors: list[LedgerAnchor]) -> list[str]:
    """Each anchored (seq, hash) the ledger no longer holds: truncated, rolled back or rebuilt.

    Line `seq` is entry `seq` in an intact chain (the chain check flags any other order), so
    the anchor is looked up by position. One problem per distinct (seq, hash) anchored.
    """
    problems: list[str] = []
    seen: set[tuple[int, str]] = set()
    for anchor in sorted(anchors, key=lambda a: (a.seq, a.server_round, a.kind)):
        if (anchor.seq, anchor.head) in seen:
            continue
        seen.add((anchor.seq, anchor.head))
        reply = f"round {anchor.server_round} {anchor.kind} reply (node {anchor.node_id})"
        if anchor.seq == 0:
            if anchor.head != GENESIS_HASH:
                problems.append(f"anchor: {reply} names entry 0 with a non-genesis hash")
        elif anchor.seq > len(entries):
            problems.append(
                f"truncated: the server holds entry {anchor.seq} (hash {anchor.head[:12]}…) "
                f"from the {reply}, but the ledger ends at entry {len(entries)}"
            )
        elif str(entries[anchor.seq - 1].get("hash")) != anchor.head:
            found = str(entries[anchor.seq - 1].get("hash"))
            problems.append(
                f"rewritten: entry {anchor.seq} has hash {found[:12]}…, but the {reply} "
                f"anchored {anchor.head[:12]}… (rolled back or rebuilt after it was sent)"
            )
    return problems


def uncharged_train_releases(entries: list[dict[str, Any]]) -> list[str]:
    """Train releases that carry no DP events, neither their own nor an earlier charge's.

    A bank charges a round either in the "train" entry itself or in a "charge" entry
    written before training, which the train entry names by `charge_seq`. One charge
    covers one release: a second train naming it was not charged. Replays ("train-replay")
    resend a charged release and carry none; other kinds are not releases of training.
    """
    problems: list[str] = []
    charges: dict[int, dict[str, Any]] = {}
    covered: dict[int, int] = {}  # charge seq -> line of the train it covers
    for line, entry in enumerate(entries, start=1):
        kind = entry.get("kind")
        seq = entry.get("seq")
        if kind == "charge" and isinstance(seq, int):
            charges[seq] = entry
        if kind != "train":
            continue
        where = f"line {line}: train release of round {entry.get('server_round', '?')}"
        ref = entry.get("charge_seq")
        if ref is None:
            if not _has_dp_events(entry):
                problems.append(f"{where} carries no DP events and names no charge")
            continue
        if not isinstance(ref, int) or isinstance(ref, bool) or ref not in charges:
            if not _has_dp_events(entry):
                problems.append(f"{where} names charge {ref!r}, which is no earlier charge entry")
            continue
        if not _has_dp_events(charges[ref]) and not _has_dp_events(entry):
            problems.append(f"{where} names charge {ref}, which carries no DP events")
        elif ref in covered and not _has_dp_events(entry):
            problems.append(f"{where} names charge {ref}, already used by line {covered[ref]}")
        covered.setdefault(ref, line)
    return problems


def _has_dp_events(entry: dict[str, Any]) -> bool:
    """At least one recorded DP event that took a step: a charge of something."""
    events = entry.get("dp_events")
    if not isinstance(events, list):
        return False
    for event in events:
        steps = event.get("steps") if isinstance(event, dict) else None
        if isinstance(steps, int | float) and not isinstance(steps, bool) and steps > 0:
            return True
    return False


def _server_view_problems(entries: list[dict[str, Any]], delta: float) -> list[str]:
    """The last aggregate-charged round: its recorded ε against the server, recomputed from
    the ledger up to it, neither understated nor above the server budget it states."""
    last = max((i for i, entry in enumerate(entries) if aggregate_charged(entry)), default=None)
    if last is None:
        return []
    facts = entries[last][FACTS]
    independent = dp_accounting_epsilon(
        server_view_events(entries[: last + 1]), delta, "pld", _CHECKPOINT_DISCRETIZATION
    )
    recorded = float(facts.get("epsilon_against_server", 0.0))
    problems = []
    if understates(recorded, independent):
        problems.append(
            f"understated ε against the server at line {last + 1}: recorded {recorded:.4f}, "
            f"independent PLD {independent:.4f}"
        )
    budget = float(facts.get("server_budget", 0.0))
    if understates(budget, independent):
        problems.append(
            f"ε against the server {independent:.4f} at line {last + 1} exceeds the "
            f"distributed-dp-server-budget {budget} the round states"
        )
    return problems


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
        raise ConfigError(f"PATH {path}: no such file or directory")
    if path.is_file():
        if path.name != LEDGER_FILE:
            raise ConfigError(f"PATH {path}: not a {LEDGER_FILE}; give a state or run dir")
        path = path.parent
    if (path / LEDGER_FILE).exists():
        return [path]
    found = sorted(p.parent for p in path.rglob(LEDGER_FILE))
    if not found:
        raise ConfigError(
            f"PATH {path}: no {LEDGER_FILE} here or below; is this a state or run dir?"
        )
    return found


def audit_path(path: Path, anchors: list[LedgerAnchor] | None = None) -> list[BankAudit]:
    """Audit every ledger at or below `path`, against `anchors` when given."""
    audits = [audit_state_dir(state_dir, anchors) for state_dir in find_state_dirs(path)]
    duplicate_ledgers(audits)
    return audits


def unaudited_anchored_banks(audits: list[BankAudit], anchors: list[LedgerAnchor]) -> list[str]:
    """Banks the anchors name but no audited ledger belongs to (not audited, or deleted)."""
    audited = {a.bank for a in audits} | {bank_name_of_dir(Path(a.state_dir)) for a in audits}
    return sorted({a.bank for a in anchors} - audited)
