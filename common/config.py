"""Every tunable of fedfin, typed, with its default written once.

Bank-side privacy settings (`PrivacyPolicy`) are separate from what the server may
ask for (`TrainPlan`): the bank's policy always wins.
"""

from dataclasses import dataclass, field
from typing import Any, Literal

from fedfin.common.errors import ConfigError

# full: DP steps on encoder + head; fedrep: head steps, then encoder steps; fedsgd: one DP
# SGD step on the encoder per round, head frozen (linear in one noisy sum: the mode in which
# distributed DP's noise shares add up, see common/distributed_dp.py).
FineTuneMode = Literal["full", "fedrep", "fedsgd"]
FINE_TUNE_MODES: tuple[FineTuneMode, ...] = ("full", "fedrep", "fedsgd")
StrategyName = Literal["fedavg", "fedadam", "fedprox", "fedtrimmedavg"]
STRATEGY_NAMES: tuple[StrategyName, ...] = ("fedavg", "fedadam", "fedprox", "fedtrimmedavg")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the shared encoder and of each bank's private head."""

    hidden_sizes: tuple[int, ...] = (64, 32)
    max_embedding_dim: int = 8
    head_hidden: int = 0  # 0: a logistic (linear) head, the fewest private parameters.

    def __post_init__(self) -> None:
        if not self.hidden_sizes or any(h <= 0 for h in self.hidden_sizes):
            raise ConfigError(f"model hidden sizes must be positive, got {self.hidden_sizes}")
        if self.max_embedding_dim <= 0 or self.head_hidden < 0:
            raise ConfigError("model embedding and head sizes must be positive")

    @property
    def representation_dim(self) -> int:
        return self.hidden_sizes[-1]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Inverse of `dataclasses.asdict`, for checkpoints and round configs."""
        return cls(
            hidden_sizes=tuple(int(h) for h in raw["hidden_sizes"]),
            max_embedding_dim=int(raw["max_embedding_dim"]),
            head_hidden=int(raw["head_hidden"]),
        )


@dataclass(frozen=True)
class SplitConfig:
    """How a table becomes a public/source pool plus banks, each with a train/test split."""

    num_banks: int = 5
    public_fraction: float = 0.4
    test_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_banks <= 1000:
            raise ConfigError(f"--banks must be between 1 and 1000, got {self.num_banks}")
        if not 0.0 < self.public_fraction < 1.0:
            raise ConfigError(f"public fraction must be in (0, 1), got {self.public_fraction}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test fraction must be in (0, 1), got {self.test_fraction}")


@dataclass(frozen=True)
class PretrainConfig:
    """Non-private training of encoder + source head on the public pool."""

    epochs: int = 40
    batch_size: int = 256
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    holdout_fraction: float = 0.2
    patience: int = 6
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size must be positive, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--lr must be positive, got {self.learning_rate}")
        if not 0.0 < self.holdout_fraction < 0.9:
            raise ConfigError(f"holdout fraction must be in (0, 0.9), got {self.holdout_fraction}")


DISTRIBUTED_DP_ACCOUNTING = ("conservative", "aggregate")


@dataclass(frozen=True)
class PrivacyPolicy:
    """A bank's privacy rules. Set by the bank (node config or runner config); the server
    cannot change them, and everything that sets the noise is bounded here.

    The Poisson sample rate is the bank's, not derived from its row count: so neither σ nor
    ε (both sent or inferable) depends on N, and a server's batch size cannot move them.
    """

    epsilon_budget: float = 1.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    min_noise_multiplier: float = 0.5
    # Past this much noise a round teaches nothing: decline instead of sending noise.
    max_noise_multiplier: float = 20.0
    accountant: str = "prv"
    # Each record joins each step's batch with this probability; 1/sample_rate must be an
    # integer (Opacus accounts q = 1 / batches per epoch).
    sample_rate: float = 0.05
    # Bounds on what the server may ask: epochs per round, and the horizon (rounds) the
    # noise is calibrated for. A short horizon means less noise per round, so the bank
    # plans for at least `min_planned_rounds` whatever the server says.
    max_local_epochs: float = 1.0
    min_planned_rounds: int = 3
    max_planned_rounds: int = 100
    # Opt-in releases, each through a Gaussian mechanism charged in the ledger.
    release_num_examples: bool = False
    release_eval_metrics: bool = False
    count_noise_multiplier: float = 20.0  # σ of the noisy training-row count (sensitivity 1)
    eval_noise_multiplier: float = 20.0  # σ of the noisy score histograms (sensitivity 1)
    # Secure aggregation (docs/secure-aggregation.md): K, the fewest banks whose sum this
    # bank lets the server learn; a round whose reconstruction threshold is lower is refused.
    secagg_min_banks: int = 2
    # Opt-in distributed DP (docs/secure-aggregation.md): in a verified secure round the
    # ledger states what the bank's noise guarantees against a recipient of K-bank sums.
    # "conservative": the bank adds its full noise and is charged for it (a statement only).
    # "aggregate": in `fedsgd` rounds only, the bank adds a share σ/√K, is charged for the
    # σ its K-bank sum carries, and the ε a server that broke secure aggregation would get
    # is bounded by `distributed_dp_server_budget` (required, at least `epsilon_budget`).
    distributed_dp: bool = False
    distributed_dp_accounting: str = "conservative"
    distributed_dp_server_budget: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon_budget < float("inf"):
            raise ConfigError(f"epsilon-budget must be positive, got {self.epsilon_budget}")
        if not 0.0 < self.delta < 1e-2:
            raise ConfigError(f"delta must be in (0, 0.01), got {self.delta}")
        if not 0.0 < self.max_grad_norm < float("inf"):
            raise ConfigError(f"max-grad-norm must be positive, got {self.max_grad_norm}")
        if not 0.0 < self.min_noise_multiplier < float("inf"):
            raise ConfigError(
                f"min-noise-multiplier must be positive (DP cannot be off), "
                f"got {self.min_noise_multiplier}"
            )
        if not self.min_noise_multiplier <= self.max_noise_multiplier < float("inf"):
            raise ConfigError(
                f"max-noise-multiplier must be at least min-noise-multiplier, "
                f"got {self.max_noise_multiplier}"
            )
        if self.accountant not in ("prv", "rdp"):
            raise ConfigError(f"accountant must be 'prv' or 'rdp', got '{self.accountant}'")
        if not 0.0 < self.sample_rate <= 1.0 or not _is_unit_fraction(self.sample_rate):
            raise ConfigError(
                f"sample-rate must be 1/k for a whole number k (e.g. 0.05 = 1/20), "
                f"got {self.sample_rate}"
            )
        if not 0.0 < self.max_local_epochs <= 100:
            raise ConfigError(f"max-local-epochs must be in (0, 100], got {self.max_local_epochs}")
        if not 1 <= self.min_planned_rounds <= self.max_planned_rounds <= 100_000:
            raise ConfigError(
                "min-planned-rounds and max-planned-rounds must satisfy "
                f"1 <= min <= max <= 100000, got {self.min_planned_rounds}, "
                f"{self.max_planned_rounds}"
            )
        for key, value in (
            ("count-noise-multiplier", self.count_noise_multiplier),
            ("eval-noise-multiplier", self.eval_noise_multiplier),
        ):
            if not 0.5 <= value < float("inf"):
                raise ConfigError(f"{key} must be at least 0.5, got {value}")
        if not 2 <= self.secagg_min_banks <= 1000:
            raise ConfigError(f"secagg-min-banks must be in [2, 1000], got {self.secagg_min_banks}")
        if self.distributed_dp_accounting not in DISTRIBUTED_DP_ACCOUNTING:
            raise ConfigError(
                f"distributed-dp-accounting must be one of {DISTRIBUTED_DP_ACCOUNTING}, "
                f"got '{self.distributed_dp_accounting}'"
            )
        if self.aggregate_accounting and not (
            self.epsilon_budget <= self.distributed_dp_server_budget < float("inf")
        ):
            raise ConfigError(
                "distributed-dp-accounting 'aggregate' needs distributed-dp-server-budget: "
                "the most ε this bank accepts if secure aggregation is broken, at least "
                f"epsilon-budget ({self.epsilon_budget}); got {self.distributed_dp_server_budget}"
            )

    @property
    def aggregate_accounting(self) -> bool:
        """Charged for the K-bank sum's noise in fedsgd secure rounds (both keys opted in)."""
        return self.distributed_dp and self.distributed_dp_accounting == "aggregate"

    @property
    def batches_per_epoch(self) -> int:
        return round(1.0 / self.sample_rate)


