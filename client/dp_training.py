"""DP-SGD on the whole model (encoder and private head) under one Opacus accountant.

The accountant's history is restored from the bank's ledger before training, so the ε
it reports is cumulative over every round, run and restart, never just this round's.
Noise, clipping and steps come from a `DpStepPlan` the bank's budget has approved.
"""

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader

from common.accounting import DpEvent, merged_history
from common.config import FineTuneMode
from common.model import CreditModel
from common.schema import EncodedTable
from common.tensors import as_dataset

GRAD_SAMPLE_MODE = "ghost"  # fast gradient clipping: per-example norms without per-example grads


@dataclass(frozen=True)
class DpStepPlan:
    """What one round of DP training may do; approved against the budget beforehand."""

    mode: FineTuneMode
    noise_multiplier: float
    max_grad_norm: float
    batch_size: int
    sample_rate: float
    learning_rate: float
    head_steps: int  # fedrep only: steps on the head with the encoder frozen
    steps: int  # full: steps on everything; fedrep: steps on the encoder, head frozen
    proximal_mu: float = 0.0  # FedProx: pull the encoder towards the received one

    @property
    def total_steps(self) -> int:
        return self.head_steps + self.steps

    def event(self) -> DpEvent:
        return DpEvent(
            self.noise_multiplier, self.sample_rate, self.total_steps, self.max_grad_norm
        )


def train_with_dp(
    model: CreditModel, data: EncodedTable, plan: DpStepPlan, past: list[DpEvent], seed: int
) -> list[tuple[float, float, int]]:
    """Train `model` in place; return the accountant's full history (past + this round).

    `seed` drives the DP noise and the Poisson sampling (through torch's default generator,
    as Opacus uses it outside its secure mode): it must be secret (see bank_worker).
    """
    torch.manual_seed(seed)
    engine = PrivacyEngine(accountant="prv")
    engine.accountant.history = merged_history(past)
    phases: list[tuple[nn.Module, int]]
    if plan.mode == "fedrep":
        phases = [(model.head, plan.head_steps), (model.encoder, plan.steps)]
    else:
        phases = [(model, plan.steps)]
    dataset = as_dataset(data)
    anchor = [p.detach().clone() for p in model.encoder.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns about secure RNG and backward hooks
        for trainable, steps in phases:
            if steps > 0:
                _run_phase(engine, model, trainable, dataset, plan, steps, anchor)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return list(engine.accountant.history)


def _run_phase(
    engine: PrivacyEngine,
    model: CreditModel,
    trainable: nn.Module,
    dataset: torch.utils.data.Dataset,
    plan: DpStepPlan,
    steps: int,
    anchor: list[torch.Tensor],
) -> None:
    """`steps` Poisson-sampled, clipped and noised steps on `trainable`'s parameters only."""
    wanted = {id(p) for p in trainable.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in wanted)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=plan.learning_rate
    )
    loader = DataLoader(dataset, batch_size=plan.batch_size)
    private_model, dp_optimizer, criterion, dp_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=nn.BCEWithLogitsLoss(),
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=GRAD_SAMPLE_MODE,
    )
    private_model.train()
    batches = _forever(dp_loader)
    for _ in range(steps):
        numeric, categorical, target = next(batches)
        dp_optimizer.zero_grad()
        loss = criterion(private_model(numeric, categorical), target)
        loss.backward()
        dp_optimizer.step()
        if plan.proximal_mu > 0:  # post-processing of a DP step with public weights: still DP
            with torch.no_grad():
                for parameter, start in zip(model.encoder.parameters(), anchor, strict=True):
                    parameter.sub_(plan.learning_rate * plan.proximal_mu * (parameter - start))
    dp_optimizer.zero_grad()
    private_model.to_standard_module()


def _forever(loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader
