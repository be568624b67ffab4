"""One bank's work for one message: train or evaluate, enforce the budget, record, reply.

No Flower types here: the ClientApp (client_app.py) turns messages into these calls and
these results back into messages. That keeps the privacy logic testable on its own.

A train round, in the order that keeps the privacy promise through any crash:
1. under the ledger's exclusive lock: approve the round against everything charged so far
   and append a "charge" entry (fsync'ed) with its DP events, before any computation;
2. (opt-in) DP metrics of the received encoder and a DP count; then DP-SGD;
3. keep the release locally (for a replay), update the private head;
4. append the "train" entry (what is sent, hashes), then reply with its seq and hash.
A crash after 1 leaves the round charged; nothing changes the head before 1.
"""

import hashlib
import logging
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedfin.client.bank_data import load_bank_data
from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_state import BankState
from fedfin.client.dp_releases import (
    mechanism_event,
    metrics_from_histograms,
    noisy_count,
    noisy_score_histograms,
)
from fedfin.client.release import array_sha256, record_release
from fedfin.common.accounting import DpEvent, epsilon_spent, merged_history
from fedfin.common.config import PrivacyPolicy
from fedfin.common.distributed_dp import (
    AGAINST_SERVER,
    AGGREGATE,
    FACTS,
    distributed_dp_facts,
    server_view_events,
    sum_event,
    with_epsilons,
)
from fedfin.common.errors import DataError, PrivacyBudgetError
from fedfin.common.metrics import credit_metrics
from fedfin.common.model import CreditModel, build_model
from fedfin.common.protocol import EPSILON, NUM_EXAMPLES, RoundInstructions
from fedfin.common.secure_aggregation import SecureRound
from fedfin.common.shared_weights import load_shared_arrays, shared_arrays
from fedfin.common.tensors import predict_proba

if TYPE_CHECKING:  # Opacus is imported only when a bank trains
    from fedfin.client.budget import ApprovedRound
    from fedfin.client.dp_training import CanaryGradients, StepObserver

log = logging.getLogger("fedfin.bank")
CHARGE = "charge"
TRAIN = "train"
REPLAY = "train-replay"
EVALUATE = "evaluate"
DECLINED = "declined"


@dataclass(frozen=True)
class BankReply:
    """What the bank sends: encoder arrays (train only), allowed numbers, the ledger anchor."""

    arrays: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    metrics: dict[str, float | int] = field(default_factory=dict)
    ledger_seq: int = 0
    ledger_head: str = ""


def bank_model(
    settings: BankSettings,
    state: BankState,
    instructions: RoundInstructions,
    encoder: Mapping[str, np.ndarray],
    source_head: Mapping[str, np.ndarray] | None,
) -> CreditModel:
    """Received encoder + this bank's private head (or, on first contact, the public head)."""
    model = build_model(instructions.schema, instructions.model_config, seed=settings.seed)
    load_shared_arrays(model, encoder)
    if state.has_head():
        state.load_head(model, instructions.schema.fingerprint)
    elif source_head is not None:
        _load_public_head(model, source_head)
    return model


def _load_public_head(model: CreditModel, source_head: Mapping[str, np.ndarray]) -> None:
    """Start a new private head from the public source head, if it fits; else keep the fresh one."""
    expected = model.head.state_dict()
    if set(source_head) != set(expected) or any(
        tuple(source_head[k].shape) != tuple(v.shape) or not np.isfinite(source_head[k]).all()
        for k, v in expected.items()
    ):
        log.warning("ignoring a source head that does not fit this model")
        return
    model.head.load_state_dict(
        {
            k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy())
            for k, v in source_head.items()
        }
    )


