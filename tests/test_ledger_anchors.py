"""The server keeps an outside record of every bank's ledger head, and survives error replies."""

import hashlib
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedfin.common.audit import audit_path
from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.config import FederationConfig
from fedfin.common.errors import ConfigError, LedgerError
from fedfin.common.ledger import PrivacyLedger
from fedfin.common.ledger_anchors import ANCHORS_FILE, read_anchors
from fedfin.server.federation import _set_weights
from fedfin.server.round_summary import RoundSummary, note_evaluate_reply, note_train_reply
from fedfin.server.strategy import WEIGHT_KEY, build_strategy
from tests.conftest import Pretrained, write_bank_data
from tests.harness.messages import bank_context, send, server_identity, train_message


def _request(node: int, kind: str) -> Message:
    with server_identity():
        return Message(content=RecordDict(), dst_node_id=node, message_type=kind)


def _reply(
    node: int,
    kind: str,
    status: Mapping[str, object],
    metrics: Mapping[str, object] | None = None,
    weights: float = 0.0,
) -> Message:
    """A bank's reply as the server receives it: status, metrics and (train) encoder arrays."""
    records: dict[str, object] = {"status": ConfigRecord(dict(status))}  # type: ignore[arg-type]
    if metrics is not None:
        records["metrics"] = MetricRecord(dict(metrics))  # type: ignore[arg-type]
    if kind == "train" and status.get("status") == "ok":
        array = np.full((2, 2), weights, np.float32)
        records["arrays"] = ArrayRecord(OrderedDict({"w": Array(array)}))
    return Message(RecordDict(records), reply_to=_request(node, kind))  # type: ignore[arg-type]


def _error_reply(node: int, kind: str) -> Message:
    """What Flower hands the server when a bank's ClientApp failed: no content at all."""
    return Message(Error(code=0, reason="ClientApp raised"), reply_to=_request(node, kind))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _entry_sha(ledger_line: str) -> str:
    """The ledger's hash rule, written out here: sha256 of sorted compact JSON without `hash`."""
    body = {k: v for k, v in json.loads(ledger_line).items() if k != "hash"}
    return _sha(json.dumps(body, sort_keys=True, separators=(",", ":")))


def _anchor_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_reply_with_a_ledger_head_is_recorded_as_it_arrives(tmp_path: Path) -> None:
    anchors = tmp_path / ANCHORS_FILE
    summary = RoundSummary(3, banks={}, aggregated=False, anchor_file=anchors)
    ok = {"status": "ok", "bank": "bank-a", "ledger-seq": 5, "ledger-head": _sha("a5")}
    declined = {
        "status": "declined",
        "bank": "bank-b",
        "reason": "privacy budget spent",
        "ledger-seq": 2,
        "ledger-head": _sha("b2"),
    }
    assert note_train_reply(summary, _reply(1, "train", ok, {"epsilon": 0.4}))
    assert len(_anchor_lines(anchors)) == 1  # written per reply, not at the end of the round
    assert not note_train_reply(summary, _reply(2, "train", declined))
    old_bank = {"status": "ok", "bank": "bank-c"}  # no anchor: recorded as nothing, no crash
    assert note_train_reply(summary, _reply(3, "train", old_bank, {"epsilon": 0.1}))
    after_eval = {**ok, "ledger-seq": 6, "ledger-head": _sha("a6")}
    note_evaluate_reply(summary, _reply(1, "evaluate", after_eval, {"epsilon": 0.4}))
    assert _anchor_lines(anchors) == [
        {"bank": "bank-a", "node_id": 1, "kind": "train", "server_round": 3, "seq": 5,
         "head": _sha("a5")},
        {"bank": "bank-b", "node_id": 2, "kind": "train", "server_round": 3, "seq": 2,
         "head": _sha("b2")},
        {"bank": "bank-a", "node_id": 1, "kind": "evaluate", "server_round": 3, "seq": 6,
         "head": _sha("a6")},
    ]  # fmt: skip
    per_bank = summary.as_dict()["per_bank"]
    assert (per_bank["bank-a"]["ledger_seq"], per_bank["bank-a"]["ledger_head"]) == (
        6,
        _sha("a6"),
    )
    assert per_bank["bank-b"]["ledger_seq"] == 2 and per_bank["bank-c"]["ledger_seq"] is None


