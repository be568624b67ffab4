"""Nothing leaves a bank outside its (ε, δ): evaluations, counts, refusals, crashes, races,
splits and the noise itself, each checked against the bank's real code."""

import json
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import fedfin.client.dp_training as dp_training
from fedfin.client.bank_data import keyed_validation_mask, load_bank_tables
from fedfin.client.bank_settings import BankSettings, settings_from_node_config
from fedfin.client.bank_state import BankState
from fedfin.client.bank_worker import train_round
from fedfin.client.model_choice import choose_served_model
from fedfin.client.release_guard import release_guard
from fedfin.common.accounting import DpEvent
from fedfin.common.audit import dp_accounting_epsilon
from fedfin.common.checkpoint import EncoderCheckpoint
from fedfin.common.config import PrivacyPolicy, TrainPlanConfig
from fedfin.common.errors import ConfigError, PrivacyBudgetError
from fedfin.common.ledger import PrivacyLedger, events_of
from fedfin.common.protocol import EPSILON, REASON_GUARD, RoundInstructions
from fedfin.common.shared_weights import to_array_record
from tests.conftest import Pretrained, write_bank_data
from tests.harness.bank_round import KILL_POINTS
from tests.harness.messages import bank_context, send, server_identity, status, train_message
from tests.harness.processes import stop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _server_identity() -> Iterator[None]:
    with server_identity():
        yield


@pytest.fixture
def data(pretrained: Pretrained, tmp_path: Path) -> Path:
    return write_bank_data(pretrained, 0, tmp_path / "data")


def _instructions(
    checkpoint: EncoderCheckpoint, rnd: int = 1, rounds: int = 3, **plan: Any
) -> RoundInstructions:
    return RoundInstructions(
        rnd, rounds, TrainPlanConfig(**plan), checkpoint.schema, checkpoint.model_config
    )


def _charges(state: Path) -> list[dict[str, Any]]:
    return [e for e in PrivacyLedger(state).entries() if e["kind"] == "charge"]


def _random_encoder(checkpoint: EncoderCheckpoint, seed: int) -> OrderedDict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return OrderedDict(
        (k, rng.normal(0, 0.3, v.shape).astype(v.dtype)) for k, v in checkpoint.arrays.items()
    )


# --- evaluation is no oracle -------------------------------------------------------------


def test_evaluating_any_encoder_any_number_of_times_returns_no_metric(
    checkpoint: EncoderCheckpoint, data: Path, tmp_path: Path
) -> None:
    context = bank_context(data, tmp_path / "state")
    assert status(send(train_message(checkpoint), context)) == "ok"
    epsilon = PrivacyLedger(tmp_path / "state").entries()[-1]["epsilon_cumulative"]
    replies = [
        send(
            train_message(checkpoint, _random_encoder(checkpoint, i), message_type="evaluate"),
            context,
        )
        for i in range(3)
    ]
    for reply in replies:
        assert set(reply.content.keys()) == {"metrics", "status"}
        assert dict(reply.content.metric_records["metrics"]) == {EPSILON: epsilon}
    report = BankState(tmp_path / "state").evaluations()
    assert len({r["metrics"]["auc"] for r in report}) == 3  # exact, different, and local only
    assert PrivacyLedger(tmp_path / "state").entries()[-1]["epsilon_cumulative"] == epsilon


def test_opted_in_evaluation_is_of_the_received_training_encoder_noisy_and_charged(
    checkpoint: EncoderCheckpoint, data: Path, tmp_path: Path
) -> None:
    policy = PrivacyPolicy(release_eval_metrics=True)
    bank = BankSettings("bank-00", data, tmp_path / "state", policy)
    first = train_round(bank, _instructions(checkpoint, 1), checkpoint.arrays, None, 1)
    assert "dp-auc" not in first.metrics  # no head yet: nothing of the bank's to evaluate
    second = train_round(bank, _instructions(checkpoint, 2), checkpoint.arrays, None, 1)
    assert {"dp-auc", "dp-ks", "dp-default-rate", "dp-test-rows"} <= set(second.metrics)
    events = events_of(_charges(tmp_path / "state")[-1])
    assert DpEvent(policy.eval_noise_multiplier, 1.0, 1, 1.0) in events
    assert len(events) == 2  # the evaluation and the training steps, charged together


