"""Per-round results across banks: the largest ε, declines, ledger anchors, DP metrics.

ε is aggregated as a maximum, never averaged: a federation is as private as its least
private bank.

Every reply's status carries its bank's ledger head (sequence number and hash). The server
appends each one to `ledger-anchors.jsonl` as it arrives: a record of each bank's ledger
kept outside the bank, against which `fedfin audit --anchors` detects a ledger that was
later truncated, rolled back or rebuilt.

Exact evaluation metrics stay in each bank's local report. The AUC figures here come only
from DP-noised metrics a bank opted to release with its train reply; they describe the
encoder the bank received for that round's training, i.e. the previous round's global.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedfin.common.ledger_anchors import LedgerAnchor, append_anchors
from fedfin.common.protocol import (
    ARRAYS,
    BANK_KEY,
    DP_EVAL_METRICS,
    EPSILON,
    LEDGER_HEAD,
    LEDGER_SEQ,
    METRICS,
    NUM_EXAMPLES,
    STATUS,
    STATUS_KEY,
    STATUS_OK,
)

DP_AUC, DP_TEST_ROWS = "dp-auc", "dp-test-rows"


@dataclass
class BankRound:
    """One bank's replies in one round, as the server saw them."""

    bank: str
    node_id: int
    trained: bool = False
    train_status: str = "no reply"
    epsilon: float | None = None
    num_examples: int | None = None  # a DP-noised count, if the bank releases one
    dp_metrics: dict[str, float] = field(default_factory=dict)  # of the previous global
    ledger_seq: int | None = None  # the bank's ledger head after its last reply this round
    ledger_head: str | None = None


@dataclass
class RoundSummary:
    server_round: int
    banks: dict[int, BankRound]
    aggregated: bool
    seconds: float = 0.0
    federation_id: str = ""
    anchor_file: Path | None = None  # where each reply's ledger anchor is appended
    secure_aggregation: dict[str, Any] | None = None  # threshold, contributors, failure

    def as_dict(self) -> dict[str, Any]:
        aucs: list[tuple[float, float | None]] = [
            (b.dp_metrics[DP_AUC], b.dp_metrics.get(DP_TEST_ROWS))
            for b in self.banks.values()
            if DP_AUC in b.dp_metrics
        ]
        epsilons = [b.epsilon for b in self.banks.values() if b.epsilon is not None]
        weighted = None
        counts = [max(1.0, n) for _, n in aucs if n is not None]
        if aucs and len(counts) == len(aucs):
            weighted = sum(a * n for (a, _), n in zip(aucs, counts, strict=True)) / sum(counts)
        worst = min(aucs, default=None, key=lambda pair: pair[0])
        return {
            "round": self.server_round,
            "federation_id": self.federation_id,
            "aggregated": self.aggregated,
            "banks_trained": sum(b.trained for b in self.banks.values()),
            "banks_declined": sorted(
                f"{b.bank}: {b.train_status}" for b in self.banks.values() if not b.trained
            ),
            # DP-noised, opt-in, and of the encoder the banks trained from: round - 1's global.
            "dp_auc_of_round": self.server_round - 1,
            "dp_auc_banks": len(aucs),
            "dp_mean_auc": sum(a for a, _ in aucs) / len(aucs) if aucs else None,
            "dp_weighted_mean_auc": weighted,
            "dp_worst_bank_auc": worst[0] if worst else None,
            "max_epsilon": max(epsilons) if epsilons else None,
            "seconds": round(self.seconds, 2),
            **({"secure_aggregation": self.secure_aggregation} if self.secure_aggregation else {}),
            "per_bank": {
                b.bank: {
                    "trained": b.trained,
                    "status": b.train_status,
                    "epsilon": b.epsilon,
                    "ledger_seq": b.ledger_seq,
                    "ledger_head": b.ledger_head,
                    **({NUM_EXAMPLES: b.num_examples} if b.num_examples is not None else {}),
                    **{k: v for k, v in b.dp_metrics.items() if math.isfinite(v)},
                }
                for b in sorted(self.banks.values(), key=lambda b: b.bank)
            },
        }


