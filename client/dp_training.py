"""DP-SGD on the whole model (encoder and private head) under one Opacus accountant.

The accountant's history is restored from the bank's ledger before training, so the ε
it reports is cumulative over every round, run and restart, never just this round's.
Noise, clipping and steps come from a `DpStepPlan` the bank's budget has approved.

Randomness: Opacus' `secure_mode` needs `torchcsprng`, which has no build for the pinned
torch. The next best is done here: one `torch.Generator` per round, seeded with 64 bits
from the OS's CSPRNG (`secrets`), drives both the Poisson sampling and the noise, and the
optimizer's `secure_mode` noise (2n Gaussian draws, against floating-point attacks) is on.
The server never learns the seed, so it cannot regenerate or subtract the noise.

Sampling uses the bank's own rate q (never 1/ceil(N/B)), and the clipped sum is divided by
a public constant (the server's batch size), not by the private expected batch size qN.
Batches come from `poisson_batches` (the same Poisson distribution as Opacus' sampler, in
O(batch) per step, gathered by index).

Clipping is fedfin's own (`client/clipped_gradients.py`), for speed: Opacus' hooks mode
materialised a B×P per-example gradient per parameter every step and clipped it, 5.5x a
non-private epoch at a million rows; for the model's Linear, LayerNorm and Embedding layers,
each example's gradient norm and the clipped sum follow from the layer inputs and output
gradients of one ordinary backward pass, without forming per-example gradients (1.3-1.5x,
benchmarks/dp_speed.py). A layer outside that set is refused, not mis-clipped. The clipped
sum goes where Opacus' `DPOptimizer` reads it (`p.summed_grad`); its noise, division by the
public batch size, accountant hook and Adam step are unchanged. tests/test_clipped_gradients.py
checks the sums against Opacus' own per-example gradients clipped by its own optimizer.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from opacus.accountants import PRVAccountant
from torch import nn
from torch.utils.data import TensorDataset

from fedfin.client.clipped_gradients import ClippedGradients, ClippedSumOptimizer
from fedfin.client.poisson_batches import poisson_batches
from fedfin.common.accounting import DpEvent, merged_history
from fedfin.common.config import FineTuneMode
from fedfin.common.model import CreditModel
from fedfin.common.schema import EncodedTable
from fedfin.common.tensors import as_dataset


@dataclass(frozen=True)
class DpStepPlan:
    """What one round of DP training may do; approved against the budget beforehand."""

    mode: FineTuneMode
    noise_multiplier: float
    max_grad_norm: float
    batch_size: int  # public normaliser of the noisy clipped sum (not a sample size)
    sample_rate: float
    learning_rate: float
    head_steps: int  # fedrep only: steps on the head with the encoder frozen
    # full: steps on everything; fedrep: steps on the encoder, head frozen; fedsgd: one
    # plain SGD step on the encoder, head frozen (the release is -lr/B·(clipped sum + noise))
    steps: int
    proximal_mu: float = 0.0  # FedProx: pull the encoder towards the received one

    @property
    def total_steps(self) -> int:
        return self.head_steps + self.steps

    def event(self) -> DpEvent:
        return DpEvent(
            self.noise_multiplier, self.sample_rate, self.total_steps, self.max_grad_norm
        )


StepObserver = Callable[[list[torch.Tensor]], None]
# Given a phase's trainable parameters, the sum of the audit canaries' gradients (one
# tensor per parameter, each canary of norm C): added to the clipped sum before the noise.
CanaryGradients = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def train_with_dp(
    model: CreditModel,
    data: EncodedTable,
    plan: DpStepPlan,
    past: list[DpEvent],
    generator: torch.Generator,
    observe_step: StepObserver | None = None,
    canary_gradients: CanaryGradients | None = None,
) -> list[tuple[float, float, int]]:
    """Train `model` in place; return the accountant's full history (past + this round).

    `generator` drives the DP noise and the Poisson sampling: it must be secret (see
    bank_worker). `observe_step`, if given, sees the gradients each step applies (after
    clipping, noise and scaling): what an auditor of the noise needs. `canary_gradients`,
    if given (`fedfin audit --empirical` only), adds white-box canaries to every step's
    clipped sum, right before Opacus adds the noise: they go through the real noise,
    scaling and optimizer, exactly like a record whose clipped gradient they are.
    """
    accountant = PRVAccountant()
    accountant.history = merged_history(past)
    phases: list[tuple[nn.Module, int]]
    if plan.mode == "fedrep":
        phases = [(model.head, plan.head_steps), (model.encoder, plan.steps)]
    elif plan.mode == "fedsgd":
        phases = [(model.encoder, plan.steps)]
    else:
        phases = [(model, plan.steps)]
    dataset = as_dataset(data)
    anchor = [p.detach().clone() for p in model.encoder.parameters()]
    for trainable, steps in phases:
        if steps > 0:
            _run_phase(
                accountant,
                model,
                trainable,
                dataset,
                plan,
                steps,
                anchor,
                generator,
                observe_step,
                canary_gradients,
            )
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return list(accountant.history)


def _run_phase(
    accountant: PRVAccountant,
    model: CreditModel,
    trainable: nn.Module,
    dataset: TensorDataset,
    plan: DpStepPlan,
    steps: int,
    anchor: list[torch.Tensor],
    generator: torch.Generator,
    observe_step: StepObserver | None,
    canary_gradients: CanaryGradients | None = None,
) -> None:
    """`steps` Poisson-sampled, clipped and noised steps on `trainable`'s parameters only."""
    wanted = {id(p) for p in trainable.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in wanted)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if plan.mode == "fedsgd":  # linear in the noisy sum: what distributed DP's shares need
        optimizer = torch.optim.SGD(params, lr=plan.learning_rate)
    else:
        optimizer = torch.optim.Adam(params, lr=plan.learning_rate)
    criterion = nn.BCEWithLogitsLoss(reduction="none")  # per-example losses: clipping needs them
    clipped = ClippedGradients(model)
    dp_optimizer = ClippedSumOptimizer(
        optimizer,
        clipped,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=plan.max_grad_norm,
        expected_batch_size=plan.batch_size,  # public, unlike qN
        generator=generator,
        secure_mode=True,  # 2n Gaussian draws per coordinate (Opacus' FP-attack fix)
    )
    # One accountant step of (σ, q) per optimizer step, q itself (Opacus' own hook would take
    # q as 1 / len(loader): 1/int(1/q) is not q for many unit fractions, 1/93, 1/100000).
    dp_optimizer.attach_step_hook(
        lambda optim: accountant.step(
            noise_multiplier=optim.noise_multiplier, sample_rate=plan.sample_rate
        )
    )
    if canary_gradients is not None:
        _add_canaries_before_noise(dp_optimizer, params, canary_gradients)
    if observe_step is not None:
        optimizer.register_step_pre_hook(
            lambda *_: observe_step([p.grad.detach().clone() for p in params if p.grad is not None])
        )
    model.train()
    batches = poisson_batches(dataset.tensors, plan.sample_rate, generator)
    try:
        for _ in range(steps):
            numeric, categorical, target = next(batches)
            dp_optimizer.zero_grad()
            if len(target) == 0:
                _noise_only_step(dp_optimizer, params, plan, generator, canary_gradients)
            else:
                clipped.backward(criterion(model(numeric, categorical), target))
                dp_optimizer.step()
            if plan.proximal_mu > 0:  # post-processing of a DP step with public weights: DP
                with torch.no_grad():
                    for parameter, start in zip(model.encoder.parameters(), anchor, strict=True):
                        parameter.sub_(plan.learning_rate * plan.proximal_mu * (parameter - start))
        dp_optimizer.zero_grad()
    finally:
        clipped.remove()


