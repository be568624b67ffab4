"""Secure aggregation on real messages: the banks' real ClientApps (Flower's SecAgg+ mod,
fedfin's release guard, DP training) and the server's real round, through Flower's wire
format in one process (tests/harness/secure_grid.py)."""

import json
import sys
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from fedfin.client.bank_state import BankState
from fedfin.client.client_app import build_client_app
from fedfin.client.release import array_sha256
from fedfin.client.release_guard import reply_problem
from fedfin.common.accounting import DpEvent, epsilon_spent
from fedfin.common.audit import audit_state_dir
from fedfin.common.checkpoint import EncoderCheckpoint
from fedfin.common.config import FederationConfig, TrainPlanConfig
from fedfin.common.errors import ConfigError
from fedfin.common.protocol import ARRAYS, LEDGER_SEQ, STATUS, RoundInstructions
from fedfin.common.secure_aggregation import (
    COLLECT,
    MODULUS_RANGE,
    QUANTIZATION_RANGE,
    SECAGG,
    SETUP,
    mask_generator,
    quantisation_error_bound,
)
from fedfin.common.shared_weights import to_array_record
from fedfin.server.federation import run_federation
from fedfin.server.secure_aggregation import secure_train_round
from fedfin.server.server_app import federation_config_from_run_config
from fedfin.simulations.audit_report import audit_table
from fedfin.simulations.cli import main as fedfin_main
from tests.conftest import Pretrained, write_bank_data
from tests.harness.messages import server_identity, status
from tests.harness.secure_grid import InProcessGrid, bank_contexts

FEDERATION = "fed-secagg"
CLIP = 8.0
# Fast calibration and 5 DP steps a round: masking and unmasking do not depend on either.
POLICY = {"accountant": "rdp", "max-local-epochs": 0.25}


@pytest.fixture(autouse=True)
def _server_identity() -> Iterator[None]:
    with server_identity():
        yield