def status_of(message: Message) -> tuple[str, str, str]:
    """(status, bank name, reason) of a reply; Flower-level errors count as declined."""
    if message.has_error():
        return "error", f"node-{message.metadata.src_node_id}", str(message.error.reason)
    content = message.content
    if STATUS not in content.config_records:
        return "malformed", f"node-{message.metadata.src_node_id}", "reply has no status"
    status = content.config_records[STATUS]
    bank = str(status.get(BANK_KEY, f"node-{message.metadata.src_node_id}"))
    return str(status.get(STATUS_KEY)), bank, str(status.get("reason", ""))


def ledger_anchor(message: Message, kind: str, server_round: int) -> LedgerAnchor | None:
    """The reply's claim about its bank's ledger, or None when it carries none.

    An error reply, an old bank or a malformed status anchors nothing: the server keeps
    going and records only what a reply actually said.
    """
    if message.has_error() or STATUS not in message.content.config_records:
        return None
    status = message.content.config_records[STATUS]
    seq, head = status.get(LEDGER_SEQ), status.get(LEDGER_HEAD)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(head, str):
        return None
    node = message.metadata.src_node_id
    bank = str(status.get(BANK_KEY, f"node-{node}"))
    return LedgerAnchor(bank, node, kind, server_round, seq, head)


def _note_anchor(summary: RoundSummary, row: BankRound, message: Message, kind: str) -> None:
    anchor = ledger_anchor(message, kind, summary.server_round)
    if anchor is None:
        return
    row.ledger_seq, row.ledger_head = anchor.seq, anchor.head
    if summary.anchor_file is not None:
        append_anchors(summary.anchor_file, [anchor])


def _row(summary: RoundSummary, message: Message, bank: str) -> BankRound:
    node = message.metadata.src_node_id
    row = summary.banks.setdefault(node, BankRound(bank=bank, node_id=node))
    row.bank = bank
    return row


def note_train_reply(summary: RoundSummary, message: Message, secure: bool = False) -> bool:
    """Record a train reply; True when it carries an accepted encoder update.

    `secure`: a secure round's collect reply, whose masked vector the server has already
    added to the sum; an ok status then means the bank contributed.
    """
    status, bank, reason = status_of(message)
    row = _row(summary, message, bank)
    if message.has_error():  # no content to read: Flower raises on `message.content`
        row.trained, row.train_status = False, f"{status}: {reason}".strip(": ")
        return False
    _note_anchor(summary, row, message, "train")
    accepted = status == STATUS_OK and (secure or ARRAYS in message.content.array_records)
    row.trained = accepted
    row.train_status = "ok" if accepted else f"{status}: {reason}".strip(": ")
    if METRICS in message.content.metric_records:
        metrics = message.content.metric_records[METRICS]
        if isinstance(metrics.get(EPSILON), int | float):
            row.epsilon = float(metrics[EPSILON])  # type: ignore[arg-type]
        if isinstance(metrics.get(NUM_EXAMPLES), int | float):
            row.num_examples = int(metrics[NUM_EXAMPLES])  # type: ignore[arg-type]
        for key in DP_EVAL_METRICS:
            if isinstance(metrics.get(key), int | float):
                row.dp_metrics[key] = float(metrics[key])  # type: ignore[arg-type]
    return accepted


def note_evaluate_reply(summary: RoundSummary, message: Message) -> None:
    """Record an evaluate reply: ε and the ledger anchor (its metrics stay in the bank)."""
    status, bank, _ = status_of(message)
    row = _row(summary, message, bank)
    if message.has_error():
        return
    _note_anchor(summary, row, message, "evaluate")
    if status == STATUS_OK and METRICS in message.content.metric_records:
        value = message.content.metric_records[METRICS].get(EPSILON)
        if isinstance(value, int | float):
            row.epsilon = float(value)


def note_missing_replies(
    summary: RoundSummary, sent: list[Message], replies: list[Message], names: dict[str, str]
) -> None:
    """Banks that were asked but did not answer before the round timeout."""
    answered = {m.metadata.src_node_id for m in replies}
    for message in sent:
        node = message.metadata.dst_node_id
        if node not in answered:
            bank = names.get(str(node), f"node-{node}")
            summary.banks[node] = BankRound(
                bank=bank, node_id=node, train_status="no reply before the round timeout"
            )
