"""`fedfin audit --empirical`: test the bank's own DP training with canaries, in one run.

`fedfin audit` recomputes ε from what the ledger says; it cannot see a build whose noise is
secretly cut while the ledger keeps the planned σ. This audit runs the bank's real
`train_round` (real data loading, budget approval, Opacus clipping and noise, Adam) in a
throwaway state directory, with m white-box gradient canaries (Steinke, Nasr and Jagielski
2023): each a fixed unit direction × C, included with probability 1/2 and added to every
step's clipped sum before the noise (q = 1). From the gradients each step applies it
guesses which canaries were in; common/one_run_audit.py turns the count of right guesses
into a 95% lower bound on ε, compared with the ε the accountant claims for the canaries'
mechanism (σ, q = 1, T steps). The noise left after removing the canary subspace is
checked against σC/B. Nothing is released and the bank's real budget is not touched.
"""

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_worker import train_round
from fedfin.common.accounting import DpEvent, calibrate_noise_multiplier, epsilon_spent
from fedfin.common.checkpoint import EncoderCheckpoint, load_encoder_checkpoint
from fedfin.common.config import ModelConfig, PrivacyPolicy, TrainPlanConfig
from fedfin.common.errors import ConfigError
from fedfin.common.one_run_audit import (
    CONFIDENCE,
    NoiseDiagnostics,
    epsilon_lower_bound,
    guess_from_scores,
    noise_diagnostics,
    perfect_guess_ceiling,
)
from fedfin.common.protocol import RoundInstructions
from fedfin.common.schema import FeatureSchema

_AUDIT_BUDGET = 1e6  # the throwaway ledger's budget: σ is fixed by the audit's plan instead


@dataclass(frozen=True)
class EmpiricalAuditConfig:
    """The audited plan: the canaries' claimed ε fixes σ for `steps` steps at q = 1."""

    canaries: int = 1000
    guesses_per_side: int = 0  # 0: m / 10 "in" guesses and m / 10 "out" guesses
    epsilon: float = 4.0
    steps: int = 20
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    sample_rate: float = 0.05  # the data's Poisson rate: the bank's policy
    batch_size: int = 64
    learning_rate: float = 2e-3
    seed: int = 0
    # A freshly initialised encoder (the checkpoint gives only the schema and shapes): DP
    # must hold for any encoder a server sends, and a fresh one has large, aligned
    # per-example gradients, so clipping binds and a build without it shows.
    fresh_encoder: bool = True

    def __post_init__(self) -> None:
        if self.canaries < 10:
            raise ConfigError(f"--canaries must be at least 10, got {self.canaries}")
        if not 0 <= self.guesses_per_side <= self.canaries // 2:
            raise ConfigError(f"--guesses must be in [0, m/2], got {self.guesses_per_side}")
        if not 0.0 < self.epsilon < float("inf"):
            raise ConfigError(f"--epsilon must be positive, got {self.epsilon}")
        if not 2 <= self.steps <= 100 / self.sample_rate:
            raise ConfigError(f"--steps must be in [2, {100 / self.sample_rate:g}]")
        PrivacyPolicy(  # the same checks a bank's policy gets
            delta=self.delta, max_grad_norm=self.max_grad_norm, sample_rate=self.sample_rate
        )

    @property
    def per_side(self) -> int:
        return self.guesses_per_side or max(1, self.canaries // 10)


@dataclass(frozen=True)
class EmpiricalAudit:
    """The audit's findings; `caught` when the lower bound or the noise contradicts the claim."""

    config: EmpiricalAuditConfig
    noise_multiplier: float
    claimed_epsilon: float
    lower_bound: float
    ceiling: float
    guesses: int
    correct: int
    parameters: int
    diagnostics: NoiseDiagnostics
    scores_in: list[float]
    scores_out: list[float]

    @property
    def bound_exceeds_claim(self) -> bool:
        return self.lower_bound > self.claimed_epsilon

    @property
    def verdict(self) -> str:
        if self.bound_exceeds_claim:
            return "FAIL: ε lower bound above the claim"
        if not self.diagnostics.ok:
            return "FAIL: noise diagnostics"
        return "ok"

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "noise_multiplier": self.noise_multiplier,
            "claimed_epsilon": self.claimed_epsilon,
            "lower_bound_95": self.lower_bound,
            "ceiling_95": self.ceiling,
            "guesses": self.guesses,
            "correct": self.correct,
            "parameters": self.parameters,
            "diagnostics": {**asdict(self.diagnostics), "ok": self.diagnostics.ok},
            "verdict": self.verdict,
        }


