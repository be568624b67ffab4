"""What travels between server and banks: record names, config keys, and allowed replies.

Server -> bank: the global encoder ("arrays"), the public source head ("source-head",
used only to start a bank's private head), and the round's instructions ("config").
Bank -> server: the encoder ("arrays"), a few numbers ("metrics") that the bank's policy
allows, and a status ("status"). Nothing else may appear in a reply.
"""

import json
from dataclasses import asdict, dataclass
from typing import Any

from common.config import ModelConfig, TrainPlanConfig
from common.errors import ConfigError
from common.schema import FeatureSchema

ARRAYS = "arrays"
SOURCE_HEAD = "source-head"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"

NUM_EXAMPLES = "num-examples"
EPSILON = "epsilon"
EVAL_METRICS = ("auc", "ks", "log-loss", "brier")
ALLOWED_TRAIN_METRICS = frozenset({NUM_EXAMPLES, EPSILON})
ALLOWED_EVAL_METRICS = frozenset({NUM_EXAMPLES, EPSILON, *EVAL_METRICS})
ALLOWED_REPLY_RECORDS = frozenset({ARRAYS, METRICS, STATUS})
# Settings that belong to the bank's privacy policy. A server that sends any of them is
# asking for something it may not decide: the round is declined, not silently adjusted.
POLICY_KEYS = frozenset(
    {
        "noise-multiplier",
        "min-noise-multiplier",
        "max-grad-norm",
        "clipping-norm",
        "epsilon",
        "epsilon-budget",
        "delta",
        "dp",
        "disable-dp",
        "secure-mode",
        "accountant",
        "release-num-examples",
        "release-eval-metrics",
        "state-dir",
        "data-path",
    }
)
STATUS_OK = "ok"
STATUS_DECLINED = "declined"


@dataclass(frozen=True)
class RoundInstructions:
    """The server's request for one round, as the bank reads it."""

    server_round: int
    num_rounds: int
    plan: TrainPlanConfig
    schema: FeatureSchema
    model_config: ModelConfig
    proximal_mu: float = 0.0  # FedProx: Flower's strategy adds "proximal-mu" to the config
    federation_id: str = ""  # stable across server restarts: a resumed round is not re-charged

    def to_config(self) -> dict[str, Any]:
        return {
            "server-round": self.server_round,
            "num-rounds": self.num_rounds,
            "mode": self.plan.mode,
            "local-epochs": float(self.plan.local_epochs),
            "head-epochs": float(self.plan.head_epochs),
            "batch-size": self.plan.batch_size,
            "learning-rate": float(self.plan.learning_rate),
            "schema": self.schema.to_json(),
            "model-config": json.dumps(asdict(self.model_config)),
            "federation-id": self.federation_id,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RoundInstructions":
        """Parse and check; anything malformed is a `ConfigError` naming the key."""
        forbidden = sorted(POLICY_KEYS & set(config))
        if forbidden:
            raise ConfigError(
                f"round config sets '{forbidden[0]}', which only the bank's policy decides"
            )
        try:
            plan = TrainPlanConfig(
                mode=str(config.get("mode", "full")),  # type: ignore[arg-type]
                local_epochs=float(config.get("local-epochs", 1.0)),
                head_epochs=float(config.get("head-epochs", 1.0)),
                batch_size=int(config.get("batch-size", 64)),
                learning_rate=float(config.get("learning-rate", 2e-3)),
            )
            server_round = int(config["server-round"])
            num_rounds = int(config.get("num-rounds", server_round))
            schema = FeatureSchema.from_json(str(config["schema"]))
            model_config = ModelConfig.from_dict(json.loads(str(config["model-config"])))
            proximal_mu = float(config.get("proximal-mu", 0.0))
            federation_id = str(config.get("federation-id", ""))
        except KeyError as exc:
            raise ConfigError(f"round config is missing '{exc.args[0]}'") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"round config is malformed ({exc})") from None
        if not 1 <= server_round <= num_rounds:
            raise ConfigError(f"round config: server-round {server_round} of {num_rounds}")
        if not 0.0 <= proximal_mu <= 100.0:
            raise ConfigError(f"round config: proximal-mu must be in [0, 100], got {proximal_mu}")
        return cls(server_round, num_rounds, plan, schema, model_config, proximal_mu, federation_id)