def train_round(
    settings: BankSettings,
    instructions: RoundInstructions,
    encoder: Mapping[str, np.ndarray],
    source_head: Mapping[str, np.ndarray] | None,
    run_id: int,
    observe_step: "StepObserver | None" = None,
    canary_gradients: "CanaryGradients | None" = None,
    secure_round: SecureRound | None = None,
) -> BankReply:
    """DP fine-tuning of encoder + private head; returns only the encoder and allowed numbers.

    `observe_step` (tests, `fedfin audit --empirical`) sees the gradients each DP step applies;
    `canary_gradients` (`fedfin audit --empirical` only) adds the audit's canaries to each step.
    `secure_round`: set by the SecAgg+ mod when this update will only be seen summed.
    """
    # Opacus loads here, not at import: evaluation messages do not need it.
    from fedfin.client.budget import approve_round
    from fedfin.client.dp_training import train_with_dp

    state = BankState(settings.state_dir)
    policy = settings.policy
    replay = _replay_if_already_released(
        state, settings, instructions, run_id, secure=secure_round is not None
    )
    if replay is not None:
        return replay
    train, test = load_bank_data(  # without the validation rows: they choose the served model
        settings.data_path,
        instructions.schema,
        settings.test_fraction,
        state.split_key(),
        settings.validation_fraction,
    )
    model = bank_model(settings, state, instructions, encoder, source_head)
    share_banks = _noise_share_banks(settings, instructions, secure_round)
    with state.ledger.reserved():  # approval and charge: one exclusive step per state dir
        entries = state.ledger.entries()
        charged = state.ledger.dp_events()
        extras = _optional_releases(settings, state, charged)
        approved = approve_round(
            state,
            policy,
            instructions,
            run_id,
            [*charged, *extras.values()],
            noise_share_banks=share_banks,
            server_past=[*server_view_events(entries), *extras.values()] if share_banks else None,
        )
        events = [*extras.values(), approved.charged]
        facts = (
            _distributed_facts(policy, approved, secure_round, entries, events)
            if secure_round is not None and policy.distributed_dp
            else None
        )
        charge = record_release(
            state,
            settings,
            run_id,
            instructions.server_round,
            CHARGE,
            events,
            approved.epsilon_after,
            {},
            {},
            instructions.federation_id,
            extra={
                "received_sha256": encoder_sha256(encoder),
                **({FACTS: facts} if facts is not None else {}),
            },
        )
    generator = _round_generator(settings, instructions, run_id, int(charge["seq"]))
    metrics: dict[str, float | int] = {EPSILON: approved.epsilon_after}
    if "eval" in extras:  # the received encoder with this bank's head, before training
        probabilities = predict_proba(model, test)
        assert test.label is not None
        metrics.update(
            metrics_from_histograms(
                *noisy_score_histograms(
                    test.label, probabilities, policy.eval_noise_multiplier, generator
                )
            )
        )
    history = train_with_dp(
        model,
        train,
        approved.plan,
        approved.past,
        generator,
        observe_step=observe_step,
        canary_gradients=canary_gradients,
    )
    released = _released_events(approved.past, history, approved.plan.max_grad_norm)
    if merged_history(released) != merged_history([approved.plan.event()]):
        raise PrivacyBudgetError(
            f"accountant recorded {released}, not the approved {approved.plan.event()}; "
            "nothing was sent (the round stays charged)"
        )
    if "count" in extras:
        metrics[NUM_EXAMPLES] = noisy_count(
            len(train.numeric), policy.count_noise_multiplier, generator
        )
    arrays = shared_arrays(model)
    if instructions.federation_id:
        state.save_last_release(
            instructions.federation_id, instructions.server_round, dict(arrays), metrics
        )
    state.save_head(model, instructions.schema.fingerprint)
    entry = _record_train(state, settings, instructions, run_id, arrays, metrics, charge)
    log.info(
        "%s round %d: %d DP steps, σ=%.3f%s, ε %.4f -> %.4f of %.4f%s",
        settings.name,
        instructions.server_round,
        approved.plan.total_steps,
        approved.plan.noise_multiplier,
        (
            f" (a share of σ={approved.charged.noise_multiplier:.3f} over "
            f"{approved.noise_share_banks} banks; ε against the server "
            f"{approved.epsilon_against_server:.4f})"
            if approved.noise_share_banks
            else ""
        ),
        approved.epsilon_before,
        approved.epsilon_after,
        policy.epsilon_budget,
        " (trimmed to fit the budget)" if approved.trimmed else "",
    )
    return BankReply(arrays, metrics, int(entry["seq"]), str(entry["hash"]))


def encoder_sha256(encoder: Mapping[str, np.ndarray]) -> str:
    """One hash of a whole encoder (names, dtypes, shapes, bytes), for the ledger."""
    digest = hashlib.sha256()
    for key in sorted(encoder):
        digest.update(key.encode())
        digest.update(array_sha256(np.asarray(encoder[key])).encode())
    return digest.hexdigest()


