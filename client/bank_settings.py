"""A bank's private settings, read from its SuperNode's node config (never from the server).

Deployment: `flower-supernode --node-config "data-path='...' state-dir='...' epsilon-budget=1.0"`.
Simulation: the simulation gives each virtual SuperNode the same settings, keyed by its
`partition-id`, through `SimulatedBanks` (see `simulations/`).
"""

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedfin.common.config import PrivacyPolicy
from fedfin.common.errors import ConfigError

_POLICY_KEYS = {
    "epsilon-budget": "epsilon_budget",
    "delta": "delta",
    "max-grad-norm": "max_grad_norm",
    "min-noise-multiplier": "min_noise_multiplier",
    "max-noise-multiplier": "max_noise_multiplier",
    "accountant": "accountant",
    "release-num-examples": "release_num_examples",
    "release-eval-metrics": "release_eval_metrics",
    "sample-rate": "sample_rate",
    "max-local-epochs": "max_local_epochs",
    "min-planned-rounds": "min_planned_rounds",
    "max-planned-rounds": "max_planned_rounds",
    "count-noise-multiplier": "count_noise_multiplier",
    "eval-noise-multiplier": "eval_noise_multiplier",
    "secagg-min-banks": "secagg_min_banks",
    "distributed-dp": "distributed_dp",
    "distributed-dp-accounting": "distributed_dp_accounting",
    "distributed-dp-server-budget": "distributed_dp_server_budget",
}


@dataclass(frozen=True)
class BankSettings:
    """Where the bank's data and state live, and its privacy policy."""

    name: str
    data_path: Path
    state_dir: Path
    policy: PrivacyPolicy
    test_fraction: float = 0.25
    # Of the training rows, kept out of DP training to choose and calibrate the served model
    # (client/bank_data.py says why). About 200 of Lending Club's ~880 training rows a bank.
    validation_fraction: float = 0.2
    seed: int = 0  # head initialisation: not secret (the train/test split uses a secret key)
    # DP noise and Poisson sampling draw from a secret seed unless this is set. Only code
    # sets it (reproducible tests and benchmarks): a node config or runner file that names
    # `noise-seed` is refused, since whoever knows the seed can regenerate the noise.
    noise_seed: int | None = None


def settings_from_node_config(node_config: dict[str, Any]) -> BankSettings:
    """Parse and check the node config; a missing or bad key is one `ConfigError` naming it."""
    if "noise-seed" in node_config:
        raise ConfigError(
            "node config 'noise-seed' is refused: whoever learns a fixed noise seed can "
            "regenerate the DP noise and remove it; remove the key (each round's noise "
            "comes from the operating system's secret generator)"
        )
    for key in ("data-path", "state-dir"):
        if not str(node_config.get(key, "")).strip():
            raise ConfigError(f"node config '{key}' is required (set it with --node-config)")
    policy_values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(PrivacyPolicy)}
    for key, attribute in _POLICY_KEYS.items():
        if key in node_config:
            policy_values[attribute] = _coerce(key, node_config[key], types[attribute])
    state_dir = Path(str(node_config["state-dir"])).expanduser()
    test_fraction = _coerce("test-fraction", node_config.get("test-fraction", 0.25), float)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"node config 'test-fraction' must be in (0, 1), got {test_fraction}")
    validation_fraction = _coerce(
        "validation-fraction", node_config.get("validation-fraction", 0.2), float
    )
    if not 0.0 <= validation_fraction < 1.0:
        raise ConfigError(
            f"node config 'validation-fraction' must be in [0, 1), got {validation_fraction}"
        )
    return BankSettings(
        name=str(node_config.get("bank-name", state_dir.name)),
        data_path=Path(str(node_config["data-path"])).expanduser(),
        state_dir=state_dir,
        policy=PrivacyPolicy(**policy_values),
        test_fraction=test_fraction,
        validation_fraction=validation_fraction,
        seed=_coerce("seed", node_config.get("seed", 0), int),
    )


def _coerce(key: str, value: Any, kind: Any) -> Any:
    if kind in (bool, "bool"):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"node config '{key}' must be true or false, got '{value}'")
    if kind in (str, "str"):
        return str(value)
    try:
        return float(value) if kind in (float, "float") else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config '{key}' must be a number, got '{value}'") from None
