"""Record a release in the bank's ledger, before it is sent.

The entry says what leaves the bank (a SHA-256 per array, every metric value) and what
it cost (the DP events, ε of this release and cumulative ε, under the named accountant).
Training is charged before it starts (a "charge" entry with the round's DP events), and
its release is recorded after (a "train" entry naming the charge), so a crash at any
point leaves at least what ran in the ledger. Each entry carries a random nonce: its hash
goes to the server as an anchor, and must not be a function of guessable values only.
"""

import hashlib
import importlib.metadata
import secrets
from collections.abc import Mapping
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

import numpy as np

from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_state import BankState
from fedfin.common.accounting import SAMPLING_METHOD, DpEvent, epsilon_spent
from fedfin.common.ledger import NEIGHBOURING_RELATION, UNIT_OF_PRIVACY

_VERSIONED = ("fedfin", "opacus", "torch", "flwr", "numpy")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def array_sha256(array: np.ndarray) -> str:
    """Hash of dtype, shape and bytes: what an auditor can recompute from a sent array."""
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def record_release(
    state: BankState,
    settings: BankSettings,
    run_id: int,
    server_round: int,
    kind: str,
    events: list[DpEvent],
    epsilon_cumulative: float,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int],
    federation_id: str = "",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append the release to the ledger (flushed and fsync'ed); return the entry."""
    policy = settings.policy
    return state.ledger.append(
        {
            **(extra or {}),
            "nonce": secrets.token_hex(16),
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "bank": settings.name,
            "run_id": int(run_id),
            "federation_id": federation_id,
            "server_round": int(server_round),
            "kind": kind,
            "unit_of_privacy": UNIT_OF_PRIVACY,
            "neighbouring_relation": NEIGHBOURING_RELATION,
            "sampling_method": SAMPLING_METHOD,
            "dp_events": [asdict(event) for event in events],
            "delta": policy.delta,
            "epsilon_release": epsilon_spent(events, policy.delta, policy.accountant),
            "epsilon_cumulative": epsilon_cumulative,
            "epsilon_budget": policy.epsilon_budget,
            "accountant": policy.accountant,
            "versions": library_versions(),
            "arrays_sha256": {key: array_sha256(value) for key, value in arrays.items()},
            "metrics_sent": {key: float(value) for key, value in metrics.items()},
        }
    )