# --- the row count N ------------------------------------------------------------------------


def _round_facts(bank: BankSettings, checkpoint: EncoderCheckpoint, **plan: Any) -> Any:
    reply = train_round(bank, _instructions(checkpoint, 1, **plan), checkpoint.arrays, None, 1)
    return reply.metrics, [e["dp_events"] for e in _charges(bank.state_dir)]


def test_neighbouring_banks_send_the_same_epsilon_and_noise(
    checkpoint: EncoderCheckpoint, pretrained: Pretrained, tmp_path: Path
) -> None:
    """N and N-1 rows: same σ, q, steps and ε; a batch larger than N is not refused."""
    big = write_bank_data(pretrained, 0, tmp_path / "big")
    small = write_bank_data(pretrained, 0, tmp_path / "small")
    train = pd.read_parquet(small / "train.parquet")
    train.iloc[1:].to_parquet(small / "train.parquet")
    policy = PrivacyPolicy(accountant="rdp")  # fast calibration; the property is the same
    facts = [
        _round_facts(BankSettings("b", path, tmp_path / f"state-{i}", policy), checkpoint)
        for i, path in enumerate((big, small))
    ]
    assert facts[0] == facts[1]
    huge_batch = _round_facts(
        BankSettings("b", small, tmp_path / "state-huge", policy),
        checkpoint,
        batch_size=1_000_000,
    )
    assert huge_batch == facts[0]


def test_the_server_moves_sigma_only_within_the_banks_bounds(
    checkpoint: EncoderCheckpoint, data: Path, tmp_path: Path
) -> None:
    policy = PrivacyPolicy(min_planned_rounds=3, max_local_epochs=1.0, accountant="rdp")

    def charge(name: str, rounds: int, **plan: Any) -> dict[str, Any]:
        bank = BankSettings("b", data, tmp_path / name, policy)
        train_round(bank, _instructions(checkpoint, 1, rounds, **plan), checkpoint.arrays, None, 1)
        return _charges(tmp_path / name)[0]["dp_events"][0]

    asked_for_one_round = charge("one", 1)
    planned = charge("three", 3)
    assert asked_for_one_round == planned  # the horizon is at least min-planned-rounds
    many_epochs = charge("epochs", 3, local_epochs=50.0)
    assert many_epochs["steps"] == policy.batches_per_epoch  # clamped to max-local-epochs
    assert charge("batch", 3, batch_size=8)["noise_multiplier"] == planned["noise_multiplier"]


# --- the noise actually applied -----------------------------------------------------------


