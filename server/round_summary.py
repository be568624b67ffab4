"""Per-round results across banks: AUC (weighted, unweighted, worst bank) and the largest ε.

ε is aggregated as a maximum, never averaged: a federation is as private as its least
private bank.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from common.protocol import (
    ARRAYS,
    EPSILON,
    METRICS,
    NUM_EXAMPLES,
    STATUS,
    STATUS_OK,
)


@dataclass
class BankRound:
    """One bank's replies in one round, as the server saw them."""

    bank: str
    node_id: int
    trained: bool = False
    train_status: str = "no reply"
    epsilon: float | None = None
    num_examples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RoundSummary:
    server_round: int
    banks: dict[int, BankRound]
    aggregated: bool
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        aucs: list[tuple[float, float | None]] = [
            (b.metrics["auc"], b.metrics.get(NUM_EXAMPLES))
            for b in self.banks.values()
            if "auc" in b.metrics
        ]
        epsilons = [b.epsilon for b in self.banks.values() if b.epsilon is not None]
        weighted = None
        counts = [n for _, n in aucs if n]
        if aucs and len(counts) == len(aucs):
            weighted = sum(a * (n or 0.0) for a, n in aucs) / sum(counts)
        worst = min(aucs, default=None, key=lambda pair: pair[0])
        return {
            "round": self.server_round,
            "aggregated": self.aggregated,
            "banks_trained": sum(b.trained for b in self.banks.values()),
            "banks_declined": sorted(
                f"{b.bank}: {b.train_status}" for b in self.banks.values() if not b.trained
            ),
            "mean_auc": sum(a for a, _ in aucs) / len(aucs) if aucs else None,
            "weighted_mean_auc": weighted,
            "worst_bank_auc": worst[0] if worst else None,
            "max_epsilon": max(epsilons) if epsilons else None,
            "seconds": round(self.seconds, 2),
            "per_bank": {
                b.bank: {
                    "trained": b.trained,
                    "status": b.train_status,
                    "epsilon": b.epsilon,
                    **{k: v for k, v in b.metrics.items() if math.isfinite(v)},
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
    bank = str(status.get("bank", f"node-{message.metadata.src_node_id}"))
    return str(status.get("status")), bank, str(status.get("reason", ""))


def note_train_reply(summary: RoundSummary, message: Message) -> bool:
    """Record a train reply; True when it carries an accepted encoder update."""
    status, bank, reason = status_of(message)
    node = message.metadata.src_node_id
    row = summary.banks.setdefault(node, BankRound(bank=bank, node_id=node))
    row.bank = bank
    accepted = status == STATUS_OK and ARRAYS in message.content.array_records
    row.trained = accepted
    row.train_status = "ok" if accepted else f"{status}: {reason}".strip(": ")
    if METRICS in message.content.metric_records:
        metrics = message.content.metric_records[METRICS]
        if EPSILON in metrics:
            row.epsilon = float(metrics[EPSILON])  # type: ignore[arg-type]
        if NUM_EXAMPLES in metrics:
            row.num_examples = int(metrics[NUM_EXAMPLES])  # type: ignore[arg-type]
    return accepted


def note_evaluate_reply(summary: RoundSummary, message: Message) -> None:
    status, bank, _ = status_of(message)
    node = message.metadata.src_node_id
    row = summary.banks.setdefault(node, BankRound(bank=bank, node_id=node))
    row.bank = bank
    if status == STATUS_OK and METRICS in message.content.metric_records:
        for key, value in message.content.metric_records[METRICS].items():
            if isinstance(value, int | float):
                row.metrics[key] = float(value)
        if EPSILON in row.metrics:
            row.epsilon = row.metrics.pop(EPSILON)


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
