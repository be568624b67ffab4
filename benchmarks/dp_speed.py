"""DP training speed: samples/s without DP, with Opacus hooks and with Opacus ghost clipping.

Same model (fedfin's `CreditModel`, default shape), same data, same batch size and Adam in
each mode; one torch thread (what each simulated bank gets); each mode runs `--repeats` times,
interleaved, and the fastest run counts. DP modes use Poisson sampling,
clipping norm 1 and noise multiplier 1, as `client/dp_training.py` does; `fedfin
train_with_dp` is that production function itself (its own book-kept clipping, Opacus'
noise and accountant, all of it).
- one epoch of a synthetic bank (`--speed-rows`), at batch 64 (fedfin's default) and 1024;
- a large synthetic bank (>= 1,000,000 rows): a fixed number of steps (`--large-steps`);
- one whole epoch of a 1,000,000-row bank (`--epoch-rows`) at expected batch 1024: fedfin's
  `train_with_dp` (q = 1/round(rows/1024), 1/q steps) against a non-private epoch of the same
  model at batch 1024 (shuffle, gather by index, plain Adam), interleaved; wall-clock and
  this process's CPU time (`--epoch-only`: this suite alone, the others kept from the last run).
Also measured, per step: Opacus' Poisson sampler alone (one random number per row per step)
and its DataLoader's per-row fetch and collate, against fedfin's O(batch) `poisson_batches`.
The target is DP overhead (non-private samples/s over DP samples/s) <= 1.5x.
"""

import argparse
import functools
import math
import platform
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedfin.client.dp_training import DpStepPlan, train_with_dp
from fedfin.client.poisson_batches import poisson_batches, poisson_indices
from fedfin.common.config import ModelConfig
from fedfin.common.model import build_model
from fedfin.common.schema import EncodedTable, FeatureSchema
from fedfin.common.synthetic import GROUP_COLUMN, LABEL, PUBLIC_GROUP, generate_credit_data
from fedfin.common.tensors import as_dataset

NAME = "dp-speed"
RESULTS = Path(__file__).resolve().parent / "results"
RESULT_FILE = RESULTS / "dp_speed.json"
PLOT_FILE = RESULTS / "dp_speed.png"
TARGET_OVERHEAD = 1.5
NOISE, CLIP, LEARNING_RATE = 1.0, 1.0, 2e-3
CLIPPING = "book-keeping"  # fedfin's own per-example clipping (client/clipped_gradients.py)
MODES = ("non-private", "opacus hooks", "opacus ghost", "fedfin train_with_dp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(NAME)
    group.add_argument("--speed-rows", type=int, default=100_000, help="bank rows, one epoch")
    group.add_argument("--large-rows", type=int, default=1_000_000, help="large bank rows")
    group.add_argument("--large-steps", type=int, default=500, help="steps on the large bank")
    group.add_argument("--repeats", type=int, default=2, help="runs per mode; the fastest counts")
    group.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1024])
    group.add_argument("--epoch-rows", type=int, default=1_000_000, help="rows, one DP epoch")
    group.add_argument("--epoch-batch", type=int, default=1024, help="that epoch's batch")
    group.add_argument(
        "--epoch-only",
        action="store_true",
        help="rerun only the bank-scale epoch; keep the other suites from the last results",
    )
    group.add_argument(
        "--epoch-steps",
        type=int,
        default=0,
        help="time only this many steps of that epoch and extrapolate (0: the whole epoch)",
    )


@functools.lru_cache(maxsize=1)  # the 1M-row bank serves two suites; building it takes ~30 s
def synthetic_bank(rows: int, seed: int = 0) -> tuple[FeatureSchema, EncodedTable]:
    """A bank of about `rows` rows; the schema is fitted on the generator's public pool."""
    frame = generate_credit_data(math.ceil(rows / 0.6), banks=1, seed=seed)
    public = frame[frame[GROUP_COLUMN] == PUBLIC_GROUP]
    bank = frame[frame[GROUP_COLUMN] != PUBLIC_GROUP]
    schema = FeatureSchema.fit(public, LABEL, "1", exclude=(GROUP_COLUMN,), source="synthetic")
    return schema, schema.transform(bank, "synthetic bank")


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
    while True:
        yield from loader


def _train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    loader: DataLoader,
    steps: int,
) -> tuple[int, float]:
    """(samples seen, seconds) for `steps` optimiser steps."""
    batches = _batches(loader)
    samples = 0
    started = time.perf_counter()
    for _ in range(steps):
        numeric, categorical, target = next(batches)
        optimizer.zero_grad()
        criterion(model(numeric, categorical), target).backward()
        optimizer.step()
        samples += len(target)
    return samples, time.perf_counter() - started


