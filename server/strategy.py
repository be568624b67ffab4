"""Flower's own aggregation strategies, configured to aggregate encoder updates only.

The strategies never see a head: banks reply with encoder arrays alone. Aggregation
weights come from `aggregation-weight`, which the server sets per reply: the bank's
released `num-examples`, or 1 for every bank when any bank withholds it.
"""

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedTrimmedAvg

from fedfin.common.config import FederationConfig

WEIGHT_KEY = "aggregation-weight"


def build_strategy(config: FederationConfig) -> FedAvg:
    """FedAvg by default; FedAdam, FedProx or FedTrimmedAvg on request."""
    common = {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": config.min_banks,
        "min_evaluate_nodes": config.min_banks,
        "min_available_nodes": config.min_banks,
        "weighted_by_key": WEIGHT_KEY,
    }
    if config.strategy == "fedadam":
        return FedAdam(**common, eta=config.server_learning_rate)  # type: ignore[arg-type]
    if config.strategy == "fedprox":
        return FedProx(**common, proximal_mu=config.proximal_mu)  # type: ignore[arg-type]
    if config.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=config.trim_beta)  # type: ignore[arg-type]
    return FedAvg(**common)  # type: ignore[arg-type]