def _is_unit_fraction(rate: float) -> bool:
    return abs(1.0 / rate - round(1.0 / rate)) < 1e-9 * (1.0 / rate)


@dataclass(frozen=True)
class TrainPlanConfig:
    """What the server asks of each bank per round; the bank checks it against its policy."""

    mode: FineTuneMode = "full"
    local_epochs: float = 1.0
    head_epochs: float = 1.0  # fedrep: epochs on the head before the encoder epochs
    batch_size: int = 64
    learning_rate: float = 2e-3

    def __post_init__(self) -> None:
        if self.mode not in FINE_TUNE_MODES:
            raise ConfigError(f"mode must be one of {FINE_TUNE_MODES}, got '{self.mode}'")
        if not 0.0 < self.local_epochs <= 100 or not 0.0 <= self.head_epochs <= 100:
            raise ConfigError("local-epochs must be in (0, 100] and head-epochs in [0, 100]")
        if not 1 <= self.batch_size <= 1_000_000:
            raise ConfigError(f"batch-size must be positive, got {self.batch_size}")
        if not 0.0 < self.learning_rate <= 1.0:
            raise ConfigError(f"learning-rate must be in (0, 1], got {self.learning_rate}")


@dataclass(frozen=True)
class FederationConfig:
    """The server's run: rounds, strategy, the bank plan and where checkpoints go."""

    encoder_dir: str = ""
    out_dir: str = ""
    num_rounds: int = 3
    strategy: StrategyName = "fedavg"
    min_banks: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 600.0
    server_learning_rate: float = 0.05  # fedadam
    proximal_mu: float = 0.01  # fedprox
    trim_beta: float = 0.2  # fedtrimmedavg
    train: TrainPlanConfig = field(default_factory=TrainPlanConfig)
    # Opt-in: the server learns only the sum of the banks' updates (SecAgg+, see
    # docs/secure-aggregation.md). 0 threshold: a strict majority of the round's banks.
    secure_aggregation: bool = False
    secagg_threshold: int = 0
    secagg_clipping_range: float = 8.0  # each update coordinate is clipped to ± this

    def __post_init__(self) -> None:
        if self.num_rounds <= 0:
            raise ConfigError(f"num-server-rounds must be positive, got {self.num_rounds}")
        if self.strategy not in STRATEGY_NAMES:
            raise ConfigError(f"strategy must be one of {STRATEGY_NAMES}, got '{self.strategy}'")
        if self.min_banks <= 0:
            raise ConfigError(f"min-banks must be positive, got {self.min_banks}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.secure_aggregation and self.strategy == "fedtrimmedavg":
            raise ConfigError(
                "strategy 'fedtrimmedavg' cannot be combined with secure-aggregation: a "
                "trimmed mean needs each bank's update, and the server sees only their sum"
            )
        if self.secagg_threshold < 0 or self.secagg_threshold == 1:
            raise ConfigError(
                "secagg-threshold must be 0 (a majority) or at least 2, "
                f"got {self.secagg_threshold}"
            )
        if not 0.0 < self.secagg_clipping_range <= 1000.0:
            raise ConfigError(
                f"secagg-clipping-range must be in (0, 1000], got {self.secagg_clipping_range}"
            )