def measure(
    mode: str, schema: FeatureSchema, table: EncodedTable, batch_size: int, steps: int
) -> dict[str, float]:
    """samples/s of `steps` steps of one mode, on a freshly initialised model."""
    model = build_model(schema, ModelConfig(), seed=0)
    rows = len(table.numeric)
    if mode == "fedfin train_with_dp":
        plan = DpStepPlan(
            "full", NOISE, CLIP, batch_size, batch_size / rows, LEARNING_RATE, 0, steps
        )
        started = time.perf_counter()
        train_with_dp(model, table, plan, [], torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - started
        samples = steps * batch_size  # expected: Poisson batches average `batch_size`
        return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}
    dataset = as_dataset(table)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    criterion: nn.Module = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    module: nn.Module = model
    if mode != "non-private":
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="prv")
        common = {
            "module": model,
            "optimizer": optimizer,
            "data_loader": DataLoader(dataset, batch_size=batch_size),
            "noise_multiplier": NOISE,
            "max_grad_norm": CLIP,
            "poisson_sampling": True,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode == "opacus ghost":
                module, optimizer, criterion, loader = engine.make_private(
                    **common, criterion=criterion, grad_sample_mode="ghost"
                )
            else:
                module, optimizer, loader = engine.make_private(**common, grad_sample_mode="hooks")
    module.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        samples, seconds = _train_steps(module, optimizer, criterion, loader, steps)
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def poisson_sampler_ms(rows: int, batch_size: int, draws: int = 200) -> float:
    """Milliseconds per step of Opacus' Poisson sampler alone (one uniform draw per row)."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    sampler = UniformWithReplacementSampler(
        num_samples=rows, sample_rate=batch_size / rows, steps=draws
    )
    started = time.perf_counter()
    for _ in sampler:
        pass
    return 1000 * (time.perf_counter() - started) / draws


def sampling_ms(table: EncodedTable, batch_size: int, draws: int = 200) -> dict[str, float]:
    """Milliseconds per step to pick and assemble one Poisson batch, before and after.

    Before: Opacus' `DPDataLoader` (one uniform draw per row, then a per-row fetch and
    collate). After: `poisson_batches` (Binomial size, distinct rows, one gather per tensor).
    """
    from opacus.data_loader import DPDataLoader

    rows = len(table.numeric)
    rate = batch_size / rows
    dataset = as_dataset(table)
    generator = torch.Generator().manual_seed(0)
    loader = iter(DPDataLoader(dataset, sample_rate=rate, generator=generator))
    started = time.perf_counter()
    for _ in range(draws):
        next(loader)
    before = 1000 * (time.perf_counter() - started) / draws
    started = time.perf_counter()
    for _ in range(draws):
        poisson_indices(rows, rate, generator)
    after_indices = 1000 * (time.perf_counter() - started) / draws
    batches = poisson_batches(dataset.tensors, rate, generator)
    started = time.perf_counter()
    for _ in range(draws):
        next(batches)
    after = 1000 * (time.perf_counter() - started) / draws
    return {
        "opacus_sampler_ms": poisson_sampler_ms(rows, batch_size, draws),
        "opacus_data_loader_ms": before,
        "fedfin_indices_ms": after_indices,
        "fedfin_batch_ms": after,
    }


def non_private_epoch_seconds(
    schema: FeatureSchema, table: EncodedTable, batch_size: int, steps: int
) -> tuple[float, float]:
    """(wall, CPU) seconds of `steps` steps of a shuffled non-private epoch, rows gathered by
    index, plain Adam."""
    model = build_model(schema, ModelConfig(), seed=0)
    tensors = as_dataset(table).tensors
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    criterion = nn.BCEWithLogitsLoss()
    model.train()
    started, cpu_started = time.perf_counter(), time.process_time()
    order = torch.randperm(len(table.numeric), generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        rows = order[step * batch_size : (step + 1) * batch_size]
        numeric, categorical, target = (t.index_select(0, rows) for t in tensors)
        optimizer.zero_grad()
        criterion(model(numeric, categorical), target).backward()
        optimizer.step()
    return time.perf_counter() - started, time.process_time() - cpu_started


def dp_epoch_seconds(
    schema: FeatureSchema, table: EncodedTable, batch_size: int, rate: float, steps: int
) -> tuple[float, float]:
    """(wall, CPU) seconds of `steps` steps of fedfin's `train_with_dp` (set-up, accountant
    and all), Poisson rate q."""
    model = build_model(schema, ModelConfig(), seed=0)
    plan = DpStepPlan("full", NOISE, CLIP, batch_size, rate, LEARNING_RATE, 0, steps)
    started, cpu_started = time.perf_counter(), time.process_time()
    train_with_dp(model, table, plan, [], torch.Generator().manual_seed(0))
    return time.perf_counter() - started, time.process_time() - cpu_started


def _epoch_suite(args: argparse.Namespace, bar: Any) -> dict[str, Any]:
    """One DP epoch vs one non-private epoch of a large bank, interleaved, fastest kept."""
    schema, table = synthetic_bank(args.epoch_rows)
    rows, batch = len(table.numeric), args.epoch_batch
    batches_per_epoch = max(1, round(rows / batch))  # q = 1/k: the unit fraction nearest B/N
    rate = 1.0 / batches_per_epoch
    dp_steps = batches_per_epoch  # 1/q Poisson steps see each row once in expectation
    plain_steps = math.ceil(rows / batch)
    if args.epoch_steps > 0:
        dp_steps, plain_steps = min(dp_steps, args.epoch_steps), min(plain_steps, args.epoch_steps)
    dp_seconds, plain_seconds = (math.inf, math.inf), (math.inf, math.inf)
    for _ in range(args.repeats):  # min of (wall, CPU) pairs: the fastest run's both times
        bar.set_postfix(bank="one DP epoch", mode="non-private")
        plain_seconds = min(
            plain_seconds, non_private_epoch_seconds(schema, table, batch, plain_steps)
        )
        bar.update(1)
        bar.set_postfix(bank="one DP epoch", mode="fedfin train_with_dp")
        dp_seconds = min(dp_seconds, dp_epoch_seconds(schema, table, batch, rate, dp_steps))
        bar.update(1)
    (dp_seconds, dp_cpu), (plain_seconds, plain_cpu) = dp_seconds, plain_seconds
    plain_epoch = plain_seconds * math.ceil(rows / batch) / plain_steps
    dp_epoch = dp_seconds * batches_per_epoch / dp_steps
    return {
        "rows": rows,
        "batch_size": batch,
        "sample_rate": rate,
        "expected_batch": rows * rate,
        "dp_steps_per_epoch": batches_per_epoch,
        "non_private_steps_per_epoch": math.ceil(rows / batch),
        "dp_steps_timed": dp_steps,
        "non_private_steps_timed": plain_steps,
        "extrapolated": dp_steps < batches_per_epoch or plain_steps < math.ceil(rows / batch),
        "repeats": args.repeats,
        "non_private_epoch_s": plain_epoch,
        "dp_epoch_s": dp_epoch,
        "non_private_ms_per_step": 1000 * plain_seconds / plain_steps,
        "dp_ms_per_step": 1000 * dp_seconds / dp_steps,
        "overhead": dp_epoch / plain_epoch,
        "non_private_cpu_ms_per_step": 1000 * plain_cpu / plain_steps,
        "dp_cpu_ms_per_step": 1000 * dp_cpu / dp_steps,
        "cpu_overhead": (dp_cpu / dp_steps) / (plain_cpu / plain_steps),
        "clipping": CLIPPING,
        "sampling": sampling_ms(table, batch),
    }


def _suite(
    label: str,
    rows: int,
    steps_for: dict[int, int],
    modes: tuple[str, ...],
    repeats: int,
    bar: Any,
) -> dict[str, Any]:
    """Each mode `repeats` times, interleaved, keeping the fastest: other work on a shared
    machine only ever slows a run down."""
    schema, table = synthetic_bank(rows)
    out: dict[str, Any] = {"label": label, "rows": len(table.numeric), "batches": {}}
    for batch_size, steps in steps_for.items():
        figures: dict[str, Any] = {"steps": steps, "repeats": repeats}
        for _ in range(repeats):
            for mode in modes:
                bar.set_postfix(bank=label, batch=batch_size, mode=mode)
                cell = measure(mode, schema, table, batch_size, steps)
                if mode not in figures or cell["samples_per_s"] > figures[mode]["samples_per_s"]:
                    figures[mode] = cell
                bar.update(1)
        base = figures["non-private"]["samples_per_s"]
        for mode in modes[1:]:
            figures[mode]["overhead"] = base / figures[mode]["samples_per_s"]
        figures["sampler_ms_per_step"] = poisson_sampler_ms(len(table.numeric), batch_size)
        figures["non_private_ms_per_step"] = 1000 * figures["non-private"]["seconds"] / steps
        out["batches"][str(batch_size)] = figures
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before = _load_average()
    earlier = _earlier_suites() if args.epoch_only else None
    runs = 2 * args.repeats
    if earlier is None:
        runs += len(args.batch_sizes) * (len(MODES) + 3) * args.repeats
    bar = tqdm(total=runs, desc=NAME, unit="run")
    try:
        if earlier is None:
            epoch = {b: math.ceil(args.speed_rows / b) for b in args.batch_sizes}
            one_epoch = _suite("one epoch", args.speed_rows, epoch, MODES, args.repeats, bar)
            fixed = {b: args.large_steps for b in args.batch_sizes}
            large = _suite(
                "large bank, fixed steps",
                args.large_rows,
                fixed,
                ("non-private", "opacus hooks", "opacus ghost"),
                args.repeats,
                bar,
            )
        else:
            one_epoch, large = earlier["one_epoch"], earlier["large_bank"]
        epoch_at_scale = _epoch_suite(args, bar)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    result = {
        "torch_threads": 1,
        "repeats": args.repeats,
        "production_clipping": CLIPPING,
        "noise_multiplier": NOISE,
        "max_grad_norm": CLIP,
        "target_overhead": TARGET_OVERHEAD,
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "processor": platform.processor() or platform.machine(),
        "one_epoch": one_epoch,
        "large_bank": large,
        "epoch_at_scale": epoch_at_scale,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if earlier is not None:
        result["suites_from_earlier_run"] = {
            "command": earlier["command"],
            "finished": earlier["finished"],
            "production_clipping": earlier.get(
                "production_clipping", f"Opacus {earlier.get('production_grad_sample_mode')}"
            ),
        }
    RESULTS.mkdir(exist_ok=True)
    plot(result, PLOT_FILE)
    return result


def _earlier_suites() -> dict[str, Any]:
    """The last full run's results, whose small-bank and fixed-step suites `--epoch-only` keeps."""
    import json

    if not RESULT_FILE.exists():
        raise SystemExit(f"--epoch-only keeps the other suites of {RESULT_FILE}: run them first")
    earlier: dict[str, Any] = json.loads(RESULT_FILE.read_text())
    kept = earlier.get("suites_from_earlier_run")
    if kept is not None:  # already a partial run: keep pointing at the run that made them
        earlier = {**earlier, **kept}
    return earlier