def canary_noise_multiplier(config: EmpiricalAuditConfig) -> float:
    """σ at which T steps of a q = 1 Gaussian mechanism spend the claimed ε (PRV)."""
    sigma = calibrate_noise_multiplier(
        [],
        1.0,
        config.steps,
        1,
        config.delta,
        config.epsilon,
        0.05,
        config.max_grad_norm,
        max_noise_multiplier=1e4,
    )
    if sigma is None:
        raise ConfigError(f"no noise up to 1e4 reaches ε={config.epsilon} in {config.steps} steps")
    return sigma


def run_empirical_audit(
    data_path: Path, encoder_dir: Path, config: EmpiricalAuditConfig
) -> EmpiricalAudit:
    """Train one round with canaries on the bank's data in a temporary state dir; judge it."""
    checkpoint = load_encoder_checkpoint(encoder_dir)
    dimension = _parameter_count(checkpoint.schema, checkpoint.model_config, config.seed)
    if config.canaries > dimension:
        raise ConfigError(
            f"--canaries must be at most the model's {dimension} parameters "
            "(the canaries are orthogonal directions)"
        )
    sigma = canary_noise_multiplier(config)
    claimed = epsilon_spent(
        [DpEvent(sigma, 1.0, config.steps, config.max_grad_norm)], config.delta, "prv"
    )
    rng = np.random.default_rng(config.seed)
    directions, _ = np.linalg.qr(rng.standard_normal((dimension, config.canaries)))
    included = rng.random(config.canaries) < 0.5
    canary_sum = config.max_grad_norm * directions[:, included].sum(axis=1)
    applied: list[np.ndarray] = []

    def observe(grads: list[torch.Tensor]) -> None:
        applied.append(torch.cat([g.flatten() for g in grads]).double().numpy())

    epochs = config.steps * config.sample_rate
    policy = PrivacyPolicy(
        epsilon_budget=_AUDIT_BUDGET,
        delta=config.delta,
        max_grad_norm=config.max_grad_norm,
        min_noise_multiplier=sigma,
        max_noise_multiplier=sigma,
        sample_rate=config.sample_rate,
        max_local_epochs=epochs,
        min_planned_rounds=1,
    )
    instructions = RoundInstructions(
        1,
        1,
        TrainPlanConfig(
            local_epochs=epochs, batch_size=config.batch_size, learning_rate=config.learning_rate
        ),
        checkpoint.schema,
        checkpoint.model_config,
    )
    with tempfile.TemporaryDirectory(prefix="fedfin-empirical-audit-") as state_dir:
        settings = BankSettings(
            "empirical-audit",
            data_path,
            Path(state_dir),
            policy,
            seed=config.seed,
            noise_seed=config.seed,  # reproducible: this run releases nothing
        )
        train_round(
            settings,
            instructions,
            _audited_encoder(checkpoint, config),
            None,
            1,
            observe_step=observe,
            canary_gradients=_splitter(canary_sum),
        )
    if len(applied) != config.steps:
        raise ConfigError(f"expected {config.steps} DP steps, saw {len(applied)}")
    gradients = np.stack(applied)
    projections = gradients @ directions  # steps x canaries
    scale = config.max_grad_norm / config.batch_size  # one canary's share of a step
    scores = projections.sum(axis=0) / scale
    outcome = guess_from_scores(scores, included, config.per_side)
    residuals = gradients - projections @ directions.T
    diagnostics = noise_diagnostics(residuals, sigma * scale, config.canaries)
    return EmpiricalAudit(
        config=config,
        noise_multiplier=sigma,
        claimed_epsilon=claimed,
        lower_bound=epsilon_lower_bound(
            config.canaries, outcome.guesses, outcome.correct, config.delta, CONFIDENCE
        ),
        ceiling=perfect_guess_ceiling(config.canaries, outcome.guesses, config.delta, CONFIDENCE),
        guesses=outcome.guesses,
        correct=outcome.correct,
        parameters=dimension,
        diagnostics=diagnostics,
        scores_in=[float(s) for s in scores[included]],
        scores_out=[float(s) for s in scores[~included]],
    )


