"""Scaling: wall time and peak memory of the real Flower simulation for 2, 8 and 32 banks.

Each size runs in a fresh process: synthetic banks of equal size (`--rows-per-bank`), pretrain
on the generator's public pool, then `simulations.simulate.simulate` (Flower's simulation
engine on Ray, one CPU per bank, ε = 1 per bank). Time is split from the run's own
rounds.jsonl into start-up (simulation wall time minus the rounds: Ray, actors, laying out
banks, the report) and per round; round 1 also pays each bank's noise calibration and each
Ray worker's first ClientApp import. Memory: the whole process tree (the driver, Ray's
daemons and workers), sampled from /proc every 0.25 s: peak of the summed PSS (shared pages
split between processes) and of the summed RSS (shared pages counted in every process).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

NAME = "scaling"
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_FILE = RESULTS / "scaling.json"
PLOT_FILE = RESULTS / "scaling.png"
EPSILON = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--scaling-banks", type=int, nargs="+", default=[2, 8, 32])
    group.add_argument("--rows-per-bank", type=int, default=1000)
    group.add_argument("--scaling-rounds", type=int, default=2)


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parent = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    return children


def process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant."""
    children = _children_by_parent()
    tree, frontier = [pid], [pid]
    while frontier:
        found = children.get(frontier.pop(), [])
        tree += found
        frontier += found
    return tree


def tree_memory_kib(pid: int) -> tuple[int, int, int]:
    """(summed PSS, summed RSS, number of processes) of the tree, in KiB."""
    pss = rss = count = 0
    for member in process_tree(pid):
        try:
            text = Path(f"/proc/{member}/smaps_rollup").read_text()
        except OSError:
            continue  # exited, or not ours to read
        fields = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)
        pss += int(fields.get("Pss", "0 kB").split()[0])
        rss += int(fields.get("Rss", "0 kB").split()[0])
        count += 1
    return pss, rss, count


