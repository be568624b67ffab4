"""What travels between server and banks: record names, config keys, and allowed replies.

Server -> bank: the global encoder ("arrays"), the public source head ("source-head",
used only to start a bank's private head), and the round's instructions ("config").
Bank -> server: the encoder ("arrays"), a few numbers ("metrics") that the bank's policy
allows, and a status ("status"). Nothing else may appear in a reply.

Every number a reply carries is either public (ε spent: a function of the bank's policy and
the server's requests, never of its row count) or released through a DP mechanism and
charged in the ledger (a noisy count, noisy evaluation metrics). The status carries the
ledger's sequence number and head hash, so the server holds an outside anchor of each bank's
ledger (`fedfin audit --anchors`).
"""

import json
from dataclasses import asdict, dataclass
from typing import Any

from fedfin.common.config import ModelConfig, TrainPlanConfig
from fedfin.common.errors import ConfigError
from fedfin.common.schema import FeatureSchema

ARRAYS = "arrays"
SOURCE_HEAD = "source-head"
CONFIG = "config"
METRICS = "metrics"
STATUS = "status"

NUM_EXAMPLES = "num-examples"  # only ever a DP-noised count, and only if the bank opts in
EPSILON = "epsilon"  # cumulative ε after this release: public, it does not depend on N
# Exact metrics of any encoder stay in the bank's local report (BankState.evaluations).
# With `release-eval-metrics`, a train reply also carries DP-noised metrics of the encoder
# the bank received for that round's training (computed before training, charged).
DP_EVAL_METRICS = ("dp-auc", "dp-ks", "dp-default-rate", "dp-test-rows")
ALLOWED_TRAIN_METRICS = frozenset({NUM_EXAMPLES, EPSILON, *DP_EVAL_METRICS})
ALLOWED_EVAL_METRICS = frozenset({EPSILON})
ALLOWED_REPLY_RECORDS = frozenset({ARRAYS, METRICS, STATUS})
# Status record keys. A declined reply carries only these, never an error type or text.
STATUS_KEY = "status"
BANK_KEY = "bank"
REASON_KEY = "reason"
LEDGER_SEQ = "ledger-seq"  # the ledger's last sequence number when the reply was recorded
LEDGER_HEAD = "ledger-head"  # that entry's hash: the server's outside anchor of the chain
EPSILON_SPENT = "epsilon-spent"  # declined replies: public budget facts only
EPSILON_BUDGET = "epsilon-budget"
ALLOWED_STATUS_KEYS = frozenset(
    {STATUS_KEY, BANK_KEY, REASON_KEY, LEDGER_SEQ, LEDGER_HEAD, EPSILON_SPENT, EPSILON_BUDGET}
)
# The only reasons a declined reply may give: fixed strings, never data-dependent text.
REASON_DECLINED = "declined by the bank (details in the bank's log)"
REASON_BUDGET = "privacy budget spent"
REASON_NOT_ALLOWED = "app not on this bank's allow-list"
REASON_GUARD = "release guard stopped the reply"
DECLINE_REASONS = frozenset({REASON_DECLINED, REASON_BUDGET, REASON_NOT_ALLOWED, REASON_GUARD})
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
        "sample-rate",
        "accountant",
        "release-num-examples",
        "release-eval-metrics",
        "state-dir",
        "data-path",
        "secagg-min-banks",
        "distributed-dp",
        "distributed-dp-accounting",
        "distributed-dp-server-budget",
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