def _load_average() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def plot(result: dict[str, Any], path: Path) -> None:
    """samples/s by mode, per bank size and batch size (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = []
    for suite in (result["one_epoch"], result["large_bank"]):
        for batch, figures in suite["batches"].items():
            groups.append((f"{suite['rows']:,} rows\nbatch {batch}", figures))
    figure, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.2
    for index, mode in enumerate(MODES):
        values = [f[mode]["samples_per_s"] if mode in f else 0 for _, f in groups]
        positions = [g + (index - 1.5) * width for g in range(len(groups))]
        axis.bar(positions, values, width, label=mode)
    axis.set_xticks(range(len(groups)), [name for name, _ in groups])
    axis.set_yscale("log")
    axis.set_ylabel("samples / s (1 torch thread)")
    axis.set_title("DP-SGD training speed: non-private vs Opacus hooks vs ghost clipping")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(result: dict[str, Any]) -> str:
    target = result["target_overhead"]
    lines = [
        "## DP training speed",
        "",
        f"Command: `{result['command']}`; {result['seconds']} s; 1 torch thread; fastest of "
        f"{result.get('repeats', 1)} interleaved runs per mode; load average "
        f"{result['load_average_before']} before, {result['load_average_after']} after "
        "(the machine is shared: read ratios, not absolute speeds). Model: fedfin's default "
        "`CreditModel`; Adam; DP: Poisson sampling, clip 1.0, σ 1.0.",
        *_earlier_note(result),
        "",
        "| bank rows | what is timed | batch | mode | samples/s | DP overhead (× slower) "
        f"| ≤ {target}x? |",
        "|---|---|---|---|---|---|---|",
    ]
    for suite in (result["one_epoch"], result["large_bank"]):
        for batch, figures in suite["batches"].items():
            timed = (
                "one epoch"
                if suite is result["one_epoch"]
                else f"{figures['steps']:,} steps (fixed)"
            )
            for mode in MODES:
                if mode not in figures:
                    continue
                cell = figures[mode]
                overhead = cell.get("overhead")
                met = "" if overhead is None else ("yes" if overhead <= target else "**no**")
                lines.append(
                    f"| {suite['rows']:,} | {timed} | {batch} | {mode} | "
                    f"{cell['samples_per_s']:,.0f} | "
                    f"{'—' if overhead is None else f'{overhead:.2f}'} | {met} |"
                )
    lines += [
        "",
        "Opacus' Poisson sampler alone (one uniform draw per row, every step), ms per step: "
        + "; ".join(
            f"{suite['rows']:,} rows, batch {batch}: {figures['sampler_ms_per_step']:.2f} ms "
            f"(a non-private step takes {figures['non_private_ms_per_step']:.2f} ms)"
            for suite in (result["one_epoch"], result["large_bank"])
            for batch, figures in suite["batches"].items()
        )
        + ".",
        "",
        *_epoch_at_scale(result),
        *_why(result),
        "",
        f"![DP speed](results/{PLOT_FILE.name})",
        "",
    ]
    return "\n".join(lines)


def _epoch_at_scale(result: dict[str, Any]) -> list[str]:
    """The bank-scale epoch: fedfin's `train_with_dp` against a non-private epoch."""
    epoch = result.get("epoch_at_scale")
    if epoch is None:
        return []
    target, sampling = result["target_overhead"], epoch["sampling"]
    timed = (
        f"{epoch['dp_steps_timed']:,} DP and {epoch['non_private_steps_timed']:,} non-private "
        "steps timed and extrapolated to an epoch"
        if epoch["extrapolated"]
        else "whole epochs timed"
    )
    met = "yes" if epoch["overhead"] <= target else "**no**"
    cpu_overhead = f"{epoch['cpu_overhead']:.2f}" if "cpu_overhead" in epoch else "—"
    return [
        f"### One epoch of a {epoch['rows']:,}-row bank, expected batch {epoch['batch_size']}",
        "",
        f"fedfin's `train_with_dp` (clipping: {_clipping(epoch)}, "
        f"q = 1/{epoch['dp_steps_per_epoch']:,}, so {epoch['expected_batch']:.0f} rows a step "
        f"on average, {epoch['dp_steps_per_epoch']:,} steps, set-up and accountant included) "
        f"against a non-private epoch of the same model ({epoch['non_private_steps_per_epoch']:,}"
        f" shuffled batches of {epoch['batch_size']}, gathered by index, plain Adam); "
        f"{timed}; fastest of {epoch['repeats']} interleaved runs each.",
        "",
        f"| what | ms per step | seconds per epoch | DP overhead (× slower) | ≤ {target}x? "
        "| CPU ms per step | CPU overhead |",
        "|---|---|---|---|---|---|---|",
        f"| non-private | {epoch['non_private_ms_per_step']:.2f} | "
        f"{epoch['non_private_epoch_s']:.1f} | — | | {_cpu(epoch, 'non_private')} | — |",
        f"| fedfin train_with_dp | {epoch['dp_ms_per_step']:.2f} | {epoch['dp_epoch_s']:.1f} | "
        f"{epoch['overhead']:.2f} | {met} | {_cpu(epoch, 'dp')} | {cpu_overhead} |",
        "",
        f"**Target DP overhead ≤ {target}x for a bank-scale epoch: "
        + ("met" if epoch["overhead"] <= target else "not met")
        + f"** ({epoch['overhead']:.2f}x wall-clock). CPU time (this process's, immune to "
        "other work pre-empting it on the shared machine) is given beside wall-clock time.",
        "",
        f"Picking and assembling one Poisson batch at {epoch['rows']:,} rows, ms per step: "
        f"before, Opacus' `DPDataLoader` {sampling['opacus_data_loader_ms']:.2f} (its sampler "
        f"alone {sampling['opacus_sampler_ms']:.2f}, one uniform draw per row); after, "
        f"fedfin's `poisson_batches` {sampling['fedfin_batch_ms']:.2f} (indices alone "
        f"{sampling['fedfin_indices_ms']:.2f}: a Binomial batch size, then that many distinct "
        "rows, then one gather per tensor).",
        "",
    ]