def _audited_encoder(
    checkpoint: EncoderCheckpoint, config: EmpiricalAuditConfig
) -> Mapping[str, np.ndarray]:
    if not config.fresh_encoder:
        return checkpoint.arrays
    from fedfin.common.model import build_model
    from fedfin.common.shared_weights import shared_arrays

    return shared_arrays(build_model(checkpoint.schema, checkpoint.model_config, config.seed + 1))


def _parameter_count(schema: FeatureSchema, model_config: ModelConfig, seed: int) -> int:
    from fedfin.common.model import build_model

    return sum(p.numel() for p in build_model(schema, model_config, seed).parameters())


def _splitter(canary_sum: np.ndarray) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """The canary sum cut into the shapes of the parameters, in the order the step has them."""
    vector = torch.from_numpy(canary_sum.astype(np.float32))

    def split(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        sizes = [p.numel() for p in params]
        if sum(sizes) != vector.numel():
            raise ConfigError("the canaries must span every trainable parameter ('full' mode)")
        return [
            piece.view_as(p) for piece, p in zip(torch.split(vector, sizes), params, strict=True)
        ]

    return split


def empirical_audit_table(audit: EmpiricalAudit) -> str:
    """The findings for people: claim, bound, ceiling, diagnostics and the verdict."""
    d = audit.diagnostics
    rows = [
        (
            "canaries (in / guessed / right)",
            f"{audit.config.canaries} ({len(audit.scores_in)} / {audit.guesses} / {audit.correct})",
        ),
        (
            "steps, σ, C, B",
            f"{audit.config.steps}, {audit.noise_multiplier:.3f}, "
            f"{audit.config.max_grad_norm:g}, {audit.config.batch_size}",
        ),
        (
            "claimed ε (canaries: q=1, PRV)",
            f"{audit.claimed_epsilon:.3f} (δ={audit.config.delta:g})",
        ),
        ("95% lower bound on ε", f"{audit.lower_bound:.3f}"),
        ("ceiling (all guesses right)", f"{audit.ceiling:.3f}"),
        ("noise scale / σC/B", f"{d.scale_ratio:.3f} (ok within 1±0.25)"),
        ("excess kurtosis", f"{d.excess_kurtosis:.3f} (ok below {d.kurtosis_limit:.2f} in size)"),
        ("step-to-step correlation", f"{d.step_correlation:.3f} (ok below 0.1 in size)"),
        ("verdict", audit.verdict),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_empirical_plot(path: Path, audit: EmpiricalAudit) -> None:
    """Histogram of canary scores, in and out: well-separated piles mean little noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedfin.common.atomic import write_atomically

    figure, axes = plt.subplots(figsize=(8, 4.5))
    both = audit.scores_in + audit.scores_out
    bins = [float(b) for b in np.linspace(min(both), max(both), 40)]
    axes.hist(audit.scores_out, bins=bins, alpha=0.6, label="canary left out")
    axes.hist(audit.scores_in, bins=bins, alpha=0.6, label="canary included")
    axes.axvline(audit.config.steps, color="k", linestyle="--", linewidth=0.8)
    axes.set_xlabel("score: Σ over steps of the applied gradient along the canary, in C/B")
    axes.set_ylabel("canaries")
    axes.set_title(
        f"claimed ε {audit.claimed_epsilon:.2f}, 95% lower bound {audit.lower_bound:.2f} "
        f"(ceiling {audit.ceiling:.2f}); {audit.verdict}"
    )
    axes.legend(fontsize="small")
    figure.tight_layout()

    def save(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=110)

    write_atomically(path, save)
    plt.close(figure)
