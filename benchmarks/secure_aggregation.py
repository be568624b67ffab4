"""Secure aggregation's cost: seconds and bytes per round, with and without SecAgg+.

What is measured: the real federation loop (`run_federation`) and every bank's real
ClientApp (release guard, SecAgg+ mod, DP-SGD, ledger) in one process, each message and
reply through Flower's protobuf serialisation (tests/harness/secure_grid.py). Bytes are
the serialised messages (server -> banks and banks -> server, all stages, train and
evaluate); network, gRPC, TLS and Ray are not in these figures, and the banks run one
after another on one core, so a round's seconds are the sum of the banks' work plus the
server's. Data: the built-in Lending Club loans split by state into N banks; the encoder
is fedfin's default (pretrained on the public pool). Round 1 pays one-time imports and
calibration, so the table reports round 2.
"Protocol only" replaces DP training by a fixed update (the received encoder plus 1e-3
noise), keeping the release guard, the SecAgg+ mod, the masked-release ledger entry and the
server's four stages: the cost of secure aggregation itself.
Usage: python -m benchmarks.secure_aggregation [--banks 5 20] [--rounds 2] [--repeats 3]
       python -m benchmarks.secure_aggregation --report-only
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NAME = "secure_aggregation"


def run(num_banks: int, secure: bool, rounds: int, root: Path) -> list[dict[str, Any]]:
    """One federation of `num_banks` banks; per-round seconds and bytes."""
    from benchmarks.lending_club_setup import pretrained_lending_club
    from fedfin.client.client_app import build_client_app
    from fedfin.common.checkpoint import load_encoder_checkpoint, load_source_head
    from fedfin.common.config import FederationConfig
    from fedfin.server.federation import run_federation
    from tests.harness.messages import server_identity
    from tests.harness.secure_grid import InProcessGrid, bank_contexts

    encoder = root / f"encoder-{num_banks}"
    split = pretrained_lending_club(num_banks, encoder)
    run_dir = root / f"run-{num_banks}-{'secagg' if secure else 'plain'}"
    banks = []
    for i, bank in enumerate(split.banks):
        data = run_dir / f"data-{i}"
        data.mkdir(parents=True)
        bank.train.to_parquet(data / "train.parquet")
        bank.test.to_parquet(data / "test.parquet")
        banks.append((data, run_dir / f"state-{i}"))
    grid = InProcessGrid(bank_contexts(banks, **{"epsilon-budget": 3.0}), build_client_app())
    rows: list[dict[str, Any]] = []
    last = {"to": 0, "from": 0, "bank": 0.0, "clock": time.perf_counter()}

    def on_round(summary: dict[str, Any]) -> None:
        now = time.perf_counter()
        wall = now - last["clock"]
        bank = grid.bank_seconds - last["bank"]
        rows.append(
            {
                "banks": num_banks,
                "secure_aggregation": secure,
                "round": summary["round"],
                "aggregated": summary["aggregated"],
                "banks_trained": summary["banks_trained"],
                "round_seconds": round(wall, 3),
                "bank_seconds": round(bank, 3),
                "server_seconds": round(wall - bank, 3),
                "bytes_to_banks": grid.bytes_to_banks - int(last["to"]),
                "bytes_from_banks": grid.bytes_from_banks - int(last["from"]),
            }
        )
        last.update(to=grid.bytes_to_banks, clock=now, bank=grid.bank_seconds)
        last["from"] = grid.bytes_from_banks

    config = FederationConfig(
        num_rounds=rounds, secure_aggregation=secure, min_banks=2, round_timeout=600.0
    )
    checkpoint = load_encoder_checkpoint(encoder)
    with server_identity():
        last["clock"] = time.perf_counter()
        run_federation(
            grid, config, checkpoint, load_source_head(encoder), run_dir / "server", on_round
        )
    return rows


def protocol_only(
    num_banks: int, secure: bool, repeats: int, root: Path, encoder: Path
) -> dict[str, Any]:
    """Seconds and bytes of one round with training replaced by a fixed update."""
    import numpy as np
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedfin.client.client_app import settings_from_context
    from fedfin.client.release_guard import release_guard
    from fedfin.client.secure_aggregation import secure_aggregation_mod
    from fedfin.common.checkpoint import load_encoder_checkpoint
    from fedfin.common.config import TrainPlanConfig
    from fedfin.common.protocol import ARRAYS, EPSILON, METRICS, STATUS, RoundInstructions
    from fedfin.common.shared_weights import from_array_record, to_array_record
    from fedfin.server.secure_aggregation import secure_train_round
    from tests.harness.messages import server_identity
    from tests.harness.secure_grid import InProcessGrid, bank_contexts

    app = ClientApp(mods=[release_guard, secure_aggregation_mod(settings_from_context)])
    generator = np.random.default_rng(0)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        arrays = from_array_record(message.content.array_records[ARRAYS])
        update = {k: (v + 1e-3 * generator.standard_normal(v.shape)).astype(v.dtype)
                  for k, v in arrays.items()}  # fmt: skip
        status = {"status": "ok", "bank": "b", "ledger-seq": 0, "ledger-head": ""}
        content = RecordDict(
            {
                ARRAYS: to_array_record(update),
                METRICS: MetricRecord({EPSILON: 0.0}),
                STATUS: ConfigRecord(status),  # type: ignore[arg-type]
            }
        )
        return Message(content, reply_to=message)

    checkpoint = load_encoder_checkpoint(encoder)
    run_dir = root / f"protocol-{num_banks}-{'secagg' if secure else 'plain'}"
    banks = [(run_dir / "data", run_dir / f"state-{i}") for i in range(num_banks)]
    grid = InProcessGrid(bank_contexts(banks), app)
    seconds = []
    with server_identity():
        for repeat in range(repeats):
            plan, schema, model = TrainPlanConfig(), checkpoint.schema, checkpoint.model_config
            config = RoundInstructions(
                1, 1, plan, schema, model, federation_id=f"bench-{repeat}"
            ).to_config()
            content = RecordDict(
                {ARRAYS: to_array_record(checkpoint.arrays), "config": ConfigRecord(config)}  # type: ignore[arg-type]
            )
            messages = [
                Message(content, dst_node_id=n, message_type="train") for n in grid.contexts
            ]
            before = (grid.bytes_to_banks, grid.bytes_from_banks)
            started = time.perf_counter()
            if secure:
                result = secure_train_round(grid, messages, 1, 0, 8.0, 600.0)
                assert result.failure is None and result.contributors == num_banks
            else:
                grid.send_and_receive(messages)
            seconds.append(time.perf_counter() - started)
    return {
        "banks": num_banks,
        "secure_aggregation": secure,
        "median_round_seconds": round(float(np.median(seconds)), 3),
        "bank_seconds_by_stage": {
            k: round(v / repeats, 3) for k, v in grid.bank_seconds_by_stage.items()
        },
        "bytes_to_banks": grid.bytes_to_banks - before[0],
        "bytes_from_banks": grid.bytes_from_banks - before[1],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--banks", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="protocol-only rounds")
    args = parser.parse_args(argv)
    started = time.time()
    rows: list[dict[str, Any]] = []
    protocol: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedfin-secagg-bench-") as tmp:
        for banks in args.banks:
            for secure in (False, True):
                rows += run(banks, secure, args.rounds, Path(tmp))
                print(json.dumps(rows[-1]), flush=True)
        for banks in args.banks:
            for secure in (False, True):
                encoder = Path(tmp) / f"encoder-{args.banks[0]}"
                protocol.append(protocol_only(banks, secure, args.repeats, Path(tmp), encoder))
                print(json.dumps(protocol[-1]), flush=True)
    result = {
        "command": "python -m benchmarks.secure_aggregation " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, python {platform.python_version()}",
        "seconds": round(time.time() - started, 1),
        "repeats": args.repeats,
        "rows": rows,
        "protocol_only": protocol,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{NAME}.md").write_text(report(result) + "\n")
    print(report(result))


def report(result: dict[str, Any]) -> str:
    """The round-2 (warm) figures, plain against secure, per bank count."""
    lines = [
        "# Secure aggregation (SecAgg+): seconds and bytes per round",
        "",
        f"Command: `{result['command']}`; {result['machine']}; {result['seconds']} s in all.",
        "One process: the federation loop and every bank's real ClientApp, messages through "
        "Flower's protobuf serialisation; banks run one after another (so seconds add up), "
        "no network, gRPC, TLS or Ray. Lending Club split into N banks; last round shown "
        "(round 1 pays imports and calibration). Whole-round seconds are mostly DP "
        "training and vary 2-5x between runs on a shared machine; the protocol-only table "
        "below is the cost of secure aggregation itself. Bytes do not vary.",
        "",
        "| banks | mode | round s | in banks s | server s | MB to banks | MB from banks |",
        "|---|---|---|---|---|---|---|",
    ]
    final: dict[tuple[int, bool], dict[str, Any]] = {}
    for row in result["rows"]:
        final[(row["banks"], row["secure_aggregation"])] = row
    for (banks, secure), row in sorted(final.items()):
        lines.append(
            f"| {banks} | {'SecAgg+' if secure else 'plain'} | {row['round_seconds']:.2f} | "
            f"{row['bank_seconds']:.2f} | {row['server_seconds']:.2f} | "
            f"{row['bytes_to_banks'] / 1e6:.3f} | {row['bytes_from_banks'] / 1e6:.3f} |"
        )
    lines += [
        "",
        "Protocol only (training replaced by a fixed update; median of "
        f"{result.get('repeats', 3)} rounds):",
        "",
        "| banks | mode | round s | MB to banks | MB from banks | bank s by stage |",
        "|---|---|---|---|---|---|",
    ]
    for row in result.get("protocol_only", []):
        stages = ", ".join(f"{k} {v:.3f}" for k, v in row["bank_seconds_by_stage"].items())
        lines.append(
            f"| {row['banks']} | {'SecAgg+' if row['secure_aggregation'] else 'plain'} | "
            f"{row['median_round_seconds']:.3f} | {row['bytes_to_banks'] / 1e6:.3f} | "
            f"{row['bytes_from_banks'] / 1e6:.3f} | {stages} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--report-only"]:  # rewrite the .md from the last .json
        saved = json.loads((RESULTS / f"{NAME}.json").read_text())
        (RESULTS / f"{NAME}.md").write_text(report(saved) + "\n")
    else:
        main()
