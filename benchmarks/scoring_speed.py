"""How fast does a bank score and explain, with the model loaded once?

- one application in-process (`Scorer.score_one` on a dict): p50/p99 latency;
- a table (`Scorer.score_frame`, schema validation and transform included): rows/s, with 1 and
  2 torch threads;
- one explanation in-process (`Explainer.explain_one`, integrated gradients): p50/p99;
- HTTP (`fedfin serve` in its own process, one keep-alive client on loopback): p50/p99 of
  POST /score and POST /explain.
Without --state-dir/--encoder it pretrains on Lending Club and trains bank 0 for one DP round
(as tests/test_scoring.py does). Writes benchmarks/results/scoring_speed.json and .md.
Usage: python -m benchmarks.scoring_speed [--rows 1000000] [--state-dir S --encoder E --data F]
"""

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedfin.client.explain import Explainer
from fedfin.client.scoring import Scorer

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
LAUNCH = (  # `fedfin serve`, through the same parser the fedfin CLI uses
    "import argparse, sys\n"
    "from simulations.cli_bank import add_bank_commands\n"
    "parser = argparse.ArgumentParser(prog='fedfin')\n"
    "add_bank_commands(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args()\n"
    "sys.exit(args.run(args))\n"
)


def build_bank(directory: Path) -> tuple[Path, Path, pd.DataFrame]:
    """Pretrained encoder + bank 0 after one DP round; returns state dir, encoder, its test rows."""
    from benchmarks.lending_club_setup import pretrained_lending_club, write_bank_tables
    from fedfin.client.bank_settings import BankSettings
    from fedfin.client.bank_worker import train_round
    from fedfin.common.checkpoint import load_encoder_checkpoint
    from fedfin.common.config import PrivacyPolicy, TrainPlanConfig
    from fedfin.common.protocol import RoundInstructions

    encoder = directory / "encoder"
    split = pretrained_lending_club(5, encoder)
    bank = split.banks[0]
    data = write_bank_tables(split, 0, directory / "data")
    checkpoint = load_encoder_checkpoint(encoder)
    settings = BankSettings("bank-00", data, directory / "state", PrivacyPolicy())
    instructions = RoundInstructions(
        1, 1, TrainPlanConfig(), checkpoint.schema, checkpoint.model_config
    )
    train_round(settings, instructions, checkpoint.arrays, None, run_id=1)
    return directory / "state", encoder, bank.test.reset_index(drop=True)


def percentiles(seconds: list[float], scale: float) -> dict[str, float]:
    values = np.asarray(seconds) * scale
    return {
        "p50": round(float(np.percentile(values, 50)), 4),
        "p99": round(float(np.percentile(values, 99)), 4),
        "max": round(float(values.max()), 4),
        "n": len(values),
    }


def timed(call: Callable[[int], object], count: int, warmup: int) -> list[float]:
    for i in range(warmup):
        call(i)
    out = []
    for i in range(count):
        started = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - started)
    return out


