"""`fedfin audit --empirical` has power: a build with its noise cut or its clipping off is
caught, an honest one passes, and the one-run bound matches values derived by hand.

Each audit trains one small round (200 canaries, 20 steps) through the bank's real
`train_round`; the broken builds are made by patching the optimizer only (Opacus' noise,
fedfin's clipping), after the plan and the ledger already say the honest σ and C.
"""

import itertools
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from opacus.optimizers import optimizer as opacus_optimizer
from opacus.optimizers import optimizer_fast_gradient_clipping as fast_optimizer

from fedfin.client.clipped_gradients import ClippedSumOptimizer
from fedfin.client.empirical_audit import EmpiricalAuditConfig, run_empirical_audit
from fedfin.common.errors import ConfigError
from fedfin.common.one_run_audit import (
    epsilon_lower_bound,
    guess_from_scores,
    noise_diagnostics,
    p_value,
    perfect_guess_ceiling,
)
from fedfin.simulations.cli import main
from tests.conftest import Pretrained, write_bank_data

SMALL = EmpiricalAuditConfig(canaries=200, epsilon=1.0, steps=20, seed=0)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def data(pretrained: Pretrained, tmp_path: Path) -> Path:
    return write_bank_data(pretrained, 0, tmp_path / "data")


# --- the statistics, against values derived independently ------------------------------


def _exact_tail(v: int, r: int, p: float) -> float:
    """P[Binomial(r, p) >= v] by summing the terms: no scipy."""
    return sum(math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(max(v, 0), r + 1))


def test_the_perfect_guess_ceiling_without_delta_is_the_logit_of_beta_to_the_one_over_r() -> None:
    """All r guesses right: P[W >= r] = p^r <= 0.05, so ε = log(p / (1 - p)), p = 0.05^(1/r)."""
    for guesses in (10, 40, 200):
        p = 0.05 ** (1 / guesses)
        by_hand = math.log(p / (1 - p))
        assert perfect_guess_ceiling(1000, guesses, 0.0) == pytest.approx(by_hand, abs=1e-3)


def test_the_delta_term_matches_a_hand_summed_binomial() -> None:
    """Theorem 3's bound at one ε, each tail summed from math.comb, the max taken over i."""
    canaries, guesses, correct, delta, epsilon = 50, 20, 17, 1e-3, 1.2
    p = math.exp(epsilon) / (1 + math.exp(epsilon))
    f_v = _exact_tail(correct, guesses, p)
    alpha = max((_exact_tail(correct - i, guesses, p) - f_v) / i for i in range(1, canaries + 1))
    by_hand = f_v + 2 * canaries * delta * alpha
    assert p_value(epsilon, delta, canaries, guesses, correct) == pytest.approx(by_hand, rel=1e-9)


def test_the_bound_is_where_the_p_value_crosses_five_percent_and_delta_lowers_it() -> None:
    bound = epsilon_lower_bound(1000, 200, 180, 1e-5)
    assert (
        p_value(bound, 1e-5, 1000, 200, 180) <= 0.05 < p_value(bound + 1e-3, 1e-5, 1000, 200, 180)
    )
    assert bound < epsilon_lower_bound(1000, 200, 180, 0.0)
    assert perfect_guess_ceiling(1000, 200, 1e-5) < perfect_guess_ceiling(1000, 200, 0.0)


def test_more_right_guesses_never_lower_the_bound_and_chance_gives_zero() -> None:
    bounds = [epsilon_lower_bound(200, 40, v, 1e-5) for v in range(20, 41)]
    assert all(a <= b for a, b in itertools.pairwise(bounds))
    assert bounds[0] == 0.0  # half right is what guessing gives
    assert bounds[-1] == pytest.approx(perfect_guess_ceiling(200, 40, 1e-5))


def test_guesses_take_the_top_and_bottom_scores_and_abstain_in_between() -> None:
    scores = np.array([5.0, -3.0, 0.1, 4.0, -2.0, 0.0])
    included = np.array([True, False, False, False, True, True])
    outcome = guess_from_scores(scores, included, 2)  # in: 5.0, 4.0; out: -3.0, -2.0
    assert (outcome.guesses, outcome.correct) == (4, 2)
    with pytest.raises(ConfigError):
        guess_from_scores(scores, included, 4)


def test_noise_diagnostics_pass_gaussian_noise_and_fail_heavy_tails_or_repeated_noise() -> None:
    rng = np.random.default_rng(0)
    gaussian = rng.normal(0, 0.5, (20, 5000))
    assert noise_diagnostics(gaussian, 0.5).ok
    heavy = rng.standard_t(3, (20, 5000)) * 0.5
    assert noise_diagnostics(heavy, 0.5).excess_kurtosis > 1.0
    repeated = np.repeat(gaussian[:1], 20, axis=0)
    assert noise_diagnostics(repeated, 0.5).step_correlation > 0.9
    assert not noise_diagnostics(gaussian * 2, 0.5).ok


