"""The federation loop: R rounds of DP fine-tuning over the shared encoder.

Each round: send the global encoder (and the public source head, to start new private
heads) to the banks, aggregate the encoder updates of the banks that accepted, ask every
bank to evaluate the new encoder with its private head, then write the global encoder
checkpoint and the round's summary before the next round starts.

Every reply's ledger anchor (its bank's ledger sequence number and head hash) is appended to
`ledger-anchors.jsonl` as it arrives, across rounds, resumes and federations: the outside
record `fedfin audit --anchors` checks each bank's ledger against.
"""

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedfin.common.atomic import write_json_atomically
from fedfin.common.checkpoint import (
    EncoderCheckpoint,
    load_encoder_checkpoint,
    save_encoder_checkpoint,
)
from fedfin.common.config import FederationConfig
from fedfin.common.ledger_anchors import ANCHORS_FILE
from fedfin.common.protocol import METRICS, NUM_EXAMPLES, SOURCE_HEAD, RoundInstructions
from fedfin.common.shared_weights import from_array_record, to_array_record
from fedfin.server.round_summary import (
    RoundSummary,
    note_evaluate_reply,
    note_missing_replies,
    note_train_reply,
)
from fedfin.server.secure_aggregation import aggregate_reply, secure_train_round
from fedfin.server.server_state import load_state, new_state, restore_strategy, save_state
from fedfin.server.strategy import WEIGHT_KEY, build_strategy

log = logging.getLogger("fedfin.server")
ROUNDS_DIR = "global"
ROUNDS_FILE = "rounds.jsonl"
FINAL_DIR = "final"


def round_dir(out_dir: Path, server_round: int) -> Path:
    return out_dir / ROUNDS_DIR / f"round-{server_round:03d}"


@dataclass(frozen=True)
class FederationResult:
    final_arrays: OrderedDict[str, np.ndarray]
    rounds: list[dict[str, Any]]


