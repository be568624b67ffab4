"""One bank's work for one message: train or evaluate, enforce the budget, record, reply.

No Flower types here: the ClientApp (client_app.py) turns messages into these calls and
these results back into messages. That keeps the privacy logic testable on its own.
"""

import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from client.bank_data import load_bank_data
from client.bank_settings import BankSettings
from client.bank_state import BankState
from client.release import record_release
from common.accounting import DpEvent, epsilon_spent, merged_history
from common.errors import DataError, PrivacyBudgetError
from common.metrics import credit_metrics
from common.model import CreditModel, build_model
from common.protocol import EPSILON, NUM_EXAMPLES, RoundInstructions
from common.shared_weights import load_shared_arrays, shared_arrays
from common.tensors import predict_proba

log = logging.getLogger("fedfin.bank")


@dataclass(frozen=True)
class BankReply:
    """What the bank sends: encoder arrays (train only) and policy-allowed numbers."""

    arrays: OrderedDict[str, np.ndarray] = field(default_factory=OrderedDict)
    metrics: dict[str, float | int] = field(default_factory=dict)


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
) -> BankReply:
    """DP fine-tuning of encoder + private head; returns only the encoder and allowed numbers."""
    # Opacus loads here, not at import: every Flower message starts a fresh ClientApp
    # process, and evaluation messages do not need it (see benchmarks/round_latency.md).
    from client.budget import approve_round
    from client.dp_training import train_with_dp

    state = BankState(settings.state_dir)
    policy = settings.policy
    replay = _replay_if_already_released(state, settings, instructions, run_id)
    if replay is not None:
        return replay
    train, _ = load_bank_data(
        settings.data_path, instructions.schema, settings.test_fraction, settings.seed
    )
    if len(train.numeric) < instructions.plan.batch_size:
        raise DataError(
            f"{settings.data_path}: only {len(train.numeric)} training rows, fewer than one "
            f"batch ({instructions.plan.batch_size}); DP-SGD needs many batches per epoch"
        )
    model = bank_model(settings, state, instructions, encoder, source_head)
    approved = approve_round(state, policy, instructions, len(train.numeric), run_id)
    history = train_with_dp(model, train, approved.plan, approved.past, _noise_seed(settings))
    released = _released_events(approved.past, history, approved.plan.max_grad_norm)
    if merged_history(released) != merged_history([approved.plan.event()]):
        raise PrivacyBudgetError(
            f"accountant recorded {released}, not the approved {approved.plan.event()}; "
            "nothing was sent"
        )
    cumulative = epsilon_spent([*approved.past, *released], policy.delta, policy.accountant)
    if cumulative > policy.epsilon_budget:
        raise PrivacyBudgetError(
            f"ε would be {cumulative:.4f} > budget {policy.epsilon_budget}; nothing was sent"
        )
    state.save_head(model, instructions.schema.fingerprint)
    arrays = shared_arrays(model)
    metrics: dict[str, float | int] = {EPSILON: cumulative}
    if policy.release_num_examples:
        metrics[NUM_EXAMPLES] = len(train.numeric)
    if instructions.federation_id:
        state.save_last_release(
            instructions.federation_id, instructions.server_round, dict(arrays), metrics
        )
    record_release(
        state,
        settings,
        run_id,
        instructions.server_round,
        "train",
        released,
        cumulative,
        arrays,
        metrics,
        instructions.federation_id,
    )
    log.info(
        "%s round %d: %d DP steps, σ=%.3f, ε %.4f -> %.4f of %.4f%s",
        settings.name,
        instructions.server_round,
        approved.plan.total_steps,
        approved.plan.noise_multiplier,
        approved.epsilon_before,
        cumulative,
        policy.epsilon_budget,
        " (trimmed to fit the budget)" if approved.trimmed else "",
    )
    return BankReply(arrays=arrays, metrics=metrics)


def _noise_seed(settings: BankSettings) -> int:
    """A secret seed for DP noise and sampling: if the server could guess it, it could
    regenerate the noise and remove it. Only tests and benchmarks fix it (`noise-seed`)."""
    if settings.noise_seed is not None:
        return settings.noise_seed
    return secrets.randbits(63)


def _replay_if_already_released(
    state: BankState, settings: BankSettings, instructions: RoundInstructions, run_id: int
) -> BankReply | None:
    """A restarted server may ask again for a round this bank already released.

    Re-sending the very same arrays costs no privacy (nothing new is computed from the
    data), so the bank replays them and records the replay; it never trains twice for
    one round of one federation. If the release cannot be replayed, the round is declined.
    """
    if not instructions.federation_id:
        return None
    entries = state.ledger.entries()
    done = [
        e
        for e in entries
        if e.get("kind") == "train"
        and e.get("federation_id") == instructions.federation_id
        and e.get("server_round") == instructions.server_round
    ]
    if not done:
        return None
    saved = state.last_release(instructions.federation_id, instructions.server_round)
    if saved is None or saved[1].get(EPSILON) != done[-1]["epsilon_cumulative"]:
        raise PrivacyBudgetError(
            f"round {instructions.server_round} of this federation was already released "
            "and cannot be replayed; not training twice"
        )
    arrays, metrics = saved
    record_release(
        state,
        settings,
        run_id,
        instructions.server_round,
        "train-replay",
        [],
        float(done[-1]["epsilon_cumulative"]),
        arrays,
        metrics,
        instructions.federation_id,
    )
    log.info("%s replayed its round %d release", settings.name, instructions.server_round)
    return BankReply(arrays=OrderedDict(arrays), metrics=dict(metrics))


def evaluate_round(
    settings: BankSettings,
    instructions: RoundInstructions,
    encoder: Mapping[str, np.ndarray],
    run_id: int,
) -> BankReply:
    """Metrics of global encoder + private head on the bank's own test split, if policy allows."""
    state = BankState(settings.state_dir)
    policy = settings.policy
    _, test = load_bank_data(
        settings.data_path, instructions.schema, settings.test_fraction, settings.seed
    )
    if not state.has_head():
        raise PrivacyBudgetError(
            "no private head yet: this bank has not trained in this federation"
        )
    model = bank_model(settings, state, instructions, encoder, None)
    entries = state.ledger.entries()  # verifies the chain
    spent = float(entries[-1]["epsilon_cumulative"]) if entries else 0.0
    metrics: dict[str, float | int] = {EPSILON: spent}
    if policy.release_eval_metrics:
        scores = credit_metrics(test.label, predict_proba(model, test))  # type: ignore[arg-type]
        metrics.update({k: v for k, v in scores.items() if math.isfinite(v)})  # AUC needs 2 classes
    if policy.release_num_examples:
        metrics[NUM_EXAMPLES] = len(test.numeric)
    record_release(
        state,
        settings,
        run_id,
        instructions.server_round,
        "evaluate",
        [],
        spent,
        {},
        metrics,
        instructions.federation_id,
    )
    return BankReply(metrics=metrics)


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