# --- the real training path: broken builds are caught, the honest one is not --------------


def _noise_divided_by(factor: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build whose optimizer secretly draws 1/factor of the noise; the ledger says σ."""
    real: Callable[..., torch.Tensor] = opacus_optimizer._generate_noise

    def weaker(std: float, reference: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return real(std / factor, reference, *args, **kwargs)

    monkeypatch.setattr(fast_optimizer, "_generate_noise", weaker)
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", weaker)


def _clipping_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build whose per-example clipping is off; noise still σC with the planned C.

    fedfin clips in its own optimizer's `clip_and_accumulate`, whose C also sets the noise."""
    real = ClippedSumOptimizer.clip_and_accumulate

    def clip_nothing(self: ClippedSumOptimizer) -> None:
        planned, self.max_grad_norm = self.max_grad_norm, 1e9
        try:
            real(self)
        finally:
            self.max_grad_norm = planned

    monkeypatch.setattr(ClippedSumOptimizer, "clip_and_accumulate", clip_nothing)


def test_noise_cut_tenfold_gives_a_lower_bound_above_the_claimed_epsilon(
    pretrained: Pretrained, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _noise_divided_by(10.0, monkeypatch)
    audit = run_empirical_audit(data, pretrained.checkpoint_dir, SMALL)
    assert audit.claimed_epsilon == pytest.approx(1.0, abs=0.02)
    assert audit.diagnostics.scale_ratio < 0.2  # the noise, measured, is a tenth of σC/B
    assert audit.lower_bound > audit.claimed_epsilon, audit.as_dict()
    assert audit.verdict.startswith("FAIL")


def test_clipping_disabled_fails_the_noise_diagnostics(
    pretrained: Pretrained, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clipping_disabled(monkeypatch)
    # Unclipped gradients show only where they are a visible part of the update: small σ.
    # At ε 8 the excess kurtosis straddled its limit (0.11-1.2 against 0.12 over the split
    # key's draws); at ε 16 it measured 1.3-6.6 against the same limit.
    audit = run_empirical_audit(data, pretrained.checkpoint_dir, replace(SMALL, epsilon=16.0))
    assert not audit.diagnostics.ok, audit.as_dict()
    assert audit.verdict != "ok"


@pytest.mark.parametrize("epsilon", [1.0, 8.0])
def test_the_honest_build_stays_below_its_claim_and_its_noise_looks_like_the_plan(
    epsilon: float, pretrained: Pretrained, data: Path
) -> None:
    audit = run_empirical_audit(data, pretrained.checkpoint_dir, replace(SMALL, epsilon=epsilon))
    assert audit.lower_bound < audit.claimed_epsilon, audit.as_dict()
    assert audit.diagnostics.ok, audit.as_dict()
    assert audit.verdict == "ok"
    assert audit.ceiling == pytest.approx(perfect_guess_ceiling(200, 40, 1e-5))


def test_the_command_prints_the_table_writes_json_and_png_and_touches_no_state(
    pretrained: Pretrained, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "audit.json"
    plot = tmp_path / "audit.png"
    code = main(
        [
            "audit",
            "--empirical",
            "--data",
            str(data),
            "--encoder",
            str(pretrained.checkpoint_dir),
            "--canaries",
            "100",
            "--steps",
            "10",
            "--epsilon",
            "2",
            "--json",
            str(report),
            "--plot",
            str(plot),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "95% lower bound" in out and "verdict" in out
    assert report.read_text().count('"lower_bound_95"') == 1
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in data.iterdir()) == ["test.parquet", "train.parquet"]


def test_bad_input_is_one_line_and_a_non_zero_exit(
    pretrained: Pretrained, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    encoder = str(pretrained.checkpoint_dir)
    assert (
        main(
            [
                "audit",
                "--empirical",
                "--data",
                str(data),
                "--encoder",
                encoder,
                "--canaries",
                "100000",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--canaries" in err
    assert main(["audit", "--empirical", "--encoder", encoder]) != 0
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["audit"]) == 2  # neither a ledger to check nor --empirical
    assert "PATH" in capsys.readouterr().err


def test_a_caught_build_makes_the_command_exit_4_with_one_line(
    pretrained: Pretrained,
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _noise_divided_by(10.0, monkeypatch)
    args = ["audit", "--empirical", "--data", str(data), "--encoder"]
    args += [str(pretrained.checkpoint_dir), "--canaries", "100", "--steps", "10"]
    args += ["--epsilon", "1", "--plot", str(tmp_path / "caught.png")]
    assert main(args) == 4
    err = capsys.readouterr().err.strip()
    assert err == "fedfin audit: error: empirical audit: FAIL: ε lower bound above the claim"