def run_federation(
    grid: Grid,
    config: FederationConfig,
    start: EncoderCheckpoint,
    source_head: OrderedDict[str, np.ndarray] | None,
    out_dir: Path,
    on_round: Callable[[dict[str, Any]], None] | None = None,
) -> FederationResult:
    """Run `config.num_rounds` rounds; checkpoint and summarise after each.

    A round in which no bank trained (every bank declined, e.g. its budget is spent, or
    failed) ends the federation early: later rounds could only repeat it.
    """
    strategy = build_strategy(config)
    fingerprint = _config_fingerprint(config, start)
    state = load_state(out_dir, fingerprint, config.num_rounds)
    rounds: list[dict[str, Any]] = []
    if state is None:
        state = new_state(fingerprint)
        arrays: ArrayRecord = to_array_record(start.arrays)
        save_encoder_checkpoint(
            round_dir(out_dir, 0), start.schema, start.model_config, start.arrays, {"round": 0}
        )
        (out_dir / ROUNDS_FILE).unlink(missing_ok=True)
        save_state(out_dir, state, strategy)
    else:  # resume after a crash: the last completed round's encoder and strategy state
        arrays = to_array_record(
            load_encoder_checkpoint(round_dir(out_dir, state.completed_round)).arrays
        )
        restore_strategy(out_dir, strategy)
        rounds = _completed_rounds(out_dir, state.completed_round)
        log.warning(
            "resuming federation %s after round %d", state.federation_id, state.completed_round
        )
    head_record = to_array_record(source_head) if source_head else None
    ledger_seqs: dict[str, int] = {}  # each bank's last anchored seq, seen by this process
    for server_round in range(state.completed_round + 1, config.num_rounds + 1):
        started = time.perf_counter()
        instructions = RoundInstructions(
            server_round,
            config.num_rounds,
            config.train,
            start.schema,
            start.model_config,
            federation_id=state.federation_id,
        )
        round_config = ConfigRecord(instructions.to_config())
        summary = RoundSummary(
            server_round,
            banks={},
            aggregated=False,
            federation_id=state.federation_id,
            anchor_file=out_dir / ANCHORS_FILE,
        )

        messages = list(strategy.configure_train(server_round, arrays, round_config, grid))
        for message in messages:
            if head_record is not None:
                message.content[SOURCE_HEAD] = head_record
        if config.secure_aggregation:
            arrays = _secure_round(
                grid, config, server_round, messages, arrays, strategy, summary, state.bank_names
            )
        else:
            arrays = _plain_round(
                grid, config, server_round, messages, arrays, strategy, summary, state.bank_names
            )

        evaluation = list(
            strategy.configure_evaluate(
                server_round, arrays, ConfigRecord(instructions.to_config()), grid
            )
        )
        for reply in grid.send_and_receive(evaluation, timeout=config.round_timeout):
            note_evaluate_reply(summary, reply)
        state.bank_names.update({str(n): b.bank for n, b in summary.banks.items()})
        _warn_on_ledger_rollback(summary, ledger_seqs)

        summary.seconds = time.perf_counter() - started
        record = summary.as_dict()
        save_encoder_checkpoint(
            round_dir(out_dir, server_round),
            start.schema,
            start.model_config,
            from_array_record(arrays),
            {"round": server_round, "summary": record},
        )
        with open(out_dir / ROUNDS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        state.completed_round = server_round
        save_state(out_dir, state, strategy)
        rounds.append(record)
        if on_round is not None:
            on_round(record)
        if server_round < config.num_rounds and not any(
            row.trained for row in summary.banks.values()
        ):
            log.warning(
                "round %d: every bank declined or failed (%s); stopping the federation "
                "instead of writing more unchanged checkpoints",
                server_round,
                "; ".join(record["banks_declined"]) or "no bank replied",
            )
            break

    final = from_array_record(arrays)
    save_encoder_checkpoint(
        out_dir / FINAL_DIR,
        start.schema,
        start.model_config,
        final,
        {"rounds": config.num_rounds, "strategy": config.strategy},
    )
    write_json_atomically(out_dir / "federation.json", {"rounds": rounds})
    return FederationResult(final_arrays=final, rounds=rounds)


def _config_fingerprint(config: FederationConfig, start: EncoderCheckpoint) -> str:
    """What must not change between a crash and its resume: the plan and the start encoder."""
    payload = {**asdict(config), "round_timeout": None, "encoder": start.schema.fingerprint}
    if not config.secure_aggregation:  # runs from before secure aggregation resume as before
        for key in ("secure_aggregation", "secagg_threshold", "secagg_clipping_range"):
            payload.pop(key)
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _completed_rounds(out_dir: Path, completed: int) -> list[dict[str, Any]]:
    """Summaries of the rounds done before the crash; a half-written line is dropped."""
    path = out_dir / ROUNDS_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("round", 0) <= completed:
            kept.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _warn_on_ledger_rollback(summary: RoundSummary, seen: dict[str, int]) -> None:
    """Say at once when a bank's ledger went backwards: the audit will flag it too."""
    for row in summary.banks.values():
        if row.ledger_seq is None:
            continue
        before = seen.get(row.bank)
        if before is not None and row.ledger_seq < before:
            log.warning(
                "round %d: %s's ledger is at entry %d, after %d in an earlier reply "
                "(rolled back?); `fedfin audit --anchors` will flag it",
                summary.server_round,
                row.bank,
                row.ledger_seq,
                before,
            )
        seen[row.bank] = row.ledger_seq


def _plain_round(
    grid: Grid,
    config: FederationConfig,
    server_round: int,
    messages: list[Message],
    arrays: ArrayRecord,
    strategy: FedAvg,
    summary: RoundSummary,
    names: dict[str, str],
) -> ArrayRecord:
    """A round where the server receives each bank's encoder and aggregates with weights."""
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    accepted = [m for m in replies if note_train_reply(summary, m)]
    note_missing_replies(summary, messages, replies, names)
    if len(accepted) < config.min_banks:
        log.warning(
            "round %d: only %d bank(s) accepted (minimum %d); the encoder is unchanged",
            server_round,
            len(accepted),
            config.min_banks,
        )
        return arrays
    _set_weights(accepted)
    new_arrays, _ = strategy.aggregate_train(server_round, accepted)
    if new_arrays is None:
        return arrays
    summary.aggregated = True
    return new_arrays


def _secure_round(
    grid: Grid,
    config: FederationConfig,
    server_round: int,
    messages: list[Message],
    arrays: ArrayRecord,
    strategy: FedAvg,
    summary: RoundSummary,
    names: dict[str, str],
) -> ArrayRecord:
    """A round under secure aggregation: the server learns the banks' mean update only.

    Every bank has weight 1 (a count may not leave a bank exactly, and a noisy one inside
    the sum would buy nothing the mean does not give). Returns the new global encoder, or
    the unchanged one when the sum could not be recovered.
    """
    result = secure_train_round(
        grid,
        messages,
        server_round,
        config.secagg_threshold,
        config.secagg_clipping_range,
        config.round_timeout,
    )
    contributed = [m for m in result.replies if note_train_reply(summary, m, secure=True)]
    note_missing_replies(summary, messages, result.replies, names)
    summary.secure_aggregation = {
        "threshold": result.threshold,
        "contributors": result.contributors,
        "dropped_nodes": result.dropped,
        "failure": result.failure,
    }
    if result.failure or result.mean_update is None:
        log.warning(
            "round %d: %s; the encoder is unchanged",
            server_round,
            result.failure or "secure aggregation recovered no sum",
        )
        return arrays
    if len(contributed) < config.min_banks:
        log.warning(
            "round %d: only %d bank(s) contributed (minimum %d); the encoder is unchanged",
            server_round,
            len(contributed),
            config.min_banks,
        )
        return arrays
    reply = aggregate_reply(messages[0], arrays, result.mean_update, WEIGHT_KEY)
    new_arrays, _ = strategy.aggregate_train(server_round, [reply])
    if new_arrays is None:
        return arrays
    summary.aggregated = True
    return new_arrays


def _set_weights(accepted: list[Message]) -> None:
    """Weight by released (DP-noised) example counts, or uniformly if any bank withholds one.

    A noisy count may come out at or below 0; it is clipped to 1 (post-processing, no extra
    privacy cost), so a small bank still counts a little instead of turning the round
    uniform. Metrics only some banks send (DP metrics are opt-in) are dropped before
    aggregation: the summary has noted them, and Flower's strategies refuse replies whose
    metric keys differ.
    """
    for message in accepted:
        if METRICS not in message.content.metric_records:
            message.content[METRICS] = MetricRecord({})
    records = [m.content.metric_records[METRICS] for m in accepted]
    counts = [r.get(NUM_EXAMPLES) for r in records]
    uniform = any(not isinstance(c, int | float) for c in counts)
    for metrics, count in zip(records, counts, strict=True):
        metrics[WEIGHT_KEY] = 1.0 if uniform else max(1.0, float(count))  # type: ignore[arg-type]
    common = set.intersection(*(set(r.keys()) for r in records)) if records else set()
    if uniform:
        common.discard(NUM_EXAMPLES)
    for metrics in records:
        for key in set(metrics.keys()) - common:
            del metrics[key]