def test_an_error_reply_is_noted_as_declined_without_touching_its_content(tmp_path: Path) -> None:
    summary = RoundSummary(1, banks={}, aggregated=False, anchor_file=tmp_path / ANCHORS_FILE)
    reply = _error_reply(4, "train")
    with pytest.raises(ValueError, match="content is None"):
        _ = reply.content  # what crashed note_train_reply before (issue 15)
    assert note_train_reply(summary, reply) is False
    note_evaluate_reply(summary, _error_reply(4, "evaluate"))
    row = summary.banks[4]
    assert not row.trained and row.train_status.startswith("error")
    assert not (tmp_path / ANCHORS_FILE).exists()
    assert summary.as_dict()["banks_declined"] == ["node-4: error: ClientApp raised"]


def test_round_auc_comes_only_from_dp_metrics_of_the_previous_global(tmp_path: Path) -> None:
    summary = RoundSummary(2, banks={}, aggregated=False)
    status = {"status": "ok", "bank": "bank-a"}
    dp = {"epsilon": 0.5, "dp-auc": 0.70, "dp-ks": 0.3, "dp-test-rows": 300}
    note_train_reply(summary, _reply(1, "train", status, dp))
    note_train_reply(
        summary,
        _reply(
            2, "train", {**status, "bank": "bank-b"}, {**dp, "dp-auc": 0.60, "dp-test-rows": 100}
        ),
    )
    # An old bank still sending exact evaluation metrics: the server does not keep them.
    note_evaluate_reply(summary, _reply(1, "evaluate", status, {"epsilon": 0.5, "auc": 0.99}))
    record = summary.as_dict()
    assert record["dp_auc_of_round"] == 1
    assert record["dp_mean_auc"] == pytest.approx(0.65)
    assert record["dp_worst_bank_auc"] == pytest.approx(0.60)
    assert record["dp_weighted_mean_auc"] == pytest.approx((0.7 * 300 + 0.6 * 100) / 400)
    assert "auc" not in record["per_bank"]["bank-a"]
    assert record["per_bank"]["bank-a"]["dp-auc"] == pytest.approx(0.70)


def _aggregate(replies: list[Message]) -> float:
    _set_weights(replies)
    arrays, _ = build_strategy(FederationConfig()).aggregate_train(1, replies)
    assert arrays is not None
    return float(arrays["w"].numpy().mean())


def test_noisy_counts_weight_the_mean_and_are_clipped_to_at_least_one() -> None:
    ok = {"status": "ok", "bank": "b"}
    replies = [
        _reply(1, "train", ok, {"epsilon": 0.5, "num-examples": 300}, weights=1.0),
        _reply(2, "train", ok, {"epsilon": 0.5, "num-examples": -4}, weights=301.0),
    ]
    assert _aggregate(replies) == pytest.approx((300 * 1.0 + 1 * 301.0) / 301)
    assert [r.content.metric_records["metrics"][WEIGHT_KEY] for r in replies] == [300.0, 1.0]


def test_a_withheld_count_or_dp_metrics_of_only_some_banks_still_aggregate() -> None:
    ok = {"status": "ok", "bank": "b"}
    replies = [
        _reply(1, "train", ok, {"epsilon": 0.5, "num-examples": 900, "dp-auc": 0.7}, weights=0.0),
        _reply(2, "train", ok, {"epsilon": 0.5}, weights=3.0),
        _reply(3, "train", ok, None, weights=6.0),  # no metrics record at all
    ]
    assert _aggregate(replies) == pytest.approx(3.0)  # uniform: one bank withholds its count
    for reply in replies:
        assert set(reply.content.metric_records["metrics"].keys()) == {WEIGHT_KEY}