def _optional_releases(
    settings: BankSettings, state: BankState, charged: list[DpEvent]
) -> dict[str, DpEvent]:
    """The opt-in DP releases of this round that still fit the budget (training comes after).

    Evaluation needs a head (the bank's model of the received encoder); a release that
    does not fit is simply not made.
    """
    policy = settings.policy
    wanted: dict[str, DpEvent] = {}
    if policy.release_eval_metrics and state.has_head():
        wanted["eval"] = mechanism_event(policy.eval_noise_multiplier)
    if policy.release_num_examples:
        wanted["count"] = mechanism_event(policy.count_noise_multiplier)
    chosen: dict[str, DpEvent] = {}
    for name, event in wanted.items():
        trial = [*charged, *chosen.values(), event]
        if epsilon_spent(trial, policy.delta, policy.accountant) < policy.epsilon_budget:
            chosen[name] = event
        else:
            log.info("%s: the %s release does not fit the budget; not sent", settings.name, name)
    return chosen


def _noise_share_banks(
    settings: BankSettings, instructions: RoundInstructions, secure_round: SecureRound | None
) -> int | None:
    """K, when this round's noise may be a share σ/√K: only the bank's own opt-in
    ("aggregate" accounting), a secure round its own mod verified, and mode fedsgd."""
    policy = settings.policy
    if secure_round is None or not policy.aggregate_accounting:
        return None
    if instructions.plan.mode != "fedsgd":
        log.info(
            "%s: distributed DP adds a noise share only in mode fedsgd (the server asked "
            "'%s'); this round adds the full noise and is charged for it",
            settings.name,
            instructions.plan.mode,
        )
        return None
    return policy.secagg_min_banks


def _distributed_facts(
    policy: PrivacyPolicy,
    approved: "ApprovedRound",
    secure_round: SecureRound,
    entries: list[dict[str, Any]],
    events: list[DpEvent],
) -> dict[str, Any]:
    """The round's distributed-DP facts for its charge: trust assumption, both guarantees.

    With a noise share the budget is charged for the K-bank sum (`approved.charged`) and the
    bank's own share is the against-server event; otherwise the bank's full noise is both
    what it adds and what it is charged for, and the sum figure is a statement only.
    """
    own = approved.plan.event()
    if approved.noise_share_banks:
        local, summed, enforced = own, approved.charged, AGGREGATE
    else:
        local, summed, enforced = own, sum_event(own, policy.secagg_min_banks), AGAINST_SERVER
    facts = distributed_dp_facts(
        local,
        summed,
        policy.secagg_min_banks,
        secure_round.threshold,
        secure_round.banks,
        enforced,
    )
    if approved.noise_share_banks:
        facts["server_budget"] = policy.distributed_dp_server_budget
    return with_epsilons(facts, entries, events, policy.delta, policy.accountant)


def _record_train(
    state: BankState,
    settings: BankSettings,
    instructions: RoundInstructions,
    run_id: int,
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float | int],
    charge: Mapping[str, Any],
) -> dict[str, Any]:
    """The release entry of a charged round: no DP events of its own (the charge has them)."""
    return record_release(
        state,
        settings,
        run_id,
        instructions.server_round,
        TRAIN,
        [],
        float(charge["epsilon_cumulative"]),
        arrays,
        metrics,
        instructions.federation_id,
        extra={"charge_seq": int(charge["seq"])},
    )


def _round_generator(
    settings: BankSettings, instructions: RoundInstructions, run_id: int, charge_seq: int
) -> torch.Generator:
    """The round's secret generator for sampling and noise: 64 bits from the OS CSPRNG.

    If the server could guess the seed it could regenerate the noise and remove it. Only
    tests and benchmarks fix `noise-seed`; even then each round (each charge) differs.
    """
    if settings.noise_seed is None:
        seed = secrets.randbits(63)
    else:
        material = (
            f"{settings.noise_seed}|{run_id}|{instructions.federation_id}|"
            f"{instructions.server_round}|{charge_seq}"
        )
        seed = int.from_bytes(hashlib.sha256(material.encode()).digest()[:8], "big") >> 1
    return torch.Generator().manual_seed(seed)


