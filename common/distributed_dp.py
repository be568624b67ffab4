"""Distributed DP: what a bank's noise guarantees when the server only sees a sum of K banks.

A bank that opts in (`distributed-dp`) and trains in a verified secure round records two
guarantees of its round, against two recipients:
- the server, if secure aggregation were broken: the bank's own noise σ_b ("local event");
- whoever receives only the sum of at least K banks, each adding its own share: noise
  σ = √K·σ_b on the sum ("sum event").

Which one the budget is charged for (`distributed-dp-accounting`):
- "conservative" (any mode): the bank adds its full noise and is charged for σ_b. The sum
  figure is a statement only: for multi-step rounds (several Adam steps, a private head
  trained with the same noise) the K shares do not add up to one Gaussian of σ.
- "aggregate" (`fedsgd` rounds only): the bank's release is −(lr/B)·(clipped sum + noise
  share), linear in one noisy sum, so the mean of n ≥ K such releases is one subsampled
  Gaussian of at least σ on each bank's records. The bank adds σ/√K, is charged for σ, and
  the against-server figure is bounded by its own `distributed-dp-server-budget`.

The facts live in the round's charge entry itself, written (fsync'ed) before any training,
so a crash cannot leave a charge whose noise share is unrecorded. The entry also states
both cumulative ε figures; `fedfin audit` recomputes them from the ledger alone.
"""

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from typing import Any, Literal

from fedfin.common.accounting import DpEvent, epsilon_spent

DISTRIBUTED_DP = "distributed-dp"  # the ledger kind of the round's statement
FACTS = "distributed_dp"  # the key of the facts, in that entry or (aggregate) in the charge
AGAINST_SERVER = "against-server"  # enforced: the bank's own noise
AGGREGATE = "aggregate"  # enforced: the noise of a K-bank sum
View = Literal["server", "aggregate"]
TRUST_ASSUMPTION = (
    "honest-but-curious server that runs SecAgg+ as specified; fewer than `threshold` "
    "parties (the server and banks together) collude; at least K honest banks, each adding "
    "its own noise share, in every released sum"
)
CAVEATS = {
    AGAINST_SERVER: "σ·√K on the sum is a proven bound only for one linear DP step per round "
    "(mode fedsgd); this round's figure against the server is the enforced one",
    AGGREGATE: "mode fedsgd: the release is linear in one noisy clipped-gradient sum, so a "
    "sum of K banks carries σ·√K; if secure aggregation is broken, or fewer than K banks "
    "add their share, only the against-server figure holds",
}


def sum_event(local: DpEvent, min_banks: int) -> DpEvent:
    """The training event as the sum of `min_banks` banks' noise shares carries it."""
    return DpEvent(
        local.noise_multiplier * math.sqrt(min_banks),
        local.sample_rate,
        local.steps,
        local.max_grad_norm,
    )


def share_event(charged: DpEvent, min_banks: int) -> DpEvent:
    """The bank's own noise share of an aggregate-charged event (the inverse of sum_event)."""
    return DpEvent(
        charged.noise_multiplier / math.sqrt(min_banks),
        charged.sample_rate,
        charged.steps,
        charged.max_grad_norm,
    )


def distributed_dp_facts(
    local: DpEvent,
    summed: DpEvent,
    min_banks: int,
    threshold: int,
    banks: int,
    enforced: str,
) -> dict[str, Any]:
    """The round's facts: K, the setup, both events, what the budget is charged for, why."""
    return {
        "min_banks": min_banks,
        "threshold": threshold,
        "banks": banks,
        "local_event": asdict(local),
        "sum_event": asdict(summed),
        "enforced": enforced,
        "trust_assumption": TRUST_ASSUMPTION,
        "caveat": CAVEATS[enforced],
    }


PENDING_SEQ = -2  # the charge being written, before the ledger gives it a number


def with_epsilons(
    facts: dict[str, Any],
    entries: list[dict[str, Any]],
    charged: list[DpEvent],
    delta: float,
    accountant: str,
) -> dict[str, Any]:
    """`facts` plus both cumulative ε figures, counting the charge about to be written."""
    pending = {
        "seq": PENDING_SEQ,
        "kind": "charge",
        "dp_events": [asdict(event) for event in charged],
        FACTS: facts,
    }
    history = [*entries, pending]
    return {
        **facts,
        "epsilon_against_server": epsilon_against_server(history, delta, accountant),
        "epsilon_against_aggregate": epsilon_against_aggregate(history, delta, accountant),
    }


def aggregate_charged(entry: Mapping[str, Any]) -> bool:
    """A charge whose budget holds the K-bank sum's noise (the bank added a share)."""
    facts = entry.get(FACTS)
    return (
        entry.get("kind") != DISTRIBUTED_DP
        and isinstance(facts, Mapping)
        and facts.get("enforced") == AGGREGATE
    )


def distributed_rounds(entries: Iterable[Mapping[str, Any]]) -> int:
    """How many rounds of this ledger carry distributed-DP facts."""
    return sum(isinstance(e.get(FACTS), Mapping) for e in entries)


def _swaps(entries: Iterable[Mapping[str, Any]], view: View) -> dict[int, tuple[DpEvent, DpEvent]]:
    """charge seq -> (the event the charge holds, the event `view`'s recipient sees)."""
    swaps: dict[int, tuple[DpEvent, DpEvent]] = {}
    for entry in entries:
        facts = entry.get(FACTS)
        if not isinstance(facts, Mapping):
            continue
        # facts sit in the charge itself; a ledger of an earlier release kept them in a
        # separate "distributed-dp" entry that names its charge
        seq = int(entry["charge_seq"] if entry.get("kind") == DISTRIBUTED_DP else entry["seq"])
        local, summed = DpEvent(**facts["local_event"]), DpEvent(**facts["sum_event"])
        if facts.get("enforced") == AGGREGATE and view == "server":
            swaps[seq] = (summed, local)
        elif facts.get("enforced", AGAINST_SERVER) == AGAINST_SERVER and view == "aggregate":
            swaps[seq] = (local, summed)
    return swaps


def view_events(entries: list[dict[str, Any]], view: View) -> list[DpEvent]:
    """Every DP event of the ledger as `view`'s recipient saw it: each distributed round's
    training event replaced by the one that recipient's guarantee rests on."""
    swaps = _swaps(entries, view)
    events: list[DpEvent] = []
    for entry in entries:
        swap = swaps.get(int(entry.get("seq", -1)))
        for raw in entry.get("dp_events", []):
            event = DpEvent(**raw)
            if swap is not None and event == swap[0]:
                event, swap = swap[1], None  # the round's one training event
            events.append(event)
    return events


def aggregate_view_events(entries: list[dict[str, Any]]) -> list[DpEvent]:
    """The history a recipient of the (K-bank) sums alone saw."""
    return view_events(entries, "aggregate")


def server_view_events(entries: list[dict[str, Any]]) -> list[DpEvent]:
    """The history a server that broke secure aggregation saw (each bank's own noise)."""
    return view_events(entries, "server")


def epsilon_against_aggregate(
    entries: list[dict[str, Any]], delta: float, accountant: str
) -> float:
    """ε of the whole ledger as seen by a recipient of the (K-bank) sums only."""
    return epsilon_spent(aggregate_view_events(entries), delta, accountant)


def epsilon_against_server(entries: list[dict[str, Any]], delta: float, accountant: str) -> float:
    """ε of the whole ledger as seen by a server that broke secure aggregation."""
    return epsilon_spent(server_view_events(entries), delta, accountant)