@pytest.fixture(scope="module")
def bank_data(pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("secagg-banks")
    return [write_bank_data(pretrained, i, root / f"bank-{i}") for i in range(5)]


def _grid(data: list[Path], tmp_path: Path, n: int, drop=None, **policy: object) -> InProcessGrid:  # type: ignore[no-untyped-def]
    banks = [(data[i], tmp_path / f"state-{i}") for i in range(n)]
    return InProcessGrid(bank_contexts(banks, **{**POLICY, **policy}), build_client_app(), drop)


def _train_messages(
    checkpoint: EncoderCheckpoint,
    nodes: list[int],
    federation: str = FEDERATION,
    plan: TrainPlanConfig | None = None,
) -> list[Message]:
    plan, schema, model = plan or TrainPlanConfig(), checkpoint.schema, checkpoint.model_config
    config = RoundInstructions(1, 1, plan, schema, model, federation_id=federation).to_config()
    content = RecordDict(
        {ARRAYS: to_array_record(checkpoint.arrays), "config": ConfigRecord(config)}  # type: ignore[arg-type]
    )
    return [Message(content, dst_node_id=n, message_type="train") for n in nodes]


def _plain_update(
    grid: InProcessGrid,
    node: int,
    encoder: OrderedDict[str, np.ndarray],
    federation: str = FEDERATION,
) -> OrderedDict[str, np.ndarray]:
    """What the bank computed, from its own state (the server never had it)."""
    state_dir = Path(str(grid.contexts[node].node_config["state-dir"]))
    saved = BankState(state_dir).last_release(federation, 1)
    assert saved is not None
    return OrderedDict((k, np.asarray(saved[0][k], np.float64) - encoder[k]) for k in encoder)


def _max_error(got: dict[str, np.ndarray], want: list[OrderedDict[str, np.ndarray]]) -> float:
    return max(float(np.abs(got[k] - np.mean([w[k] for w in want], axis=0)).max()) for k in got)


def test_the_server_holds_only_masked_vectors_and_moves_the_encoder_by_the_plain_mean(
    checkpoint: EncoderCheckpoint, bank_data: list[Path], tmp_path: Path
) -> None:
    """One secure round of the federation loop over 3 banks (threshold 2)."""
    grid = _grid(bank_data, tmp_path, 3)
    nodes = list(grid.contexts)
    config = FederationConfig(num_rounds=1, secure_aggregation=True, round_timeout=60.0)
    out = tmp_path / "server"
    result = run_federation(grid, config, checkpoint, None, out)

    summary = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert summary["aggregated"] is True and summary["banks_trained"] == 3
    assert summary["secure_aggregation"]["contributors"] == 3
    assert summary["secure_aggregation"]["threshold"] == 2
    federation = summary["federation_id"]
    plain = {n: _plain_update(grid, n, checkpoint.arrays, federation) for n in nodes}
    # Nothing the server received carries arrays; every masked vector looks nothing like
    # its bank's quantised update, and is what the bank's ledger recorded before sending.
    assert all(not reply.content.array_records for _, reply in grid.received)
    masked = {r.metadata.src_node_id: r for stage, r in grid.received if stage == COLLECT}
    assert set(masked) == set(nodes)
    for node, reply in masked.items():
        blobs = reply.content.config_records[SECAGG][Key.MASKED_PARAMETERS]
        vectors = [bytes_to_ndarray(b) for b in blobs]  # type: ignore[union-attr]
        quantised = np.concatenate(
            [
                np.round((np.clip(u, -CLIP, CLIP) + CLIP) * QUANTIZATION_RANGE / (2 * CLIP)).ravel()
                for u in plain[node].values()
            ]
        )
        sent = np.concatenate([v.ravel() for v in vectors[1:]]).astype(np.float64)
        assert np.mean(np.abs(sent - quantised) <= 2) < 0.01
        assert 0.3 * MODULUS_RANGE < sent.mean() < 0.7 * MODULUS_RANGE  # uniform, not ~2^21
        ledger = BankState(Path(str(grid.contexts[node].node_config["state-dir"]))).ledger
        entry = next(e for e in ledger.entries() if e["kind"] == "secagg-masked")
        assert entry["masked_sha256"] == [array_sha256(v) for v in vectors]
        assert entry["seq"] == reply.content.config_records[STATUS][LEDGER_SEQ]
    # The new encoder is the start plus the plain mean update: one quantisation step
    # (2c/2^22) and float32 rounding apart.
    for key, start in checkpoint.arrays.items():
        want = start + np.mean([plain[n][key] for n in nodes], axis=0)
        np.testing.assert_allclose(
            result.final_arrays[key], want, rtol=0, atol=quantisation_error_bound(CLIP) + 1e-6
        )

    # Asking again for the same round: every bank refuses to send its update a second time
    # (two sums over different sets of banks would give it away).
    again = secure_train_round(
        grid, _train_messages(checkpoint, nodes, federation), 1, 0, CLIP, None
    )
    assert again.failure == (
        "secure aggregation needs 2 of 3 banks to reconstruct the sum; "
        "only 0 remained after the 'collect_masked_vectors' stage"
    )


def test_dropouts_within_the_threshold_are_tolerated(
    checkpoint: EncoderCheckpoint, bank_data: list[Path], tmp_path: Path
) -> None:
    """5 banks, threshold 3: one vanishes before masking, one after sending its vector."""
    drops = {(105, COLLECT), (104, "unmask")}
    grid = _grid(bank_data, tmp_path, 5, drop=lambda node, stage: (node, stage) in drops)
    nodes = list(grid.contexts)
    result = secure_train_round(grid, _train_messages(checkpoint, nodes), 1, 0, CLIP, None)

    assert result.failure is None and result.threshold == 3
    assert result.contributors == 4 and result.dropped == [105]
    plain = [_plain_update(grid, n, checkpoint.arrays) for n in (101, 102, 103, 104)]
    assert result.mean_update is not None
    assert _max_error(result.mean_update, plain) <= quantisation_error_bound(CLIP)


def test_a_round_with_too_few_banks_left_fails_with_one_clear_message(
    checkpoint: EncoderCheckpoint, pretrained: Pretrained, bank_data: list[Path], tmp_path: Path
) -> None:
    """Through the federation loop: the round is not aggregated and says why, in one line."""
    grid = _grid(
        bank_data, tmp_path, 3, drop=lambda node, stage: node != 101 and stage == "share_keys"
    )
    config = FederationConfig(num_rounds=1, secure_aggregation=True)
    out = tmp_path / "server"
    result = run_federation(grid, config, checkpoint, None, out)

    summary = json.loads((out / "rounds.jsonl").read_text().splitlines()[0])
    assert summary["aggregated"] is False
    assert summary["secure_aggregation"]["failure"] == (
        "secure aggregation needs 2 of 3 banks to reconstruct the sum; "
        "only 1 remained after the 'share_keys' stage"
    )
    for key, array in checkpoint.arrays.items():
        np.testing.assert_array_equal(result.final_arrays[key], array)
    assert not any(stage == COLLECT for stage, _ in grid.received)  # nobody trained


@pytest.mark.parametrize(
    ("threshold", "banks", "node_min"),
    [(2, 3, 3), (2, 5, 2)],
    ids=["below the bank's secagg-min-banks", "not a strict majority"],
)
def test_a_bank_refuses_a_setup_that_would_expose_too_small_a_sum(
    threshold: int, banks: int, node_min: int, bank_data: list[Path], tmp_path: Path
) -> None:
    grid = _grid(bank_data, tmp_path, 1, **{"secagg-min-banks": node_min})
    setup = ConfigRecord(
        {
            "stage": SETUP,
            Key.SAMPLE_NUMBER: banks,
            Key.SHARE_NUMBER: banks,
            Key.THRESHOLD: threshold,
            Key.CLIPPING_RANGE: CLIP,
            Key.TARGET_RANGE: QUANTIZATION_RANGE,
            Key.MOD_RANGE: MODULUS_RANGE,
            Key.MAX_WEIGHT: 1.0,
        }
    )
    message = Message(RecordDict({SECAGG: setup}), dst_node_id=101, message_type="train")
    (reply,) = grid.send_and_receive([message])
    assert status(reply) == "declined"
    assert SECAGG not in reply.content.config_records


def test_the_release_guard_lets_no_plain_update_out_of_a_secure_round(
    checkpoint: EncoderCheckpoint,
) -> None:
    (request,) = _train_messages(checkpoint, [101])
    request.content[SECAGG] = ConfigRecord({"stage": COLLECT})
    ok = ConfigRecord({"status": "ok", "bank": "b"})
    shapes = [(1,), *(a.shape for a in checkpoint.arrays.values())]
    as_floats = [ndarray_to_bytes(np.zeros(s, np.float32)) for s in shapes]
    replies = {
        "the plain encoder": RecordDict({STATUS: ok, ARRAYS: to_array_record(checkpoint.arrays)}),
        "float vectors": RecordDict(
            {STATUS: ok, SECAGG: ConfigRecord({Key.MASKED_PARAMETERS: as_floats})}
        ),
    }
    for what, content in replies.items():
        assert reply_problem(request, Message(content, reply_to=request), COLLECT), what
    plain_request = _train_messages(checkpoint, [101])[0]
    masked_in_plain = RecordDict(
        {STATUS: ok, SECAGG: ConfigRecord({Key.MASKED_PARAMETERS: as_floats})}
    )
    assert reply_problem(plain_request, Message(masked_in_plain, reply_to=plain_request))


def test_trimmed_mean_with_secure_aggregation_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="cannot be combined with secure-aggregation"):
        federation_config_from_run_config({"strategy": "fedtrimmedavg", "secure-aggregation": True})
    with pytest.raises(ConfigError, match="'secure-aggregation' must be true or false"):
        federation_config_from_run_config({"secure-aggregation": "maybe"})
    code = fedfin_main(
        [
            "simulate",
            "--secure-aggregation",
            "--strategy",
            "fedtrimmedavg",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "fedtrimmedavg" in err and "secure-aggregation" in err


def test_conservative_distributed_dp_states_both_guarantees_and_is_charged_its_own_noise(
    checkpoint: EncoderCheckpoint, bank_data: list[Path], tmp_path: Path
) -> None:
    """K = 2 from the banks' own node config; a multi-step round: statement only."""
    grid = _grid(bank_data, tmp_path, 2, **{"distributed-dp": True, "secagg-min-banks": 2})
    nodes = list(grid.contexts)
    result = secure_train_round(grid, _train_messages(checkpoint, nodes), 1, 0, CLIP, None)
    assert result.failure is None and result.contributors == 2

    state_dir = Path(str(grid.contexts[101].node_config["state-dir"]))
    entries = BankState(state_dir).ledger.entries()
    assert [e["kind"] for e in entries] == ["charge", "train", "secagg-masked"]
    charge = entries[0]
    facts = charge["distributed_dp"]  # in the charge itself: fsync'ed before training
    assert (
        facts["min_banks"] == 2
        and facts["threshold"] == 2
        and facts["enforced"] == "against-server"
    )
    assert "honest-but-curious server" in facts["trust_assumption"]
    assert "at least K honest banks" in facts["trust_assumption"]
    (local,) = charge["dp_events"]
    assert facts["local_event"] == local
    assert facts["sum_event"]["noise_multiplier"] == pytest.approx(
        local["noise_multiplier"] * 2**0.5
    )
    # Against the server (secure aggregation broken): what the budget was charged.
    assert facts["epsilon_against_server"] == pytest.approx(charge["epsilon_cumulative"])
    # Against a recipient of the sum only: the same steps at σ·√2, recomputed here.
    sum_only = DpEvent(**{**local, "noise_multiplier": local["noise_multiplier"] * 2**0.5})
    expected = epsilon_spent([sum_only], charge["delta"], "rdp")
    assert facts["epsilon_against_aggregate"] == pytest.approx(expected)
    assert facts["epsilon_against_aggregate"] < 0.8 * facts["epsilon_against_server"]

    audit = audit_state_dir(state_dir)  # from the ledger alone, with dp-accounting's PLD
    assert audit.ok and audit.distributed_rounds == 1 and audit.aggregate_charged_rounds == 0
    tight = epsilon_spent([sum_only], charge["delta"], "prv")  # the bank here used RDP
    assert audit.epsilon_against_aggregate == pytest.approx(tight, rel=0.05)
    own = epsilon_spent([DpEvent(**local)], charge["delta"], "prv")
    assert audit.epsilon_pld == pytest.approx(own, rel=0.05)
    assert audit.epsilon_against_server == pytest.approx(audit.epsilon_pld)
    assert "distributed DP in 1 round(s), each charged for the bank's own" in audit_table([audit])

    # The same bank in a plain round adds its full noise and states nothing distributed.
    plain = _train_messages(checkpoint, [101], federation="plain-federation")
    grid.send_and_receive(plain)
    assert [e["kind"] for e in BankState(state_dir).ledger.entries()][3:] == ["charge", "train"]


def test_a_fedsgd_bank_adds_a_noise_share_and_is_charged_for_the_sum_only_in_a_secure_round(
    checkpoint: EncoderCheckpoint, bank_data: list[Path], tmp_path: Path
) -> None:
    """3 banks, each with K = 3 and aggregate accounting; the server asks fedsgd."""
    policy = {
        "distributed-dp": True,
        "distributed-dp-accounting": "aggregate",
        "distributed-dp-server-budget": 6.0,
        "secagg-min-banks": 3,
        "min-noise-multiplier": 1.0,  # the share's floor; also keeps the audit's PLD quick
    }
    grid = _grid(bank_data, tmp_path, 3, **policy)
    nodes = list(grid.contexts)
    fedsgd = TrainPlanConfig(mode="fedsgd", learning_rate=0.5)
    messages = _train_messages(checkpoint, nodes, plan=fedsgd)
    result = secure_train_round(grid, messages, 1, 3, CLIP, None)
    assert result.failure is None and result.contributors == 3

    state_dir = Path(str(grid.contexts[101].node_config["state-dir"]))
    entries = BankState(state_dir).ledger.entries()
    assert [e["kind"] for e in entries] == ["charge", "train", "secagg-masked"]
    charge = entries[0]
    facts = charge["distributed_dp"]
    (charged,) = charge["dp_events"]  # one step, at the noise the 3-bank sum carries
    assert charged["steps"] == 1 and facts["enforced"] == "aggregate"
    assert facts["sum_event"] == charged and facts["server_budget"] == 6.0
    share = facts["local_event"]["noise_multiplier"]
    assert share == pytest.approx(charged["noise_multiplier"] / 3**0.5)
    assert share >= 1.0  # the bank's own noise keeps the policy's floor
    assert charge["epsilon_cumulative"] == pytest.approx(
        epsilon_spent([DpEvent(**charged)], charge["delta"], "rdp")
    )
    assert charge["epsilon_cumulative"] < facts["epsilon_against_server"] <= 6.0
    audit = audit_state_dir(state_dir)
    assert audit.ok and audit.aggregate_charged_rounds == 1
    # the bank's RDP figure bounds dp-accounting's tight PLD one from above
    against_server = facts["epsilon_against_server"]
    assert 0.6 * against_server < audit.epsilon_against_server <= against_server
    assert audit.epsilon_against_server > 1.2 * audit.epsilon_pld
    assert "1 of them charged for the K-bank sum's noise" in audit_table([audit])

    # A plain fedsgd round (no verified secure setup): full noise, charged as such.
    plain = _train_messages(checkpoint, [101], federation="plain-federation", plan=fedsgd)
    grid.send_and_receive(plain)
    plain_charge = BankState(state_dir).ledger.entries()[3]
    assert plain_charge["kind"] == "charge" and "distributed_dp" not in plain_charge


def test_masks_use_the_whole_seed_where_flowers_generator_uses_32_bits() -> None:
    """Two seeds whose 4-byte words fold (XOR) to the same 32 bits get the same masks from
    Flower's generator; the banks' SecAgg+ mod and the server use fedfin's instead."""
    zero = bytes(32)
    folds_to_zero = (1).to_bytes(4, "little") * 2 + bytes(24)
    shapes = [(1,), (3, 4)]
    flowers = [pseudo_rand_gen(seed, MODULUS_RANGE, shapes) for seed in (zero, folds_to_zero)]
    assert all(np.array_equal(a, b) for a, b in zip(*flowers, strict=True))
    ours = [mask_generator(seed, MODULUS_RANGE, shapes) for seed in (zero, folds_to_zero)]
    assert not np.array_equal(ours[0][1], ours[1][1])
    assert [m.shape for m in ours[0]] == shapes
    assert all(m.min() >= 0 and m.max() < MODULUS_RANGE for m in ours[0])
    flowers_mod = sys.modules["flwr.client.mod.secure_aggregation.secaggplus_mod"]
    assert flowers_mod.pseudo_rand_gen is mask_generator  # what the banks' SecAgg+ mod calls


def test_a_collect_request_without_a_verified_setup_trains_nothing(
    checkpoint: EncoderCheckpoint, bank_data: list[Path], tmp_path: Path
) -> None:
    """A server that skips setup (no threshold the bank checked) gets a dropout, not data."""
    grid = _grid(bank_data, tmp_path, 1)
    (message,) = _train_messages(checkpoint, [101])
    message.content[SECAGG] = ConfigRecord(
        {"stage": COLLECT, Key.CIPHERTEXT_LIST: [], Key.SOURCE_LIST: []}
    )
    (reply,) = grid.send_and_receive([message])
    assert status(reply) == "declined" and SECAGG not in reply.content.config_records
    state_dir = Path(str(grid.contexts[101].node_config["state-dir"]))
    assert BankState(state_dir).ledger.entries() == []  # nothing charged, nothing trained