def _noise_only_step(
    dp_optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    plan: DpStepPlan,
    generator: torch.Generator,
    canary_gradients: CanaryGradients | None = None,
) -> None:
    """A step on an empty Poisson batch: the clipped sum is zero, the noise is not.

    DP-SGD's guarantee assumes every step adds N(0, σ²C²) whatever the batch holds; an empty
    batch that skipped the step (or crashed it) would make the step count depend on data.
    The step is counted by the accountant exactly as a normal one.
    """
    from opacus.optimizers.optimizer import _generate_noise

    std = plan.noise_multiplier * plan.max_grad_norm
    canaries = canary_gradients(params) if canary_gradients is not None else None
    for index, parameter in enumerate(params):
        noise = _generate_noise(std, parameter, generator=generator, secure_mode=True)
        clipped_sum = canaries[index] if canaries is not None else 0.0
        parameter.grad = (clipped_sum + noise) / plan.batch_size
    optimizer: torch.optim.Optimizer = dp_optimizer.original_optimizer  # type: ignore[attr-defined]
    optimizer.step()
    dp_optimizer.step_hook(dp_optimizer)  # type: ignore[attr-defined]  # the accountant's step


def _add_canaries_before_noise(
    dp_optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    canary_gradients: CanaryGradients,
) -> None:
    """Make the optimizer's own `add_noise` first add the canaries to each clipped sum.

    This instance's method is wrapped, nothing else: the noise, its σC, the division by the
    public batch size and the accountant's step stay Opacus' own code, which is what the
    audit is meant to test.
    """
    real_add_noise = dp_optimizer.add_noise  # type: ignore[attr-defined]

    def add_noise_with_canaries() -> None:
        for parameter, canary in zip(params, canary_gradients(params), strict=True):
            summed = getattr(parameter, "summed_grad", None)
            if summed is None:
                parameter.summed_grad = canary.clone()  # type: ignore[attr-defined]
            else:
                summed.add_(canary.view_as(summed))
        real_add_noise()

    dp_optimizer.add_noise = add_noise_with_canaries  # type: ignore[attr-defined]
