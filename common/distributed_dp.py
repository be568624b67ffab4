"""Distributed DP: what a bank's noise guarantees when the server only sees a sum of K banks.

A bank that opts in (`distributed-dp`) and trains in a verified secure round writes a
"distributed-dp" ledger entry next to the round's charge. It states the trust assumption
and two guarantees of the same noise:
- against the server, if secure aggregation were broken: the bank's own noise σ_b. This is
  the guarantee fedfin enforces (the budget is charged for σ_b): it needs no trust in
  secure aggregation or in the other banks.
- against whoever receives only the sum of at least K banks, each adding its share σ_b:
  noise σ = √K·σ_b. This holds when the sum is a sum of one Gaussian mechanism per bank
  (one linear DP step per round); fedfin's rounds are several Adam steps with a private
  head, for which only the first figure is proven. The ledger and `fedfin audit` label it so.
Both are recomputed from the ledger alone by `fedfin audit`.
"""

import math
from dataclasses import asdict
from typing import Any

from fedfin.common.accounting import DpEvent, epsilon_spent

DISTRIBUTED_DP = "distributed-dp"  # the ledger kind
TRUST_ASSUMPTION = (
    "honest-but-curious server that runs SecAgg+ as specified; fewer than `threshold` "
    "parties (the server and banks together) collude; at least K honest banks, each adding "
    "its own noise share, in every released sum"
)
AGGREGATE_CAVEAT = (
    "σ·√K on the sum is a proven bound only for one linear DP step per round; fedfin's "
    "multi-step rounds are proven at the enforced (against-server) figure"
)


def sum_event(local: DpEvent, min_banks: int) -> DpEvent:
    """The training event as the sum of `min_banks` banks' noise shares carries it."""
    return DpEvent(
        local.noise_multiplier * math.sqrt(min_banks),
        local.sample_rate,
        local.steps,
        local.max_grad_norm,
    )


def distributed_dp_record(
    local: DpEvent, min_banks: int, threshold: int, banks: int, charge_seq: int
) -> dict[str, Any]:
    """The "distributed-dp" entry's facts (ε figures are added by the caller)."""
    return {
        "charge_seq": charge_seq,
        "distributed_dp": {
            "min_banks": min_banks,
            "threshold": threshold,
            "banks": banks,
            "local_event": asdict(local),
            "sum_event": asdict(sum_event(local, min_banks)),
            "enforced": "against-server",
            "trust_assumption": TRUST_ASSUMPTION,
            "aggregate_caveat": AGGREGATE_CAVEAT,
        },
    }


def aggregate_view_events(entries: list[dict[str, Any]]) -> list[DpEvent]:
    """Every DP event of the ledger, each distributed round's training event replaced by the
    event its sum carries: the history of what a recipient of the sums alone saw."""
    replaced: dict[int, tuple[DpEvent, DpEvent]] = {}
    for entry in entries:
        if entry.get("kind") == DISTRIBUTED_DP:
            facts = entry["distributed_dp"]
            replaced[int(entry["charge_seq"])] = (
                DpEvent(**facts["local_event"]),
                DpEvent(**facts["sum_event"]),
            )
    events: list[DpEvent] = []
    for entry in entries:
        swap = replaced.get(int(entry.get("seq", -1)))
        for raw in entry.get("dp_events", []):
            event = DpEvent(**raw)
            if swap is not None and event == swap[0]:
                event, swap = swap[1], None  # the round's one training event
            events.append(event)
    return events


def epsilon_against_aggregate(
    entries: list[dict[str, Any]], delta: float, accountant: str
) -> float:
    """ε of the whole ledger as seen by a recipient of the (K-bank) sums only."""
    return epsilon_spent(aggregate_view_events(entries), delta, accountant)