def test_every_step_applies_noise_of_scale_sigma_c_over_b_even_on_empty_batches(
    checkpoint: EncoderCheckpoint, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measured on the gradients each step hands to Adam, not taken from the accountant.

    With q = 1/1000 a batch holds about one loan and is often empty; the clipped sum is
    then at most a few C, while the noise is σC·√d: the spread is the noise's.
    """
    empty_steps: list[int] = []
    real_noise_only_step = dp_training._noise_only_step

    def counting(*args: Any) -> None:
        empty_steps.append(1)
        real_noise_only_step(*args)

    monkeypatch.setattr(dp_training, "_noise_only_step", counting)
    policy = PrivacyPolicy(
        epsilon_budget=1e6, min_noise_multiplier=2.0, sample_rate=0.001, max_local_epochs=1.0
    )
    bank = BankSettings("b", data, tmp_path / "state", policy)
    spreads: list[float] = []
    instructions = _instructions(checkpoint, 1, 1, local_epochs=0.03, batch_size=64)
    train_round(
        bank,
        instructions,
        checkpoint.arrays,
        None,
        1,
        observe_step=lambda grads: spreads.append(
            float(torch.cat([g.flatten() for g in grads]).std())
        ),
    )
    expected = 2.0 * policy.max_grad_norm / 64
    assert len(spreads) == 30 and empty_steps  # every step seen, some of them empty
    assert all(abs(spread / expected - 1) < 0.1 for spread in spreads), spreads
    assert _charges(tmp_path / "state")[0]["dp_events"][0]["steps"] == 30


# --- crash order and races ------------------------------------------------------------------


def _run_round(spec: dict[str, Any], spec_path: Path) -> subprocess.Popen[bytes]:
    spec_path.write_text(json.dumps(spec))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.harness.bank_round", str(spec_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_crash_at_any_step_charges_at_least_what_ran(
    point: str, checkpoint: EncoderCheckpoint, pretrained: Pretrained, data: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    spec = {
        "data": str(data),
        "state": str(state),
        "encoder": str(pretrained.checkpoint_dir),
        "round": 1,
        "rounds": 3,
        "federation": "f-1",
        "run": 1,
        "kill_at": point,
        "policy": {"accountant": "rdp"},  # fast calibration; the crash order is the same
    }
    process = _run_round(spec, tmp_path / "spec.json")
    try:
        assert process.wait(timeout=120) == -9  # it died where it was told to
    finally:
        stop(process)
    charges = _charges(state)
    head_changed = (state / "head.npz").exists()
    assert len(charges) == (0 if point == "before-charge" else 1)
    assert not head_changed or charges  # the head never moves uncharged
    # The same round asked again (a restarted server): replayed or declined, never re-paid.
    bank = BankSettings("bank-test", data, state, PrivacyPolicy(accountant="rdp"))
    instructions = replace(_instructions(checkpoint, 1, 3), federation_id="f-1")
    try:
        train_round(bank, instructions, checkpoint.arrays, None, 2)
    except PrivacyBudgetError:
        assert point in ("after-charge", "after-training")  # charged, nothing to replay
    assert len(_charges(state)) == 1


def test_two_processes_on_one_state_dir_never_spend_more_than_the_budget(
    pretrained: Pretrained, data: Path, tmp_path: Path
) -> None:
    """Each alone would spend nearly the whole budget in its round; both start together."""
    policy = {"epsilon_budget": 1.0, "min_planned_rounds": 1, "accountant": "rdp"}
    go = tmp_path / "go"
    processes = [
        _run_round(
            {
                "data": str(data),
                "state": str(tmp_path / "state"),
                "encoder": str(pretrained.checkpoint_dir),
                "round": 1,
                "rounds": 1,
                "federation": f"f-{i}",
                "run": i + 1,
                "policy": policy,
                "start_after": str(go),
            },
            tmp_path / f"spec-{i}.json",
        )
        for i in range(2)
    ]
    try:
        time.sleep(8)  # both have imported torch and opacus and wait at the start line
        go.touch()
        outcomes = []
        for process in processes:
            out, _ = process.communicate(timeout=180)
            outcomes.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for process in processes:
            stop(process)
    events = PrivacyLedger(tmp_path / "state").dp_events()
    assert [o["status"] for o in outcomes].count("ok") >= 1
    assert dp_accounting_epsilon(events, 1e-5, "pld") <= 1.0 * 1.02  # PLD vs PRV grid
    assert all(o.get("epsilon", 0) <= 1.0 for o in outcomes)


# --- the train/test split -----------------------------------------------------------------


def test_removing_one_loan_from_a_single_file_moves_only_that_loan(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    bank = pretrained.split.banks[0]
    loans = pd.concat([bank.train, bank.test], ignore_index=True)
    key = BankState(tmp_path / "state").split_key()
    label = pretrained.source.label

    def split(frame: pd.DataFrame) -> tuple[set[str], set[str]]:
        path = tmp_path / "loans.csv"
        frame.to_csv(path, index=False)
        (train, _), (test, _) = load_bank_tables(path, label, 0.25, key)
        return set(train.astype(str).agg("|".join, axis=1)), set(
            test.astype(str).agg("|".join, axis=1)
        )

    train, test = split(loans)
    shuffled_train, _ = split(loans.sample(frac=1.0, random_state=3))
    assert shuffled_train == train  # row order plays no part
    for removed in (0, 17, len(loans) - 1):
        fewer_train, fewer_test = split(loans.drop(index=removed))
        assert len(train ^ fewer_train) + len(test ^ fewer_test) == 1
    assert 0.18 < len(test) / len(loans) < 0.32
    other_key = BankState(tmp_path / "other").split_key()
    assert other_key != key
    path = tmp_path / "loans.csv"
    loans.to_csv(path, index=False)
    (_, _), (other_test, _) = load_bank_tables(path, label, 0.25, other_key)
    assert set(other_test.astype(str).agg("|".join, axis=1)) != test


def test_the_validation_slice_is_keyed_apart_from_test_and_moves_only_the_removed_loan(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    """As `load_bank_splits` takes it: a second keyed hash over the training side only."""
    bank = pretrained.split.banks[0]
    loans = pd.concat([bank.train, bank.test], ignore_index=True)
    key = BankState(tmp_path / "state").split_key()
    label = pretrained.source.label

    def split(frame: pd.DataFrame) -> tuple[set[str], ...]:
        path = tmp_path / "loans.csv"
        frame.to_csv(path, index=False)
        (train, _), (test, _) = load_bank_tables(path, label, 0.25, key)
        validation = keyed_validation_mask(train, key, 0.2)
        return tuple(
            set(part.astype(str).agg("|".join, axis=1))
            for part in (train[~validation], train[validation], test)
        )

    train, validation, test = split(loans)
    assert not validation & test and not validation & train
    assert 0.12 < len(validation) / len(loans) < 0.2  # 20% of the 75% training side
    assert split(loans.sample(frac=1.0, random_state=5)) == (train, validation, test)
    for removed in (0, 17, len(loans) - 1):
        fewer = split(loans.drop(index=removed))
        moved = sum(len(a ^ b) for a, b in zip((train, validation, test), fewer, strict=True))
        assert moved == 1


def test_the_serving_choice_stays_in_the_bank_and_is_not_charged(
    pretrained: Pretrained, checkpoint: EncoderCheckpoint, data: Path, tmp_path: Path
) -> None:
    """Choice, validation metrics and calibration are local: no reply carries any of them."""
    context = bank_context(data, tmp_path / "state")
    assert status(send(train_message(checkpoint), context)) == "ok"
    settings = settings_from_node_config(dict(context.node_config))
    choice = choose_served_model(settings, pretrained.checkpoint_dir, pretrained.checkpoint_dir)
    entries = PrivacyLedger(tmp_path / "state").entries()
    reply = send(train_message(checkpoint, message_type="evaluate"), context)
    assert set(reply.content.keys()) == {"metrics", "status"}
    assert dict(reply.content.metric_records["metrics"]) == {
        EPSILON: entries[-1]["epsilon_cumulative"]
    }
    private = {
        choice["calibration"]["slope"],
        choice["calibration"]["intercept"],
        choice["validation"]["public"]["auc"],
        choice["validation"]["federated"]["auc"],
    }
    sent = [*reply.content.metric_records["metrics"].values()]
    sent += [*reply.content.config_records["status"].values()]
    assert not private & set(sent)
    after = PrivacyLedger(tmp_path / "state").entries()
    assert [e["kind"] for e in after[len(entries) :]] == ["evaluate"]  # the choice: no entry
    assert after[-1]["epsilon_cumulative"] == entries[-1]["epsilon_cumulative"]


def test_the_split_key_is_readable_only_by_the_bank(tmp_path: Path) -> None:
    BankState(tmp_path).split_key()
    assert (tmp_path / "split.key").stat().st_mode & 0o077 == 0


# --- the release guard on its own ---------------------------------------------------------


def _guarded_app(reply_content: RecordDict) -> ClientApp:
    """A ClientApp whose handlers return `reply_content`, behind the real release guard."""
    app = ClientApp(mods=[release_guard])

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return Message(reply_content, reply_to=message)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return Message(reply_content, reply_to=message)

    return app


def _ok_status(**extra: Any) -> ConfigRecord:
    return ConfigRecord({"status": "ok", "bank": "b", **extra})


def _head_arrays() -> ArrayRecord:
    return to_array_record(OrderedDict({"head.layers.weight": np.zeros((1, 32), np.float32)}))


GUARDED_REPLIES: dict[str, tuple[str, Any]] = {
    "head arrays": ("train", lambda enc: {"arrays": _head_arrays(), "status": _ok_status()}),
    "encoder plus a head array": (
        "train",
        lambda enc: {
            "arrays": to_array_record(
                OrderedDict([*enc.items(), ("head.bias", np.zeros(1, np.float32))])
            ),
            "status": _ok_status(),
        },
    ),
    "an exact auc": (
        "evaluate",
        lambda enc: {"metrics": MetricRecord({"auc": 0.71}), "status": _ok_status()},
    ),
    "a count in an evaluation": (
        "evaluate",
        lambda enc: {"metrics": MetricRecord({"num-examples": 1462}), "status": _ok_status()},
    ),
    "arrays in an evaluation": (
        "evaluate",
        lambda enc: {"arrays": to_array_record(enc), "status": _ok_status()},
    ),
    "an extra record": (
        "train",
        lambda enc: {"status": _ok_status(), "rows": ConfigRecord({"first": "loan 1"})},
    ),
    "a reason with the error text": (
        "train",
        lambda enc: {
            "status": ConfigRecord(
                {"status": "declined", "reason": "DataError: 'int_rate' must be numeric"}
            )
        },
    ),
    "an extra status key": ("train", lambda enc: {"status": _ok_status(path="/bank/data.csv")}),
    "a wrong dtype": (
        "train",
        lambda enc: {
            "arrays": to_array_record(
                OrderedDict((k, v.astype(np.float64)) for k, v in enc.items())
            ),
            "status": _ok_status(),
        },
    ),
}


@pytest.mark.parametrize("case", sorted(GUARDED_REPLIES))
def test_the_release_guard_stops_every_reply_outside_the_protocol(
    case: str, checkpoint: EncoderCheckpoint, data: Path, tmp_path: Path
) -> None:
    message_type, make = GUARDED_REPLIES[case]
    content = RecordDict(make(checkpoint.arrays))
    app = _guarded_app(content)
    reply = app(train_message(checkpoint, message_type=message_type), bank_context(data, tmp_path))
    assert set(reply.content.keys()) == {"status"}
    assert dict(reply.content.config_records["status"]) == {
        "status": "declined",
        "reason": REASON_GUARD,
    }


def test_the_release_guard_lets_an_honest_reply_through(
    checkpoint: EncoderCheckpoint, data: Path, tmp_path: Path
) -> None:
    content = RecordDict(
        {
            "arrays": to_array_record(checkpoint.arrays),
            "metrics": MetricRecord({EPSILON: 0.4}),
            "status": _ok_status(**{"ledger-seq": 2, "ledger-head": "ab" * 32}),
        }
    )
    reply = _guarded_app(content)(train_message(checkpoint), bank_context(data, tmp_path))
    assert status(reply) == "ok" and "arrays" in reply.content.array_records


def test_the_real_client_app_sends_nothing_its_worker_adds_beyond_the_protocol(
    checkpoint: EncoderCheckpoint, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard is wired into the bank's ClientApp: a worker bug that returned the head
    and an exact count is stopped before the reply leaves."""
    import fedfin.client.client_app as client_app
    from fedfin.client.bank_worker import BankReply

    def leaky(*args: Any, **kwargs: Any) -> BankReply:
        arrays = OrderedDict(checkpoint.arrays)
        arrays["head.layers.weight"] = np.zeros((1, 32), np.float32)
        return BankReply(arrays, {EPSILON: 0.1, "rows": 1462}, 1, "00" * 32)

    monkeypatch.setattr(client_app, "train_round", leaky)
    reply = client_app.build_client_app()(train_message(checkpoint), bank_context(data, tmp_path))
    assert set(reply.content.keys()) == {"status"}
    assert reply.content.config_records["status"]["reason"] == REASON_GUARD


def test_a_node_config_that_fixes_the_noise_seed_is_refused(tmp_path: Path) -> None:
    """A fixed noise seed would let whoever learns it regenerate and remove the DP noise."""
    config = {"data-path": str(tmp_path / "loans.csv"), "state-dir": str(tmp_path / "state")}
    assert settings_from_node_config(config).noise_seed is None
    with pytest.raises(ConfigError, match="'noise-seed' is refused"):
        settings_from_node_config({**config, "noise-seed": 7})