def _replay_if_already_released(
    state: BankState,
    settings: BankSettings,
    instructions: RoundInstructions,
    run_id: int,
    secure: bool = False,
) -> BankReply | None:
    """A restarted server may ask again for a round this bank already charged.

    Re-sending the very same arrays costs no privacy (nothing new is computed from the
    data), so the bank replays them and records the replay; it never trains twice for one
    round of one federation. A round charged but never finished is declined: it stays paid.
    Under secure aggregation a round is never replayed: the same update summed with two
    different sets of banks would let the server subtract the sums.
    """
    if not instructions.federation_id:
        return None
    mine = [
        e
        for e in state.ledger.entries()
        if e.get("federation_id") == instructions.federation_id
        and e.get("server_round") == instructions.server_round
    ]
    charges = [e for e in mine if e.get("kind") == CHARGE]
    if not charges:
        return None
    if secure:
        raise PrivacyBudgetError(
            f"round {instructions.server_round} of this federation was already released; "
            "under secure aggregation an update is sent once"
        )
    saved = state.last_release(instructions.federation_id, instructions.server_round)
    sent = [e for e in mine if e.get("kind") == TRAIN]
    if saved is None or saved[1].get(EPSILON) != charges[-1]["epsilon_cumulative"]:
        raise PrivacyBudgetError(
            f"round {instructions.server_round} of this federation was already charged "
            "and cannot be replayed; not training twice"
        )
    arrays, metrics = saved
    if not sent:  # trained and kept, but the release was never recorded: record it now
        entry = _record_train(state, settings, instructions, run_id, arrays, metrics, charges[-1])
    else:
        entry = record_release(
            state,
            settings,
            run_id,
            instructions.server_round,
            REPLAY,
            [],
            float(charges[-1]["epsilon_cumulative"]),
            arrays,
            metrics,
            instructions.federation_id,
        )
    log.info("%s replayed its round %d release", settings.name, instructions.server_round)
    return BankReply(OrderedDict(arrays), dict(metrics), int(entry["seq"]), str(entry["hash"]))


def evaluate_round(
    settings: BankSettings,
    instructions: RoundInstructions,
    encoder: Mapping[str, np.ndarray],
    run_id: int,
) -> BankReply:
    """Exact metrics of the encoder + private head, for the bank's own report only.

    The reply carries ε spent (public) and the ledger anchor: never a metric or count of
    the test split, whatever encoder the server sends and however often it asks.
    """
    state = BankState(settings.state_dir)
    if not state.has_head():
        raise DataError("no private head yet: this bank has not trained in this federation")
    _, test = load_bank_data(
        settings.data_path, instructions.schema, settings.test_fraction, state.split_key()
    )
    model = bank_model(settings, state, instructions, encoder, None)
    assert test.label is not None
    exact = credit_metrics(test.label, predict_proba(model, test))
    state.append_evaluation(
        {
            "run_id": int(run_id),
            "federation_id": instructions.federation_id,
            "server_round": instructions.server_round,
            "encoder_sha256": encoder_sha256(encoder),
            "test_rows": len(test.numeric),
            "metrics": {k: (v if np.isfinite(v) else None) for k, v in exact.items()},
        }
    )
    spent = epsilon_charged(state)
    metrics: dict[str, float | int] = {EPSILON: spent}
    entry = record_release(
        state,
        settings,
        run_id,
        instructions.server_round,
        EVALUATE,
        [],
        spent,
        {},
        metrics,
        instructions.federation_id,
    )
    return BankReply(metrics=metrics, ledger_seq=int(entry["seq"]), ledger_head=str(entry["hash"]))


def epsilon_charged(state: BankState) -> float:
    """Cumulative ε recorded by the ledger's last entry (0 for a new bank)."""
    entries = state.ledger.entries()
    return float(entries[-1]["epsilon_cumulative"]) if entries else 0.0


def record_decline(
    settings: BankSettings, run_id: int, server_round: int, federation_id: str, reason: str
) -> BankReply:
    """Record a declined reply (nothing computed from data is in it) and anchor it.

    Returns ε spent in `metrics` (public). Raises if the ledger cannot be read or written.
    """
    state = BankState(settings.state_dir)
    spent = epsilon_charged(state)
    entry = record_release(
        state,
        settings,
        run_id,
        server_round,
        DECLINED,
        [],
        spent,
        {},
        {},
        federation_id,
        extra={"reason": reason},
    )
    return BankReply(
        metrics={EPSILON: spent}, ledger_seq=int(entry["seq"]), ledger_head=str(entry["hash"])
    )


def _released_events(
    past: list[DpEvent], history: list[tuple[float, float, int]], max_grad_norm: float
) -> list[DpEvent]:
    """The events this round added to the accountant: its history minus the restored past."""
    before: dict[tuple[float, float], int] = {}
    for sigma, q, steps in merged_history(past):
        before[(sigma, q)] = steps
    added: dict[tuple[float, float], int] = {}
    for sigma, q, steps in history:
        added[(sigma, q)] = added.get((sigma, q), 0) + steps
    return [
        DpEvent(sigma, q, steps - before.get((sigma, q), 0), max_grad_norm)
        for (sigma, q), steps in added.items()
        if steps > before.get((sigma, q), 0)
    ]