class MemorySampler(threading.Thread):
    """Samples a process tree's memory until stopped; keeps the peaks."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss = self.peak_rss = self.peak_processes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            pss, rss, count = tree_memory_kib(self.pid)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_processes = max(self.peak_processes, count)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def measure(banks: int, rows_per_bank: int, rounds: int, work: Path) -> dict[str, Any]:
    """One simulation in a fresh process, with its process tree's memory sampled."""
    out = work / f"banks-{banks}"
    timings = work / f"timings-{banks}.json"
    command = [
        sys.executable, "-m", "benchmarks.scaling", "--child",
        str(banks), str(rows_per_bank), str(rounds), str(out), str(timings),
    ]  # fmt: skip
    env = {**os.environ, "FLWR_HOME": str(work / f"flwr-home-{banks}")}
    cwd = Path(__file__).resolve().parents[1]
    log = open(work / f"banks-{banks}.log", "wb")  # noqa: SIM115 - closed below
    began = time.perf_counter()
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    sampler = MemorySampler(process.pid)
    sampler.start()
    try:
        code = process.wait(timeout=900)
    finally:
        sampler.stop()
        log.close()
    wall = time.perf_counter() - began
    if code != 0:
        tail = (work / f"banks-{banks}.log").read_text()[-3000:]
        raise RuntimeError(f"scaling run with {banks} banks failed ({code}):\n{tail}")
    child = json.loads(timings.read_text())
    round_seconds = [
        json.loads(line)["seconds"] for line in (out / "rounds.jsonl").read_text().splitlines()
    ]
    return {
        "banks": banks,
        "rows_per_bank": rows_per_bank,
        "process_wall_s": round(wall, 1),
        "imports_and_data_s": child["imports_and_data_s"],
        "pretrain_s": child["pretrain_s"],
        "simulation_s": child["simulation_s"],
        "startup_s": round(child["simulation_s"] - sum(round_seconds), 1),
        "round_s": [round(s, 1) for s in round_seconds],
        "peak_pss_mib": round(sampler.peak_pss / 1024),
        "peak_rss_mib": round(sampler.peak_rss / 1024),
        "peak_processes": sampler.peak_processes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    sizes = []
    with tempfile.TemporaryDirectory(prefix="fedfin-bench-scaling-") as tmp:
        for banks in tqdm(args.scaling_banks, desc=NAME, unit="run"):
            sizes.append(measure(banks, args.rows_per_bank, args.scaling_rounds, Path(tmp)))
    result = {
        "epsilon": EPSILON,
        "rounds": args.scaling_rounds,
        "cpus": os.cpu_count(),
        "sizes": sizes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    plot(result, PLOT_FILE)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    """Stacked wall time (start-up, round 1, later rounds) and peak memory, per bank count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    labels = [str(s["banks"]) for s in sizes]
    startup = [s["startup_s"] for s in sizes]
    first = [s["round_s"][0] for s in sizes]
    later = [sum(s["round_s"][1:]) for s in sizes]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.bar(labels, startup, label="start-up (Ray, actors, banks, report)")
    left.bar(labels, first, bottom=startup, label="round 1 (incl. calibration, warm-up)")
    left.bar(
        labels,
        later,
        bottom=[a + b for a, b in zip(startup, first, strict=True)],
        label="round 2" if result["rounds"] == 2 else f"rounds 2-{result['rounds']}",
    )
    left.set_xlabel("banks")
    left.set_ylabel("seconds")
    left.set_title("simulation wall time")
    left.legend(fontsize=8)
    right.plot(labels, [s["peak_pss_mib"] for s in sizes], marker="o", label="peak PSS (sum)")
    right.plot(labels, [s["peak_rss_mib"] for s in sizes], marker="s", label="peak RSS (sum)")
    right.set_xlabel("banks")
    right.set_ylabel("MiB, whole process tree")
    right.set_title("peak memory")
    right.legend(fontsize=8)
    figure.suptitle(f"Flower simulation engine, {result['cpus']} CPUs, 1 CPU per bank")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(result: dict[str, Any]) -> str:
    rows_per_bank = result["sizes"][0]["rows_per_bank"]
    lines = [
        "## Scaling (real Flower simulation engine, synthetic banks)",
        "",
        f"Command: `{result['command']}`; {result['seconds']} s. {rows_per_bank} rows per bank "
        f"(75% train), {result['rounds']} rounds, ε = {result['epsilon']} per bank, "
        f"{result['cpus']} CPUs with 1 CPU per bank, so at most {result['cpus']} banks train "
        "at once.",
        "",
        "| banks | start-up | round 1 | later rounds (each) | s per bank-round (later) "
        "| pretrain | process wall | peak PSS | peak RSS | processes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["sizes"]:
        later = s["round_s"][1:]
        each = sum(later) / len(later) if later else float("nan")
        lines.append(
            f"| {s['banks']} | {s['startup_s']} s | {s['round_s'][0]} s | "
            f"{', '.join(f'{x} s' for x in later) or '—'} | {each / s['banks']:.2f} s | "
            f"{s['pretrain_s']} s | {s['process_wall_s']} s | {s['peak_pss_mib']} MiB | "
            f"{s['peak_rss_mib']} MiB | {s['peak_processes']} |"
        )
    lines += [
        "",
        "Start-up = simulation wall time minus the rounds (Ray and its actors, the banks' "
        "directories, the public-model metrics, the report). Round 1 includes each bank's "
        "noise calibration (once per run) and each Ray worker's first import of the "
        "ClientApp. Peak memory is of the whole process tree; PSS splits shared pages "
        "between processes, RSS counts them in each.",
        "",
        f"![Scaling](results/{PLOT_FILE.name})",
        "",
    ]
    return "\n".join(lines)


def _child_main(argv: list[str]) -> None:
    """Fresh process: synthetic data, pretraining, then the timed simulation."""
    began = time.perf_counter()
    from fedfin.common.config import FederationConfig, PretrainConfig, PrivacyPolicy, SplitConfig
    from fedfin.common.sources import load_source
    from fedfin.server.pretrain import pretrain
    from fedfin.simulations.simulate import SimulationRequest, simulate

    banks, rows_per_bank, rounds = int(argv[0]), int(argv[1]), int(argv[2])
    out, timings = Path(argv[3]), Path(argv[4])
    source = load_source(
        "synthetic",
        synthetic_rows=round(banks * rows_per_bank / 0.6),  # the generator's public share: 40%
        synthetic_banks=banks,
    )
    split_config = SplitConfig(num_banks=banks, seed=0)
    split = source.split(split_config)
    imported = time.perf_counter()
    pretrain(
        split.public,
        source.label,
        source.positive_label,
        out / "pretrained",
        PretrainConfig(),
        exclude=source.excluded_columns,
        source=source.name,
        progress=False,
    )
    pretrained = time.perf_counter()
    simulate(
        SimulationRequest(
            source=source,
            split=split_config,
            federation=FederationConfig(num_rounds=rounds, min_banks=2),
            policy=PrivacyPolicy(epsilon_budget=EPSILON),
            out_dir=out,
            encoder_dir=out / "pretrained",
        ),
        echo=lambda line: print(line, flush=True),
    )
    done = time.perf_counter()
    timings.write_text(
        json.dumps(
            {
                "imports_and_data_s": round(imported - began, 1),
                "pretrain_s": round(pretrained - imported, 1),
                "simulation_s": round(done - pretrained, 1),
            }
        )
    )


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    _child_main(sys.argv[2:])


def headline(result: dict[str, Any]) -> str:
    parts = []
    for size in result["sizes"]:
        later = size["round_s"][1:] or size["round_s"]
        parts.append(
            f"{size['banks']} banks: start-up {size['startup_s']} s, round 1 "
            f"{size['round_s'][0]} s, later rounds {sum(later) / len(later):.1f} s, "
            f"peak {size['peak_pss_mib']} MiB PSS"
        )
    return f"**Scaling** (real Flower simulation, {result['cpus']} CPUs): " + "; ".join(parts) + "."
