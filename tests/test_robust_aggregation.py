"""Flower's FedTrimmedAvg, as fedfin configures it, shrugs off one poisoned bank of five.

The end-to-end figures (honest banks' AUC under attack, FedAvg beside it) are measured by
benchmarks/robust_aggregation.py; this checks the property they rest on, on real replies.
"""

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedfin.common.config import FederationConfig
from fedfin.server.strategy import WEIGHT_KEY, build_strategy
from tests.harness.messages import server_identity


def _reply(arrays: dict[str, np.ndarray]) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(OrderedDict((k, Array(v)) for k, v in arrays.items())),
            "metrics": MetricRecord({WEIGHT_KEY: 100.0}),
            "status": ConfigRecord({"status": "ok"}),
        }
    )
    with server_identity():
        request = Message(content=RecordDict(), dst_node_id=1, message_type="train")
    reply = Message(content, reply_to=request)
    return reply


@pytest.mark.parametrize("attack", ["scale", "random"])
def test_trimmed_mean_stays_near_the_honest_mean_fedavg_does_not(attack: str) -> None:
    rng = np.random.default_rng(0)
    start = rng.normal(0, 1, (16, 8)).astype(np.float32)
    honest = [start + rng.normal(0, 0.01, start.shape).astype(np.float32) for _ in range(4)]
    if attack == "scale":
        poisoned = start - 20 * (honest[0] - start)
    else:
        poisoned = rng.normal(0, 1, start.shape).astype(np.float32)
    honest_mean = np.mean(honest, axis=0)

    def aggregate(strategy_name: str) -> np.ndarray:
        strategy = build_strategy(FederationConfig(strategy=strategy_name))  # type: ignore[arg-type]
        replies = [_reply({"w": a}) for a in [*honest, poisoned]]  # Flower pops what it reads
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return arrays["w"].numpy()

    trimmed_error = np.abs(aggregate("fedtrimmedavg") - honest_mean).max()
    fedavg_error = np.abs(aggregate("fedavg") - honest_mean).max()
    assert trimmed_error < 0.05
    assert fedavg_error > 10 * trimmed_error


def test_banks_withholding_their_counts_among_others_aggregate_uniformly() -> None:
    """A mix of banks that release num-examples and banks that do not must not crash."""
    from fedfin.server.federation import _set_weights

    replies = [_reply({"w": np.full((2, 2), float(i), np.float32)}) for i in range(3)]
    replies[0].content.metric_records["metrics"]["num-examples"] = 500
    replies[1].content.metric_records["metrics"]["num-examples"] = 100
    for reply in replies:
        del reply.content.metric_records["metrics"][WEIGHT_KEY]
    _set_weights(replies)
    arrays, _ = build_strategy(FederationConfig()).aggregate_train(1, replies)
    assert arrays is not None
    assert np.allclose(arrays["w"].numpy(), 1.0)  # the plain mean of 0, 1, 2
