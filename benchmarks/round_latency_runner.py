"""Seconds per deployed round when each bank's tasks go to its warm `fedfin bank-runner`.

A SuperLink and, per bank, a SuperNode in `--isolation process` plus the bank's runner
(torch and Opacus imported once, at start), all on loopback; the fedfin app runs R rounds
(train + evaluate each) over the 3 built-in Lending Club banks. The round times are the
ServerApp's own (`rounds.jsonl`); the runners' logs give the time each task spent inside
the bank, so the rest of a round is Flower's polling and transport.
The earlier figures (a fresh ClientApp process per message) are in round_latency.md.
Usage: python -m benchmarks.round_latency_runner [--rounds 4]
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from tests.harness.bank_runner_deployment import (
    FEDFIN,
    ROOT,
    app_hash,
    deployment_env,
    free_port_block,
    online_nodes,
    runner_config_text,
    snapshot_fedfin_app,
    start_run,
    superlink_command,
    supernode_command,
    wait_for,
    wait_for_run,
    write_connection,
    write_private,
)
from tests.harness.processes import started

RESULTS = ROOT / "benchmarks" / "results"
BANKS = ("bank-00", "bank-01", "bank-02")
TASK_LINE = re.compile(
    r"accepted; (train|evaluate) -> (\w+) in ([0-9.]+) s "
    r"\(([0-9.]+) s in the ClientApp, ([0-9.]+) s pulling the input\)"
)
Task = tuple[str, float, float, float]  # bank, total, in the ClientApp, pulling the input
# Flower's fixed waits that remain in every phase of a round (flwr 1.42.0, site-packages/flwr):
FLOWER_POLLS = [
    "supernode/start_client_internal.py:263: an idle SuperNode asks the SuperLink for "
    "messages every 3 s (time.sleep(3))",
    "superlink/grid/http_grid.py:412: the ServerApp's grid asks for replies every 3 s "
    "(time.sleep(3) in send_and_receive)",
    "supernode/start_client_internal.py:470: the SuperNode looks for the runner's reply "
    "every 0.5 s (time.sleep(0.5) in _push_messages)",
]


def run_benchmark(
    work: Path, rounds: int, poll_interval: float, verbose: bool
) -> dict[str, object]:
    env = deployment_env(work / "flwr-home")
    subprocess.run(
        [*FEDFIN, "pretrain", "--data", "lending-club", "--out", str(work / "encoder"), "--quiet"],
        check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    subprocess.run(
        [*FEDFIN, "split", "--data", "lending-club", "--banks", str(len(BANKS)), "--out",
         str(work / "bank-data")],
        check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    app = snapshot_fedfin_app(work / "fedfin-app")
    allowed = app_hash(app, env)
    base = free_port_block(3 + len(BANKS))
    write_connection(work / "flwr-home", base)
    with ExitStack() as stack:
        stack.enter_context(started(superlink_command(base), env, work / "superlink.log"))
        for i, bank in enumerate(BANKS):
            runtime_port = base + 3 + i
            secret = write_private(work / bank / "exec.secret", os.urandom(32))
            settings = {
                "bank-name": bank,
                "data-path": str(work / "bank-data" / bank),
                "state-dir": str(work / bank / "state"),
                "epsilon-budget": 1.0,
                "delta": 1e-5,
                "max-grad-norm": 1.0,
                "min-noise-multiplier": 0.5,
            }
            config = write_private(
                work / bank / "runner.toml",
                runner_config_text(runtime_port, secret, [allowed], settings, poll_interval),
            )
            stack.enter_context(
                started(supernode_command(base, runtime_port, secret), env,
                        work / f"supernode-{bank}.log")
            )  # fmt: skip
            stack.enter_context(
                started([*FEDFIN, "bank-runner", "--config", str(config),
                         *(["--verbose"] if verbose else [])], env,
                        work / f"runner-{bank}.log", ROOT)
            )  # fmt: skip
        wait_for(lambda: online_nodes(env) == len(BANKS), 120, "the SuperNodes", interval=2)
        wait_for(
            lambda: all(
                "connected to the SuperNode" in (work / f"runner-{b}.log").read_text()
                for b in BANKS
            ),
            120,
            "the runners",
        )
        run_config = (
            f"encoder-dir='{work / 'encoder'}' out-dir='{work / 'server'}' "
            f"num-server-rounds={rounds} min-banks={len(BANKS)}"
        )
        load_before = os.getloadavg()[0]
        started_at = time.perf_counter()
        run_id = start_run(app, run_config, env)
        status = wait_for_run(run_id, env, 900, work / "server" / "final")
        run_seconds = time.perf_counter() - started_at
        load_after = os.getloadavg()[0]
    if status != "finished:completed":
        raise RuntimeError(f"run {run_id} ended {status}; logs in {work}")
    per_round = [
        json.loads(line)["seconds"]
        for line in (work / "server" / "rounds.jsonl").read_text().splitlines()
    ]
    tasks: dict[str, list[Task]] = {"train": [], "evaluate": []}
    for bank in BANKS:
        log = (work / f"runner-{bank}.log").read_text()
        for kind, reply, total, app_seconds, pull in TASK_LINE.findall(log):
            if reply != "ok":
                raise RuntimeError(f"{bank} answered a {kind} with {reply}; see {work}")
            tasks[kind].append((bank, float(total), float(app_seconds), float(pull)))
    warm = per_round[1:] or per_round
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}",
        "load_average_1min_before_and_after": [round(load_before, 2), round(load_after, 2)],
        "flower_env": {k: v for k, v in os.environ.items() if k.startswith("FLWR_PRIVATE_")},
        "banks": len(BANKS),
        "rounds": rounds,
        "runner_poll_interval_seconds": poll_interval,
        "seconds_per_round": per_round,
        "median_round_seconds": round(statistics.median(per_round), 2),
        "median_warm_round_seconds": round(statistics.median(warm), 2),
        "first_round_seconds": per_round[0],
        "run_seconds_from_flwr_run_to_finished": round(run_seconds, 1),
        "runner_task_seconds": {kind: _task_figures(values) for kind, values in tasks.items()},
        "flower_polls": FLOWER_POLLS,
    }


def _task_figures(values: list[Task]) -> dict[str, object]:
    """Round 1 per bank, then medians over later rounds, of each task's claim-to-finish
    time, the part inside the ClientApp and the part pulling its input."""
    first: list[Task] = []
    later: list[Task] = []
    seen: set[str] = set()
    for value in values:  # in each bank's log order: its first task of a kind is round 1
        (later if value[0] in seen else first).append(value)
        seen.add(value[0])
    figures: dict[str, object] = {}
    for name, column in (("total", 1), ("in_clientapp", 2), ("pulling_input", 3)):
        figures[f"round_1_{name}"] = [float(value[column]) for value in first]
        later_values = [float(value[column]) for value in later]
        figures[f"median_later_{name}"] = (
            round(statistics.median(later_values), 2) if later_values else None
        )
    return figures


def write_markdown(figures: dict[str, object], before: dict[str, object], suffix: str) -> str:
    tasks = figures["runner_task_seconds"]
    assert isinstance(tasks, dict)
    lines = [
        "# Round latency with the warm bank runner (3 built-in banks, loopback)",
        "",
        f"Command: `{_env_prefix(figures)}python -m benchmarks.round_latency_runner --rounds "
        f"{figures['rounds']}{f' --suffix={suffix}' if suffix else ''}`; "
        f"machine: {figures['machine']}, shared with other work while measured (1-minute "
        f"load average {figures['load_average_1min_before_and_after']} before/after the run, "
        "on 2 cores: the figures are for a loaded machine, not an idle one).",
        "Deployment: SuperLink (insecure, loopback), per bank a SuperNode in "
        "`--isolation process` with SuperExec auth and its `fedfin bank-runner`; a round is "
        "a train phase and an evaluate phase over all 3 banks.",
        "",
        "| | before (round_latency.md: a ClientApp process per message; TLS, auth) "
        "| after (warm runner) |",
        "|---|---|---|",
        f"| seconds per round | {before.get('deployment_seconds_per_round', '?')} | "
        f"{figures['seconds_per_round']} |",
        f"| median round | {_median(before)} | {figures['median_round_seconds']} s |",
        f"| median round after the first | - | {figures['median_warm_round_seconds']} s |",
        "",
        "Time inside each bank's runner per task (from its log), seconds:",
        "",
        "| task | round 1, per bank: total / in the ClientApp / pulling the input | "
        "later rounds, median: total / in the ClientApp / pulling the input |",
        "|---|---|---|",
    ]
    for kind, values in tasks.items():
        firsts = ", ".join(
            f"{t} / {a} / {p}"
            for t, a, p in zip(
                values["round_1_total"],
                values["round_1_in_clientapp"],
                values["round_1_pulling_input"],
                strict=True,
            )
        )
        lines.append(
            f"| {kind} | {firsts} | {values['median_later_total']} / "
            f"{values['median_later_in_clientapp']} / {values['median_later_pulling_input']} |"
        )
    lines += [
        "",
        "The first round also calibrates each bank's noise for the run (cached in its state "
        "dir) and starts the ServerApp process. What remains of a later round beyond the "
        "tasks is Flower's fixed polling (flwr 1.42.0, `site-packages/flwr/`):",
        "",
        *(f"- `{poll}`" for poll in figures["flower_polls"]),  # type: ignore[attr-defined]
        "",
        "Each phase (train, then evaluate) waits on average ~1.5 s for the SuperNode's pull, "
        "~0.25 s for the reply check and ~1.5 s for the grid's pull: ~6.5 s of a round is "
        "polling, which only a change in Flower (or patched constants) removes.",
        "",
        '"Pulling the input" is mostly Flower\'s transport, not the runner: the SuperNode '
        "creates the task before it has fetched the message from the SuperLink "
        "(`supernode/start_client_internal.py`, `_pull_and_store_message`: `create_task`, "
        "then `pull_objects`, one HTTP request per object: 33 objects for a train message, 28 "
        "for an evaluate one), and the runner's pulls wait for those objects. The runner's "
        "own runtime-API request costs ~11 ms on this loaded machine (~0.4 s per message). "
        "Flower's `flwr-clientapp` would wait 1 s, then up to 10 s, for an object not yet "
        "there (`supercore/constant.py:48-49`, `PULL_INITIAL_BACKOFF`, `PULL_BACKOFF_CAP`); "
        "the runner retries after 20 ms (cap 0.5 s).",
        "",
        "Inside the ClientApp, a warm train task is ~1.8-3 s when measured alone in one "
        "process (the DP accountant's ε computations take ~1.2 s of it, "
        "`opacus/accountants/prv.py`), an evaluate task ~0.2-0.3 s.",
        "",
    ]
    return "\n".join(lines)


def _env_prefix(figures: dict[str, object]) -> str:
    env = figures.get("flower_env")
    return "".join(f"{k}={v} " for k, v in env.items()) if isinstance(env, dict) else ""


def _median(before: dict[str, object]) -> str:
    values = before.get("deployment_seconds_per_round")
    if isinstance(values, list) and values:
        return f"{statistics.median(values):.2f} s"
    return "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--poll-interval", type=float, default=0.1)
    parser.add_argument("--verbose", action="store_true", help="runners log their pulls")
    parser.add_argument(
        "--suffix", default="", help="write round_latency_runner<SUFFIX>.{json,md} (variants)"
    )
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a tmp dir)")
    args = parser.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        figures = run_benchmark(args.keep, args.rounds, args.poll_interval, args.verbose)
    else:
        with tempfile.TemporaryDirectory(prefix="fedfin-runner-latency-") as tmp:
            figures = run_benchmark(Path(tmp), args.rounds, args.poll_interval, args.verbose)
    before: dict[str, object] = {}
    earlier = RESULTS / "round_latency.json"
    if earlier.exists():
        recorded = json.loads(earlier.read_text())
        before = recorded.get("after", recorded) if isinstance(recorded, dict) else {}
    RESULTS.mkdir(exist_ok=True)
    name = f"round_latency_runner{args.suffix}"
    (RESULTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(write_markdown(figures, before, args.suffix))
    print(json.dumps(figures, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