def batch_rows_per_second(scorer: Scorer, table: pd.DataFrame, threads: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scorer.score_frame(table.head(10_000))
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            scorer.score_frame(table)
            seconds.append(time.perf_counter() - started)
        return len(table) / float(np.median(seconds))
    finally:
        torch.set_num_threads(previous)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def http_latencies(
    state_dir: Path, encoder: Path, applications: list[dict[str, Any]], log: Path
) -> dict[str, dict[str, float]]:
    """Start `fedfin serve`, time requests over one keep-alive connection, stop it by PID."""
    port = free_port()
    command = [sys.executable, "-c", LAUNCH, "serve", "--state-dir", str(state_dir)]
    command += ["--encoder", str(encoder), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        connection = _connect_when_up(port, process, log)
        bodies = [json.dumps(a).encode() for a in applications]
        headers = {"Content-Type": "application/json"}

        def post(path: str) -> Callable[[int], object]:
            def call(i: int) -> object:
                connection.request("POST", path, body=bodies[i % len(bodies)], headers=headers)
                response = connection.getresponse()
                payload = response.read()
                if response.status != 200:
                    raise SystemExit(f"{path} answered {response.status}: {payload[:200]!r}")
                return payload

            return call

        try:
            return {
                "score_ms": percentiles(timed(post("/score"), 5_000, 500), 1e3),
                "explain_ms": percentiles(timed(post("/explain"), 300, 30), 1e3),
            }
        finally:
            connection.close()
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.poll() is None:
                os.killpg(process.pid, sig)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    continue


def _connect_when_up(
    port: int, process: subprocess.Popen[bytes], log: Path
) -> http.client.HTTPConnection:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"fedfin serve exited: {log.read_text()}")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request("GET", "/health")
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return connection
        except OSError:
            pass
        connection.close()
        time.sleep(0.2)
    raise SystemExit(f"fedfin serve did not start: {log.read_text()}")


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{platform.machine()}, {model}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the batch table")
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--encoder", type=Path)
    parser.add_argument("--data", type=Path, help="applications (CSV/Parquet) for the inputs")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedfin-scoring-bench-") as tmp:
        if args.state_dir and args.encoder:
            from fedfin.common.tables import read_table

            if args.data is None:
                raise SystemExit("--data is needed with --state-dir and --encoder")
            state_dir, encoder, rows = args.state_dir, args.encoder, read_table(args.data)
        else:
            state_dir, encoder, rows = build_bank(Path(tmp))
        torch.set_num_threads(1)
        started = time.perf_counter()
        scorer = Scorer.load(state_dir, encoder)
        load_seconds = time.perf_counter() - started
        applications: list[dict[str, Any]] = json.loads(rows.to_json(orient="records"))
        applications = [{k: a[k] for k in scorer.feature_names} for a in applications]

        def score(i: int) -> float:
            return scorer.score_one(applications[i % len(applications)])

        single = timed(score, 20_000, 2_000)
        table = pd.concat([rows] * (args.rows // len(rows) + 1), ignore_index=True).head(args.rows)
        batch = {t: batch_rows_per_second(scorer, table, t) for t in (1, 2)}
        explainer = Explainer(scorer)
        explain = timed(
            lambda i: explainer.explain_one(applications[i % len(applications)]), 300, 30
        )
        served = http_latencies(state_dir, encoder, applications, Path(tmp) / "serve.log")
    figures: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.scoring_speed", *sys.argv[1:]]),
        "machine": machine(),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "model_load_seconds": round(load_seconds, 3),
        "single_application_in_process_us": percentiles(single, 1e6),
        "batch_rows": len(table),
        "batch_rows_per_second_1_thread": round(batch[1]),
        "batch_rows_per_second_2_threads": round(batch[2]),
        "explain_one_in_process_ms": percentiles(explain, 1e3),
        "http_score_ms": served["score_ms"],
        "http_explain_ms": served["explain_ms"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scoring_speed.json").write_text(json.dumps(figures, indent=2) + "\n")
    s, h, e, he = (
        figures["single_application_in_process_us"],
        figures["http_score_ms"],
        figures["explain_one_in_process_ms"],
        figures["http_explain_ms"],
    )
    (RESULTS / "scoring_speed.md").write_text(
        "# fedfin scoring speed\n\n"
        f"Command: `{figures['command']}`; machine: {figures['machine']}; 1-minute load average "
        f"{figures['load_average_before_after'][0]} before, "
        f"{figures['load_average_before_after'][1]} after (a shared machine).\n\n"
        "Model: Lending Club encoder (64, 32) + bank 0's private head after one DP round, "
        f"loaded once ({figures['model_load_seconds']} s).\n\n"
        "| what | figure |\n|---|---|\n"
        f"| one application, in-process `score_one` | p50 **{s['p50']:.1f} µs**, p99 "
        f"**{s['p99']:.1f} µs** (max {s['max']:.0f} µs, {s['n']} calls) |\n"
        f"| table of {len(table):,} rows, `score_frame` (validation + transform + model) | "
        f"**{figures['batch_rows_per_second_1_thread']:,} rows/s** (1 torch thread), "
        f"{figures['batch_rows_per_second_2_threads']:,} rows/s (2 threads) |\n"
        f"| one explanation, in-process (integrated gradients, 32 steps) | p50 {e['p50']:.2f} ms, "
        f"p99 {e['p99']:.2f} ms |\n"
        f"| HTTP POST /score, keep-alive, loopback | p50 {h['p50']:.3f} ms, p99 "
        f"**{h['p99']:.3f} ms** ({h['n']} requests) |\n"
        f"| HTTP POST /explain | p50 {he['p50']:.2f} ms, p99 {he['p99']:.2f} ms |\n"
    )
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
