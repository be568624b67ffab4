"""Budget enforcement: decide, before any training, how much DP training a round may do.

The noise multiplier is calibrated (with the tight PRV accountant) so that the run's
remaining planned rounds fit what is left of the budget, never below the policy's floor.
Then the round's steps are trimmed to what still fits; if nothing fits, the round is
declined. Whatever the server asks, cumulative ε never passes `epsilon-budget`.

Mode `fedsgd` is one encoder step a round. With `noise_share_banks` = K (distributed DP,
"aggregate" accounting, a verified secure round: the caller checks all three), σ is
calibrated for the K-bank sum and charged as such, the bank adds σ/√K, never below its
noise floor, and the ε its own share gives a server that broke secure aggregation must fit
`distributed-dp-server-budget`.

Nothing here depends on the bank's row count: the sample rate is the policy's, steps are
epochs / q, and the server's epochs and horizon are clamped to the policy's bounds. So σ,
ε and whether a round is approved are functions of public facts only.
"""

import math
from dataclasses import dataclass

from fedfin.client.bank_state import BankState, NoisePlan
from fedfin.client.dp_training import DpStepPlan
from fedfin.common.accounting import (
    DpEvent,
    calibrate_noise_multiplier,
    epsilon_spent,
    max_steps_within_budget,
)
from fedfin.common.config import PrivacyPolicy
from fedfin.common.distributed_dp import share_event
from fedfin.common.errors import PrivacyBudgetError
from fedfin.common.protocol import RoundInstructions


class BudgetSpentError(PrivacyBudgetError):
    """No more DP work fits the budget: a public fact (every ε sent adds up to it)."""


@dataclass(frozen=True)
class ApprovedRound:
    """The plan (with the noise the bank adds) and the event its budget is charged for."""

    plan: DpStepPlan
    past: list[DpEvent]
    epsilon_before: float
    epsilon_after: float
    trimmed: bool
    charged: DpEvent
    noise_share_banks: int | None = None  # K when the bank adds a share σ/√K
    epsilon_against_server: float | None = None  # with the share: ε if secagg were broken


def approve_round(
    state: BankState,
    policy: PrivacyPolicy,
    instructions: RoundInstructions,
    run_id: int,
    past: list[DpEvent],
    noise_share_banks: int | None = None,
    server_past: list[DpEvent] | None = None,
) -> ApprovedRound:
    """The DP plan for this round, or `BudgetSpentError` when no step fits the budget.

    `past` is every event already charged plus this round's other releases. Call it
    inside `PrivacyLedger.reserved()` and record the charge before releasing the lock.
    `noise_share_banks` (K) and `server_past` (the same history as a server that broke
    secure aggregation saw it, common/distributed_dp.py) only for an aggregate-charged round.
    """
    if noise_share_banks is not None and instructions.plan.mode != "fedsgd":
        raise PrivacyBudgetError("a noise share is only sound in mode fedsgd (one linear step)")
    if noise_share_banks is not None and server_past is None:
        raise PrivacyBudgetError("a noise share needs the history as the server saw it")
    spent = epsilon_spent(past, policy.delta, policy.accountant)
    if spent >= policy.epsilon_budget:
        raise BudgetSpentError(
            f"budget spent: ε={spent:.4f} of {policy.epsilon_budget} (δ={policy.delta})"
        )
    request = instructions.plan
    q = policy.sample_rate
    local_epochs = min(request.local_epochs, policy.max_local_epochs)
    head_epochs = min(request.head_epochs, policy.max_local_epochs)
    encoder_steps = max(1, math.ceil(local_epochs / q - 1e-9)) if request.mode != "fedsgd" else 1
    head_steps = math.ceil(head_epochs / q - 1e-9) if request.mode == "fedrep" else 0
    per_round = encoder_steps + head_steps
    remaining_rounds = planned_rounds(policy, instructions)
    shares = noise_share_banks or 1
    floor = policy.min_noise_multiplier * math.sqrt(shares)  # the share keeps the floor

    sigma = _noise_multiplier(state, policy, past, run_id, q, per_round, remaining_rounds, floor)
    if sigma is None:
        raise BudgetSpentError(
            f"budget nearly spent: ε={spent:.4f} of {policy.epsilon_budget}; "
            f"not one round fits at the largest useful noise ({policy.max_noise_multiplier})"
        )
    requested = DpEvent(sigma, q, per_round, policy.max_grad_norm)
    allowed = max_steps_within_budget(
        past, requested, policy.delta, policy.epsilon_budget, policy.accountant
    )
    if allowed == 0:
        raise BudgetSpentError(
            f"budget nearly spent: ε={spent:.4f} of {policy.epsilon_budget}; no step fits"
        )
    if allowed < per_round:  # keep fedrep's head/encoder proportion
        head_steps = head_steps * allowed // per_round
        encoder_steps = allowed - head_steps
    charged = DpEvent(sigma, q, head_steps + encoder_steps, policy.max_grad_norm)
    against_server = None
    if noise_share_banks is not None:
        own = share_event(charged, noise_share_banks)
        assert server_past is not None
        against_server = epsilon_spent([*server_past, own], policy.delta, policy.accountant)
        if against_server > policy.distributed_dp_server_budget:
            raise BudgetSpentError(
                f"distributed DP: this round's noise share would bring ε against a server "
                f"that broke secure aggregation to {against_server:.4f}, above "
                f"distributed-dp-server-budget {policy.distributed_dp_server_budget}"
            )
    plan = DpStepPlan(
        mode=request.mode,
        noise_multiplier=sigma / math.sqrt(shares),
        max_grad_norm=policy.max_grad_norm,
        batch_size=request.batch_size,
        sample_rate=q,
        learning_rate=request.learning_rate,
        head_steps=head_steps,
        steps=encoder_steps,
        proximal_mu=instructions.proximal_mu if request.mode != "fedsgd" else 0.0,
    )
    after = epsilon_spent([*past, charged], policy.delta, policy.accountant)
    return ApprovedRound(
        plan,
        past,
        spent,
        after,
        trimmed=allowed < per_round,
        charged=charged,
        noise_share_banks=noise_share_banks,
        epsilon_against_server=against_server,
    )


def planned_rounds(policy: PrivacyPolicy, instructions: RoundInstructions) -> int:
    """The horizon the noise is calibrated for: the server's remaining rounds, within the
    bank's bounds (a server that announces one round cannot buy low noise with it)."""
    remaining = instructions.num_rounds - instructions.server_round + 1
    return min(max(remaining, policy.min_planned_rounds), policy.max_planned_rounds)


def _noise_multiplier(
    state: BankState,
    policy: PrivacyPolicy,
    past: list[DpEvent],
    run_id: int,
    sample_rate: float,
    steps_per_round: int,
    remaining_rounds: int,
    floor: float,
) -> float | None:
    cached = state.noise_plan()
    if (
        cached is not None
        and cached.run_id == run_id
        and cached.sample_rate == sample_rate
        and cached.steps_per_round == steps_per_round
        and cached.noise_multiplier >= floor
    ):
        return cached.noise_multiplier
    sigma = calibrate_noise_multiplier(
        past,
        sample_rate,
        steps_per_round,
        remaining_rounds,
        policy.delta,
        policy.epsilon_budget,
        floor,
        policy.max_grad_norm,
        max_noise_multiplier=policy.max_noise_multiplier,
        accountant=policy.accountant,
    )
    if sigma is not None:
        state.save_noise_plan(
            NoisePlan(run_id, sample_rate, steps_per_round, remaining_rounds, sigma)
        )
    return sigma
