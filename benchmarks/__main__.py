"""`python -m benchmarks`: run fedfin's deciding benchmarks and write benchmarks/RESULTS.md.

    python -m benchmarks                      # all four, in priority order (about 20 minutes)
    python -m benchmarks dp-speed scaling     # only these; the others' last results are kept
    python -m benchmarks --report-only        # rewrite RESULTS.md from benchmarks/results/*.json

Each benchmark writes benchmarks/results/<name>.json (its figures, the exact command, the
machine and library versions) and its PNG plots; RESULTS.md is assembled from those files.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import (
    communication,
    distributed_dp,
    dp_speed,
    privacy_utility,
    privacy_utility_map,
    scaling,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
BENCHMARKS: dict[str, ModuleType] = {
    module.NAME: module
    for module in (
        privacy_utility,
        dp_speed,
        communication,
        scaling,
        privacy_utility_map,
        distributed_dp,
    )
}
# Run only when named: the map takes about an hour of one core, distributed DP half that.
OPT_IN = (privacy_utility_map.NAME, distributed_dp.NAME)
DEFAULT = tuple(name for name in BENCHMARKS if name not in OPT_IN)
VERSIONED = (
    "fedfin", "torch", "opacus", "flwr", "ray", "numpy", "pandas", "scikit-learn",
    "dp-accounting", "matplotlib",
)  # fmt: skip


def environment() -> dict[str, Any]:
    """Machine, library versions and code revision: what a reader needs to compare numbers."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        meminfo = Path("/proc/meminfo").read_text().split()
        memory_gib = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        memory_gib = float("nan")
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "benchmarks",
        nargs="*",
        metavar="BENCHMARK",
        help=f"any of {', '.join(BENCHMARKS)} (default: all but {', '.join(OPT_IN)})",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rewrite RESULTS.md from results/*.json"
    )
    for module in BENCHMARKS.values():
        module.add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark '{unknown[0]}'; choose from {', '.join(BENCHMARKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    selected = [] if args.report_only else (args.benchmarks or list(DEFAULT))
    command = shlex.join(["python", "-m", "benchmarks", *argv])
    for name in selected:
        module = BENCHMARKS[name]
        print(f"== {name}", flush=True)
        began = time.perf_counter()
        result = module.run(args)
        if hasattr(module, "result_path"):  # it wrote its own results, cell by cell
            print(module.markdown(result), flush=True)
            continue
        result["command"] = command
        result["environment"] = environment()
        result["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        result["wall_seconds"] = round(time.perf_counter() - began, 1)
        module.RESULT_FILE.parent.mkdir(exist_ok=True)
        module.RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
        print(module.markdown(result), flush=True)
    RESULTS_MD.write_text(report(command, selected))
    print(f"wrote {RESULTS_MD.relative_to(ROOT)}")
    return 0


def report(command: str, ran: list[str]) -> str:
    """RESULTS.md: provenance first, then each benchmark's section from its JSON."""
    results: dict[str, dict[str, Any]] = {
        name: json.loads(module.RESULT_FILE.read_text())
        for name, module in BENCHMARKS.items()
        if module.RESULT_FILE.exists()
    }
    if ran:
        env, note = results[ran[0]]["environment"], ""
        if set(ran) != set(DEFAULT):
            note = f" (ran: {', '.join(ran)}; other sections are from their last run)"
    else:  # --report-only: the provenance is that of the runs that made the results
        first = next(iter(results.values()), {})
        env = first.get("environment") or environment()
        commands = sorted({r["command"] for r in results.values()})
        command = commands[0] if len(commands) == 1 else "see run times"
        note = " (RESULTS.md rebuilt with --report-only)"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    seeds = results.get(privacy_utility.NAME, {}).get("seeds", "—")
    lines = [
        "# fedfin benchmarks: results",
        "",
        "Generated by `python -m benchmarks` (see [README.md](README.md)); do not edit by hand.",
        "",
        f"- **Command**: `{command}`{note}",
        f"- **Machine**: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB RAM, "
        f"{env['os']}; shared with other work (load average {env['load_average']} at the "
        "start), so absolute times are noisy; ratios and AUCs are not.",
        f"- **Versions**: Python {env['python']}; {versions}; fedfin commit "
        f"{env['git_commit']}{' + uncommitted changes' if env['git_dirty'] else ''}.",
        f"- **Seeds**: privacy-utility {seeds} (split, pretraining, DP noise and "
        "initialisation); the other benchmarks use seed 0.",
        "- **Run times**: "
        + "; ".join(
            f"{name} {r['wall_seconds']} s (`{r['command']}`, {r['finished']})"
            for name, r in results.items()
        )
        + ".",
        "",
    ]
    lines += [
        f"- {module.headline(results[name])}"
        for name, module in BENCHMARKS.items()
        if name in results
    ]
    lines.append("")
    for name, module in BENCHMARKS.items():
        if name in results:
            lines += [module.markdown(results[name]), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
