"""The benchmarks' in-process federation loop: Flower's FedAvg maths, and heads stay home."""

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from flwr.supercore.task_identity import TaskIdentity

from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_state import BankState
from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.config import FederationConfig, PrivacyPolicy, TrainPlanConfig
from fedfin.common.protocol import ARRAYS, METRICS, NUM_EXAMPLES, STATUS
from fedfin.common.shared_weights import to_array_record
from fedfin.server.federation import _set_weights
from fedfin.server.server_app import load_source_head
from fedfin.server.strategy import WEIGHT_KEY, build_strategy
from fedfin.simulations.federated_loop import (
    HEAD_PREFIX,
    LoopConfig,
    Upload,
    aggregation_weights,
    fedavg,
    run_federated_loop,
)
from tests.conftest import Pretrained, write_bank_data

Arrays = OrderedDict[str, np.ndarray]
Metrics = dict[str, float | int]


@pytest.fixture
def server_identity() -> Iterator[None]:
    """Messages are made by a server task; say which, as Flower's own runtime does."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _replies_as_messages(replies: list[tuple[Arrays, Metrics]]) -> list[Message]:
    """The banks' train replies as the server receives them, weighted as the server does."""
    messages = []
    for node, (arrays, metrics) in enumerate(replies, start=1):
        sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        content = RecordDict(
            {
                ARRAYS: to_array_record(arrays),
                METRICS: MetricRecord(dict(metrics)),
                STATUS: ConfigRecord({"status": "ok"}),
            }
        )
        messages.append(Message(content, reply_to=sent))
    _set_weights(messages)
    return messages


def _replies(pretrained: Pretrained, released: list[bool]) -> list[tuple[Arrays, Metrics]]:
    model = load_encoder_checkpoint(pretrained.checkpoint_dir).build_model()
    replies = []
    for bank, (rows, release) in enumerate(zip([874, 120, 3001], released, strict=True)):
        rng = np.random.default_rng(bank)
        arrays = OrderedDict(
            (key, rng.normal(size=tuple(value.shape)).astype(np.float32))
            for key, value in model.encoder.state_dict().items()
        )
        metrics: Metrics = {"epsilon": 0.5, **({NUM_EXAMPLES: rows} if release else {})}
        replies.append((arrays, metrics))
    return replies


def _assert_same(ours: Arrays, flowers: Arrays) -> None:
    assert list(ours) == list(flowers)
    for key in flowers:
        assert ours[key].dtype == flowers[key].dtype == np.float32
        np.testing.assert_array_equal(ours[key], flowers[key])


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize("released", [True, False], ids=["counts-released", "counts-withheld"])
def test_loop_aggregation_equals_flower_fedavg_on_the_same_replies(
    pretrained: Pretrained, released: bool
) -> None:
    replies = _replies(pretrained, [released] * 3)

    ours = fedavg([a for a, _ in replies], aggregation_weights([m for _, m in replies]))
    aggregated, _ = build_strategy(FederationConfig()).aggregate_train(
        1, _replies_as_messages(replies)
    )

    assert aggregated is not None
    _assert_same(ours, OrderedDict((k, v.numpy()) for k, v in aggregated.items()))


@pytest.mark.usefixtures("server_identity")
def test_loop_weights_uniformly_when_one_bank_withholds_its_count(pretrained: Pretrained) -> None:
    # FedAvg.aggregate_train refuses replies whose metric keys differ, so compare with the
    # function it aggregates with, on the weights the server sets.
    replies = _replies(pretrained, [True, False, True])

    ours = fedavg([a for a, _ in replies], aggregation_weights([m for _, m in replies]))
    flowers = aggregate_arrayrecords([m.content for m in _replies_as_messages(replies)], WEIGHT_KEY)

    assert aggregation_weights([m for _, m in replies]) == [1.0, 1.0, 1.0]
    _assert_same(ours, OrderedDict((k, v.numpy()) for k, v in flowers.items()))


def _banks(pretrained: Pretrained, tmp_path: Path, count: int) -> list[BankSettings]:
    return [
        BankSettings(
            name=f"bank-{i:02d}",
            data_path=write_bank_data(pretrained, i, tmp_path / f"bank-{i}" / "data"),
            state_dir=tmp_path / f"bank-{i}" / "state",
            policy=PrivacyPolicy(epsilon_budget=1.0),
        )
        for i in range(count)
    ]


def _heads(banks: list[BankSettings], pretrained: Pretrained) -> list[dict[str, np.ndarray]]:
    start = load_encoder_checkpoint(pretrained.checkpoint_dir)
    heads = []
    for bank in banks:
        model = start.build_model()
        BankState(bank.state_dir).load_head(model, start.schema.fingerprint)
        heads.append({k: v.numpy() for k, v in model.head.state_dict().items()})
    return heads


def test_fedfin_mode_never_sends_a_head_and_heads_stay_private(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    start = load_encoder_checkpoint(pretrained.checkpoint_dir)
    banks = _banks(pretrained, tmp_path, 2)
    uploads: list[Upload] = []
    config = LoopConfig(rounds=1, plan=TrainPlanConfig(local_epochs=0.5), sharing="encoder")

    result = run_federated_loop(
        banks, start, load_source_head(pretrained.checkpoint_dir), config, on_upload=uploads.append
    )

    assert len(uploads) == 2
    for upload in uploads:
        assert list(upload.arrays) == list(start.arrays)  # exactly the encoder, nothing else
        assert not any(key.startswith(HEAD_PREFIX) for key in upload.arrays)
    first, second = _heads(banks, pretrained)
    assert any(not np.array_equal(first[k], second[k]) for k in first)
    for metrics in result.per_bank.values():
        assert 0.0 < metrics["epsilon"] <= 1.0


def test_whole_model_baseline_shares_and_averages_heads(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    start = load_encoder_checkpoint(pretrained.checkpoint_dir)
    banks = [replace(b, seed=3) for b in _banks(pretrained, tmp_path, 2)]
    uploads: list[Upload] = []
    config = LoopConfig(
        rounds=1, plan=TrainPlanConfig(local_epochs=0.5), sharing="model", private=False
    )

    run_federated_loop(
        banks, start, load_source_head(pretrained.checkpoint_dir), config, on_upload=uploads.append
    )

    for upload in uploads:
        assert {k for k in upload.arrays if k.startswith(HEAD_PREFIX)}
    first, second = _heads(banks, pretrained)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
