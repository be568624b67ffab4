"""Every tunable of fedfin, typed, with its default written once.

Bank-side privacy settings (`PrivacyPolicy`) are separate from what the server may
ask for (`TrainPlan`): the bank's policy always wins.
"""

from dataclasses import dataclass, field
from typing import Literal

from common.errors import ConfigError

FineTuneMode = Literal["full", "fedrep"]
FINE_TUNE_MODES: tuple[FineTuneMode, ...] = ("full", "fedrep")
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
