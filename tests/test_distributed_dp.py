"""Distributed DP's noise share, unit by unit: the budget's approval, the fedsgd step a bank
releases, and the policy keys. Message-level tests (real SecAgg+ rounds) are in
tests/test_secure_aggregation.py."""

import math
from pathlib import Path

import pytest
import torch

from fedfin.client.bank_settings import BankSettings, settings_from_node_config
from fedfin.client.bank_state import BankState
from fedfin.client.bank_worker import _noise_share_banks
from fedfin.client.budget import BudgetSpentError, approve_round
from fedfin.client.dp_training import DpStepPlan, train_with_dp
from fedfin.common.accounting import DpEvent, epsilon_spent
from fedfin.common.checkpoint import EncoderCheckpoint
from fedfin.common.config import PrivacyPolicy, TrainPlanConfig
from fedfin.common.distributed_dp import (
    AGGREGATE,
    FACTS,
    distributed_dp_facts,
    server_view_events,
)
from fedfin.common.errors import ConfigError, PrivacyBudgetError
from fedfin.common.protocol import RoundInstructions
from fedfin.common.secure_aggregation import SecureRound
from tests.conftest import Pretrained

AGGREGATE_POLICY = {
    "epsilon_budget": 1.0,
    "accountant": "rdp",
    "distributed_dp": True,
    "distributed_dp_accounting": "aggregate",
    "distributed_dp_server_budget": 4.0,
    "secagg_min_banks": 4,
}


def _instructions(checkpoint: EncoderCheckpoint, mode: str = "fedsgd") -> RoundInstructions:
    plan = TrainPlanConfig(mode=mode, learning_rate=0.5)  # type: ignore[arg-type]
    return RoundInstructions(1, 20, plan, checkpoint.schema, checkpoint.model_config)


def test_a_noise_share_is_charged_for_the_k_bank_sum_and_keeps_the_floor(
    checkpoint: EncoderCheckpoint, tmp_path: Path
) -> None:
    policy = PrivacyPolicy(**AGGREGATE_POLICY)  # type: ignore[arg-type]
    approved = approve_round(
        BankState(tmp_path), policy, _instructions(checkpoint), 1, [], 4, server_past=[]
    )
    sigma = approved.charged.noise_multiplier
    assert approved.plan.steps == 1 and approved.plan.head_steps == 0
    assert approved.plan.noise_multiplier == pytest.approx(sigma / 2)  # σ/√K, K = 4
    assert approved.plan.noise_multiplier >= policy.min_noise_multiplier
    # ε charged is the sum's; against a server that broke secure aggregation, the share's.
    assert approved.epsilon_after == pytest.approx(epsilon_spent([approved.charged], 1e-5, "rdp"))
    own = epsilon_spent([approved.plan.event()], 1e-5, "rdp")
    assert approved.epsilon_against_server == pytest.approx(own)
    assert approved.epsilon_after < approved.epsilon_against_server <= 4.0
    # Without a share (a plain round of the same bank) it adds the full noise.
    plain = approve_round(BankState(tmp_path / "p"), policy, _instructions(checkpoint), 1, [])
    assert plain.plan.noise_multiplier == plain.charged.noise_multiplier


def test_a_share_that_would_pass_the_server_budget_is_declined(
    checkpoint: EncoderCheckpoint, tmp_path: Path
) -> None:
    policy = PrivacyPolicy(**{**AGGREGATE_POLICY, "distributed_dp_server_budget": 1.0})  # type: ignore[arg-type]
    # Earlier rounds, charged at σ = 4 for the sum (ε 0.39), each bank's share σ = 2 (ε 0.96
    # against the server): the budget has room, the server budget does not.
    charged, server_past = [DpEvent(4.0, 0.05, 60, 1.0)], [DpEvent(2.0, 0.05, 60, 1.0)]
    assert epsilon_spent(charged, 1e-5, "rdp") < 0.5 < 0.9 < epsilon_spent(server_past, 1e-5, "rdp")
    with pytest.raises(BudgetSpentError, match=r"distributed-dp-server-budget 1\.0"):
        approve_round(
            BankState(tmp_path),
            policy,
            _instructions(checkpoint),
            1,
            charged,
            noise_share_banks=4,
            server_past=server_past,
        )


def test_a_noise_share_is_refused_outside_fedsgd(
    checkpoint: EncoderCheckpoint, tmp_path: Path
) -> None:
    policy = PrivacyPolicy(**AGGREGATE_POLICY)  # type: ignore[arg-type]
    with pytest.raises(PrivacyBudgetError, match="only sound in mode fedsgd"):
        approve_round(
            BankState(tmp_path), policy, _instructions(checkpoint, "full"), 1, [], 4, []
        )
    with pytest.raises(PrivacyBudgetError, match="history as the server saw it"):
        approve_round(BankState(tmp_path), policy, _instructions(checkpoint), 1, [], 4)