def _why(result: dict[str, Any]) -> list[str]:
    """Where the overhead goes, from the measured figures."""
    small, large = result["one_epoch"], result["large_bank"]
    low, high = min(small["batches"], key=int), max(small["batches"], key=int)
    big = large["batches"][low]
    ghost_vs_hooks = [
        f["opacus ghost"]["overhead"] / f["opacus hooks"]["overhead"]
        for suite in (small, large)
        for f in suite["batches"].values()
    ]
    return [
        "Where the overhead goes:",
        "",
        f"- **Per-step fixed cost.** A non-private step of this small model takes "
        f"{small['batches'][low]['non_private_ms_per_step']:.1f} ms at batch {low}; Opacus adds "
        "per-layer hooks, per-example gradient norms (ghost clipping runs a second backward "
        "pass), clipping and noise on every parameter each step. Larger batches amortise it: "
        f"ghost overhead {small['batches'][low]['opacus ghost']['overhead']:.1f}x at batch {low} "
        f"vs {small['batches'][high]['opacus ghost']['overhead']:.1f}x at batch {high} "
        f"({small['rows']:,} rows).",
        f"- **Poisson sampling is O(rows) per step.** Opacus draws one uniform number per row "
        f"every step to pick the batch: {big['sampler_ms_per_step']:.1f} ms per step at "
        f"{large['rows']:,} rows, against {big['non_private_ms_per_step']:.1f} ms for a whole "
        f"non-private step at batch {low}, which is why the large bank's overhead is "
        f"{big['opacus ghost']['overhead']:.1f}x. Drawing the batch size from Binomial(rows, q) "
        "and then that many distinct rows gives the same Poisson subsampling in O(batch) "
        "per step, which is what fedfin's `train_with_dp` does (`client/poisson_batches.py`; "
        "the Opacus rows above still use Opacus' sampler).",
        f"- **Ghost clipping vs hooks**: ghost's overhead is {min(ghost_vs_hooks):.2f}-"
        f"{max(ghost_vs_hooks):.2f} times hooks' across these runs"
        + (
            ", so it is not faster on this small model (its second backward pass costs more "
            "than the per-example gradients hooks materialise)."
            if min(ghost_vs_hooks) >= 0.95
            else "."
        ),
        "- **fedfin's own clipping** (`client/clipped_gradients.py`, what `train_with_dp` "
        "uses now): Opacus hooks materialise and clip a B×P per-example gradient per "
        "parameter every step; for Linear, LayerNorm and Embedding layers each example's "
        "gradient norm and the clipped sum follow from the layer's input and output gradient "
        "of one ordinary backward pass (book-keeping), so no per-example gradient is formed. "
        "Noise, scaling, accountant and optimizer step stay Opacus' `DPOptimizer`.",
    ]