def test_anchors_recorded_from_replies_catch_a_ledger_truncated_afterwards(tmp_path: Path) -> None:
    """Server and audit meet only through the anchors file: record, cut the ledger, audit."""
    state = tmp_path / "bank-a" / "state"
    ledger = PrivacyLedger(state)
    anchors = tmp_path / "server" / ANCHORS_FILE
    event = {"noise_multiplier": 2.0, "sample_rate": 0.01, "steps": 50, "max_grad_norm": 1.0}
    for server_round in (1, 2, 3):
        entry = ledger.append(
            {
                "bank": "bank-a",
                "run_id": 1,
                "server_round": server_round,
                "kind": "train",
                "dp_events": [event],
                "delta": 1e-5,
                "epsilon_budget": 10.0,
                "epsilon_cumulative": 5.0,
            }
        )
        head = _entry_sha(json.dumps(entry))
        status = {"status": "ok", "bank": "bank-a", "ledger-seq": entry["seq"], "ledger-head": head}
        summary = RoundSummary(server_round, banks={}, aggregated=False, anchor_file=anchors)
        note_train_reply(summary, _reply(1, "train", status, {"epsilon": 5.0}))
    [clean] = audit_path(state, read_anchors(tmp_path / "server"))
    assert not clean.ledger_broken and clean.anchors_checked == 3
    lines = ledger.path.read_text().splitlines(keepends=True)
    ledger.path.write_text("".join(lines[:2]))
    [cut] = audit_path(state, read_anchors(tmp_path / "server"))
    assert cut.ledger_broken and not cut.chain_broken
    assert cut.anchor_problems == [
        f"truncated: the server holds entry 3 (hash {head[:12]}…) from the round 3 train "
        "reply (node 1), but the ledger ends at entry 2"
    ]


def test_an_anchors_file_cut_mid_line_keeps_its_whole_lines_and_a_bad_line_is_an_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / ANCHORS_FILE
    line = {"bank": "b", "node_id": 1, "kind": "train", "server_round": 1, "seq": 1, "head": "ab"}
    path.write_text(json.dumps(line) + "\n" + json.dumps(line)[:20])  # the server died mid-write
    assert [a.seq for a in read_anchors(path)] == [1]
    path.write_text(json.dumps(line) + "\n" + json.dumps({**line, "seq": "two"}) + "\n")
    with pytest.raises(LedgerError, match="line 2 is not a ledger anchor"):
        read_anchors(path)
    (tmp_path / "server").mkdir()
    with pytest.raises(ConfigError, match=r"no ledger-anchors\.jsonl here or below"):
        read_anchors(tmp_path / "server")  # a wrong --anchors (exit 2), not a broken ledger


def test_the_real_banks_replies_anchor_its_ledger_and_a_rollback_is_caught(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    """Real ClientApp replies -> the server's note_* -> anchors file -> audit, end to end."""
    checkpoint = load_encoder_checkpoint(pretrained.checkpoint_dir)
    state = tmp_path / "bank-test" / "state"
    context = bank_context(write_bank_data(pretrained, 1, tmp_path / "data"), state)
    anchors = tmp_path / "server" / ANCHORS_FILE
    summary = RoundSummary(1, banks={}, aggregated=False, anchor_file=anchors)
    with server_identity():
        train = send(train_message(checkpoint), context)
        evaluate = send(train_message(checkpoint, message_type="evaluate"), context)
    assert note_train_reply(summary, train)
    note_evaluate_reply(summary, evaluate)
    ledger_lines = (state / "ledger.jsonl").read_text().splitlines()
    heads = [_entry_sha(line) for line in ledger_lines]
    recorded = _anchor_lines(anchors)
    assert [(a["kind"], a["seq"], a["head"]) for a in recorded] == [
        ("train", len(heads) - 1, heads[-2]),
        ("evaluate", len(heads), heads[-1]),
    ]
    [clean] = audit_path(state, read_anchors(anchors))
    assert clean.ok and clean.anchors_checked == 2
    # The bank rolls its ledger back to before the release and the evaluation.
    (state / "ledger.jsonl").write_text("".join(f"{line}\n" for line in ledger_lines[:-2]))
    [rolled_back] = audit_path(state, read_anchors(anchors))
    assert not rolled_back.chain_broken
    assert [p.split(":")[0] for p in rolled_back.anchor_problems] == ["truncated", "truncated"]
