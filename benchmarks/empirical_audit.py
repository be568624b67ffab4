"""How tight is `fedfin audit --empirical`, and does it catch broken builds?

For claimed ε 2, 4 and 8 (canaries' mechanism: q = 1, 20 steps, δ 1e-5), runs the one-run
canary audit through the bank's real `train_round` on Lending Club bank 0 (encoder
pretrained on the public pool, as in the tests) for three builds: honest, noise secretly
divided by 10 inside Opacus, and per-example clipping disabled in fedfin's optimizer. Reports the
95% lower bound, the method's ceiling (all guesses right) and the noise diagnostics.
Writes benchmarks/results/empirical_audit.json and .md.
Usage: python -m benchmarks.empirical_audit [--canaries 1000] [--epsilons 2 4 8]
"""

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from benchmarks.lending_club_setup import pretrained_lending_club, write_bank_tables
from fedfin.client.empirical_audit import EmpiricalAudit, EmpiricalAuditConfig, run_empirical_audit

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def noise_divided_by_ten() -> Iterator[None]:
    """The optimizer draws a tenth of the noise; plan, ledger and accountant still say σ."""
    from opacus.optimizers import optimizer as opacus_optimizer
    from opacus.optimizers import optimizer_fast_gradient_clipping as fast_optimizer

    real: Callable[..., torch.Tensor] = opacus_optimizer._generate_noise

    def weaker(std: float, reference: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return real(std / 10, reference, *args, **kwargs)

    with (
        mock.patch.object(fast_optimizer, "_generate_noise", weaker),
        mock.patch.object(opacus_optimizer, "_generate_noise", weaker),
    ):
        yield


@contextmanager
def clipping_disabled() -> Iterator[None]:
    """Per-example clipping off (fedfin clips in its optimizer's `clip_and_accumulate`); the
    noise keeps the planned σC."""
    from fedfin.client.clipped_gradients import ClippedSumOptimizer

    real = ClippedSumOptimizer.clip_and_accumulate

    def clip_nothing(self: ClippedSumOptimizer) -> None:
        planned, self.max_grad_norm = self.max_grad_norm, 1e9
        try:
            real(self)
        finally:
            self.max_grad_norm = planned

    with mock.patch.object(ClippedSumOptimizer, "clip_and_accumulate", clip_nothing):
        yield


BUILDS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "honest": nullcontext,
    "noise / 10": noise_divided_by_ten,
    "clipping off": clipping_disabled,
}


def prepare(directory: Path) -> tuple[Path, Path]:
    """Bank 0's data and an encoder pretrained on the public pool, as the tests use."""
    encoder = directory / "encoder"
    split = pretrained_lending_club(5, encoder)
    return write_bank_tables(split, 0, directory / "data"), encoder


def row(build: str, audit: EmpiricalAudit, seconds: float) -> dict[str, Any]:
    return {"build": build, "seconds": round(seconds, 1), **audit.as_dict()}


def markdown(rows: list[dict[str, Any]], canaries: int, steps: int) -> str:
    lines = [
        "# Empirical (one-run canary) audit: honest vs broken builds",
        "",
        f"`python -m benchmarks.empirical_audit --canaries {canaries}`: {canaries} white-box "
        f"canaries (each in with probability 1/2, q = 1), {steps} DP steps through the bank's "
        "real `train_round` on Lending Club bank 0, fresh encoder, δ = 1e-5, "
        f"{canaries // 10} 'in' and {canaries // 10} 'out' guesses. "
        f"Machine: {platform.machine()}, 1 torch thread.",
        "",
        "| build | claimed ε | σ | right / guesses | 95% lower bound | ceiling "
        "| noise scale / σC/B | excess kurtosis | step corr. | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["diagnostics"]
        lines.append(
            f"| {r['build']} | {r['claimed_epsilon']:.3f} | {r['noise_multiplier']:.3f} "
            f"| {r['correct']} / {r['guesses']} | {r['lower_bound_95']:.3f} "
            f"| {r['ceiling_95']:.3f} | {d['scale_ratio']:.3f} | {d['excess_kurtosis']:.3f} "
            f"| {d['step_correlation']:.3f} | {r['verdict']} |"
        )
    lines += [
        "",
        "The ceiling is the most this audit can show (every guess right): a claim above it "
        "can never be contradicted by the bound, however broken the build; only the noise "
        "diagnostics can catch it there.",
        "",
        "White-box canaries are added after clipping, so the bound does not see a build "
        "without clipping; only the diagnostics can, and only where the unclipped gradients "
        "are a visible part of each update (small σ). On this data per-example gradient "
        "norms reach about 5C, so at σ 4.8 and above such a build looked honest when this "
        "was written (kurtosis within ±0.02), and at σ 2.7 (claimed ε 8) it was caught.",
        "",
        "Seconds per audit (2 shared cores, a CI run beside it): "
        + ", ".join(f"{r['seconds']:g}" for r in rows)
        + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        data, encoder = prepare(Path(scratch))
        for epsilon in args.epsilons:
            for build, patch in BUILDS.items():
                config = EmpiricalAuditConfig(
                    canaries=args.canaries, epsilon=epsilon, steps=args.steps
                )
                started = time.perf_counter()
                with patch():
                    audit = run_empirical_audit(data, encoder, config)
                rows.append(row(build, audit, time.perf_counter() - started))
                print(f"ε {epsilon:g} {build}: {audit.verdict}, bound {audit.lower_bound:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "empirical_audit.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    (RESULTS / "empirical_audit.md").write_text(markdown(rows, args.canaries, args.steps))


if __name__ == "__main__":
    main()