def _clipping(epoch: dict[str, Any]) -> str:
    if "clipping" in epoch:
        return f"fedfin {epoch['clipping']}"
    return f"Opacus {epoch.get('grad_sample_mode')}"


def _cpu(epoch: dict[str, Any], which: str) -> str:
    value = epoch.get(f"{which}_cpu_ms_per_step")
    return "—" if value is None else f"{value:.2f}"


def _earlier_note(result: dict[str, Any]) -> list[str]:
    """`--epoch-only` kept the first two suites: say from which run, and with which clipping."""
    earlier = result.get("suites_from_earlier_run")
    if earlier is None:
        return []
    return [
        "",
        f"Only the bank-scale epoch was rerun here (`--epoch-only`); the two suites in the "
        f"next table are from `{earlier['command']}` (finished {earlier['finished']}), when "
        f"`train_with_dp` clipped with {earlier['production_clipping']}: its "
        "'fedfin train_with_dp' rows there are that code's, not the current one's.",
    ]


def headline(result: dict[str, Any]) -> str:
    ghost, hooks = [], []
    for suite in (result["one_epoch"], result["large_bank"]):
        for figures in suite["batches"].values():
            ghost.append(figures["opacus ghost"]["overhead"])
            hooks.append(figures["opacus hooks"]["overhead"])
    line = (
        f"**DP speed**: Opacus ghost clipping trains {min(ghost):.1f}-"
        f"{max(ghost):.1f}x slower than non-private, hooks {min(hooks):.1f}-{max(hooks):.1f}x."
    )
    epoch = result.get("epoch_at_scale")
    if epoch is not None:
        met = epoch["overhead"] <= result["target_overhead"]
        line += (
            f" One epoch of a {epoch['rows']:,}-row bank at expected batch "
            f"{epoch['batch_size']}: fedfin's `train_with_dp` ({_clipping(epoch)} clipping) "
            f"takes {epoch['overhead']:.2f}x a non-private epoch; the ≤ "
            f"{result['target_overhead']}x target is {'met' if met else 'not met'}."
        )
    return line
