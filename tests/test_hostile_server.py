"""The real ClientApp declines what a hostile or buggy server sends, and releases nothing."""

from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, Context, Message

from fedfin.common.checkpoint import EncoderCheckpoint
from fedfin.common.ledger import PrivacyLedger
from fedfin.common.protocol import ALLOWED_STATUS_KEYS, REASON_DECLINED
from tests.conftest import Pretrained, write_bank_data
from tests.harness.messages import (
    Arrays,
    bank_context,
    send,
    server_identity,
    status,
    train_message,
)


@pytest.fixture(autouse=True)
def _server_identity() -> Iterator[None]:
    with server_identity():
        yield


@pytest.fixture
def context(pretrained: Pretrained, tmp_path: Path) -> Context:
    return bank_context(write_bank_data(pretrained, 1, tmp_path / "data"), tmp_path / "state")


def _message(
    checkpoint: EncoderCheckpoint,
    arrays: Arrays | ArrayRecord,
    extra_config: dict[str, object] | None = None,
) -> Message:
    return train_message(checkpoint, arrays, extra_config)


_send, _status = send, status


def _with(arrays: Arrays, change: Callable[[Arrays], None]) -> Arrays:
    copy = OrderedDict((k, v.copy()) for k, v in arrays.items())
    change(copy)
    return copy


HOSTILE_ARRAYS: dict[str, Callable[[Arrays], None]] = {
    "an unknown key": lambda a: a.__setitem__("secret.probe", np.zeros(3, np.float32)),
    "a head key": lambda a: a.__setitem__("head.layers.weight", np.zeros((1, 32), np.float32)),
    "a missing key": lambda a: a.pop(next(iter(a))),
    "a wrong shape": lambda a: a.__setitem__(next(iter(a)), np.zeros((2, 2), np.float32)),
    "a wrong dtype": lambda a: a.__setitem__(next(iter(a)), a[next(iter(a))].astype(np.float64)),
    "NaN": lambda a: a[next(iter(a))].__setitem__((0, 0), np.nan),
    "Inf": lambda a: a[next(iter(a))].__setitem__((0, 0), np.inf),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_ARRAYS))
def test_train_message_with_bad_arrays_is_declined_and_nothing_released(
    kind: str, checkpoint: EncoderCheckpoint, context: Context
) -> None:
    arrays = _with(checkpoint.arrays, HOSTILE_ARRAYS[kind])
    reply = _send(_message(checkpoint, arrays), context)
    assert _status(reply) == "declined"
    assert "arrays" not in reply.content.array_records
    assert _nothing_charged_or_released(context)


def _nothing_charged_or_released(context: Context) -> bool:
    """Only "declined" entries (no DP events, no arrays, no metrics) are in the ledger."""
    entries = PrivacyLedger(Path(str(context.node_config["state-dir"]))).entries()
    return all(
        e["kind"] == "declined"
        and not e["dp_events"]
        and not e["arrays_sha256"]
        and not e["metrics_sent"]
        for e in entries
    )


@pytest.mark.parametrize(
    "config",
    [
        {"noise-multiplier": 0.01},
        {"max-grad-norm": 100.0},
        {"dp": False},
        {"epsilon-budget": 1000.0},
        {"min-noise-multiplier": 0.0},
        {"mode": "everything"},
        {"batch-size": -5},
        {"learning-rate": float("nan")},
    ],
    ids=lambda c: next(iter(c)),
)
def test_config_asking_for_what_the_policy_forbids_is_declined(
    config: dict[str, object], checkpoint: EncoderCheckpoint, context: Context
) -> None:
    reply = _send(_message(checkpoint, checkpoint.arrays, config), context)
    assert _status(reply) == "declined"
    assert _nothing_charged_or_released(context)


def test_a_decline_says_declined_and_nothing_about_the_problem(
    checkpoint: EncoderCheckpoint, context: Context
) -> None:
    reply = _send(_message(checkpoint, checkpoint.arrays, {"noise-multiplier": 0.1}), context)
    status = reply.content.config_records["status"]
    assert status["reason"] == REASON_DECLINED
    assert set(status.keys()) <= ALLOWED_STATUS_KEYS


def test_a_decline_over_bad_bank_data_carries_no_path_column_value_or_error_type(
    checkpoint: EncoderCheckpoint, pretrained: Pretrained, tmp_path: Path
) -> None:
    data = write_bank_data(pretrained, 1, tmp_path / "secret-bank-folder")
    train = pd.read_parquet(data / "train.parquet")
    train["int_rate"] = train["int_rate"].astype(object)
    train.loc[3, "int_rate"] = "high"
    (data / "train.parquet").unlink()
    train.to_csv(data / "train.csv", index=False)
    context = bank_context(data, tmp_path / "state")
    reply = _send(_message(checkpoint, checkpoint.arrays), context)
    status = reply.content.config_records["status"]
    assert status["status"] == "declined" and status["reason"] == REASON_DECLINED
    sent = repr({k: status[k] for k in status}) + repr(list(reply.content.keys()))
    for leak in ("secret-bank-folder", "int_rate", "high", "DataError", "numeric", "train.csv"):
        assert leak not in sent
    assert set(reply.content.keys()) == {"status"}


def test_an_honest_message_gets_only_the_encoder_back(
    checkpoint: EncoderCheckpoint, context: Context
) -> None:
    reply = _send(_message(checkpoint, checkpoint.arrays), context)
    assert _status(reply) == "ok"
    assert list(reply.content.array_records["arrays"].keys()) == list(checkpoint.arrays)
    assert set(reply.content.keys()) == {"arrays", "metrics", "status"}
    assert set(reply.content.metric_records["metrics"].keys()) == {"epsilon"}
    entries = PrivacyLedger(Path(str(context.node_config["state-dir"]))).entries()
    assert [e["kind"] for e in entries] == ["charge", "train"]
    status = reply.content.config_records["status"]
    assert (status["ledger-seq"], status["ledger-head"]) == (2, entries[1]["hash"])