def test_only_the_bank_s_own_opt_in_a_verified_secure_round_and_fedsgd_give_a_share(
    checkpoint: EncoderCheckpoint,
) -> None:
    aggregate = PrivacyPolicy(**AGGREGATE_POLICY)  # type: ignore[arg-type]
    conservative = PrivacyPolicy(
        **{**AGGREGATE_POLICY, "distributed_dp_accounting": "conservative"}  # type: ignore[arg-type]
    )
    secure = SecureRound(threshold=4, banks=5)

    def share(policy: PrivacyPolicy, mode: str, round_: SecureRound | None) -> int | None:
        settings = BankSettings("b", Path("d"), Path("s"), policy)
        return _noise_share_banks(settings, _instructions(checkpoint, mode), round_)

    assert share(aggregate, "fedsgd", secure) == 4  # K is the bank's, not the round's
    assert share(aggregate, "full", secure) is None  # multi-step: full noise
    assert share(aggregate, "fedrep", secure) is None
    assert share(aggregate, "fedsgd", None) is None  # no setup the bank's mod verified
    assert share(conservative, "fedsgd", secure) is None


def test_the_server_view_swaps_only_aggregate_charged_rounds() -> None:
    local, summed = DpEvent(1.0, 0.05, 1, 1.0), DpEvent(2.0, 0.05, 1, 1.0)
    facts = distributed_dp_facts(local, summed, 4, 4, 5, AGGREGATE)
    entries = [
        {"seq": 1, "kind": "charge", "dp_events": [{**summed.__dict__}], FACTS: facts},
        {"seq": 2, "kind": "charge", "dp_events": [{**summed.__dict__}]},  # a plain round
    ]
    assert server_view_events(entries) == [local, summed]


def test_a_fedsgd_release_is_one_sgd_step_on_the_noisy_clipped_sum_with_the_head_frozen(
    checkpoint: EncoderCheckpoint, pretrained: Pretrained
) -> None:
    """The release is -lr/B·(clipped sum + N(0, σ²C²)): linear in one noisy sum, which is what
    lets K banks' shares add up to σ·√K. Same seed: same Poisson batch, so the difference of
    a noisy and a noiseless step is the noise alone."""
    data = checkpoint.schema.transform(pretrained.split.banks[0].train, "bank-00")
    lr, batch, sigma, clip = 0.5, 64, 1.5, 1.0

    def step(noise: float) -> tuple[torch.nn.Module, list[torch.Tensor], list[tuple]]:  # type: ignore[type-arg]
        model = checkpoint.build_model()
        seen: list[torch.Tensor] = []
        plan = DpStepPlan("fedsgd", noise, clip, batch, 0.05, lr, 0, 1)
        history = train_with_dp(
            model, data, plan, [], torch.Generator().manual_seed(3), seen.extend
        )
        return model, seen, history

    start = checkpoint.build_model()
    noisy, applied, history = step(sigma)
    clean, _, _ = step(0.0)
    assert history == [(sigma, 0.05, 1)]
    encoder = list(zip(start.encoder.parameters(), noisy.encoder.parameters(), strict=True))
    assert len(applied) == len(encoder)  # only the encoder was stepped
    for (before, after), grad in zip(encoder, applied, strict=True):
        assert torch.allclose(after - before, -lr * grad, atol=1e-6)  # plain SGD, no Adam
    for before, after in zip(start.head.parameters(), noisy.head.parameters(), strict=True):
        assert torch.equal(before, after)
    noise = torch.cat(
        [
            ((a - b) * (-batch / lr)).detach().flatten()
            for a, b in zip(noisy.encoder.parameters(), clean.encoder.parameters(), strict=True)
        ]
    )
    assert noise.numel() > 2000
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.05)
    assert abs(float(noise.mean())) < 4 * sigma * clip / math.sqrt(noise.numel())


def test_aggregate_accounting_needs_a_server_budget_the_bank_states() -> None:
    base = {"data-path": "d", "state-dir": "s", "distributed-dp": True}
    with pytest.raises(ConfigError, match="needs distributed-dp-server-budget") as refused:
        settings_from_node_config({**base, "distributed-dp-accounting": "aggregate"})
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="at least epsilon-budget"):
        settings_from_node_config(
            {
                **base,
                "distributed-dp-accounting": "aggregate",
                "epsilon-budget": 2.0,
                "distributed-dp-server-budget": 1.0,
            }
        )
    settings = settings_from_node_config(
        {**base, "distributed-dp-accounting": "aggregate", "distributed-dp-server-budget": 4.0}
    )
    assert settings.policy.aggregate_accounting
    conservative = settings_from_node_config({**base, "distributed-dp-server-budget": 4.0})
    assert not conservative.policy.aggregate_accounting
