"""`fedfin plan`: a public-data-only forecast of whether DP federation pays, and with what plan."""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedfin.common.accounting import calibrate_noise_multiplier
from fedfin.common.config import ModelConfig
from fedfin.common.gradient_signal import GradientSignal, measure_gradient_signal
from fedfin.common.model import CreditModel, build_model
from fedfin.common.planning import PlanQuestion, evaluate, recommend
from fedfin.common.schema import EncodedTable, FeatureSchema
from fedfin.simulations.cli import main
from tests.conftest import Pretrained


def _signal(norm: float, dimension: int = 5_000) -> GradientSignal:
    return GradientSignal(norm, dimension, 0.5, 1.0, 10_000, 10)


def _table(rows: int, shift_by_group: float, seed: int) -> tuple[EncodedTable, np.ndarray]:
    """Two numeric features; the label's dependence on feature 0 flips sign between groups."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(4), rows // 4)
    numeric = rng.normal(size=(len(groups), 2)).astype(np.float32)
    sign = np.where(groups % 2 == 0, 1.0, -1.0) * shift_by_group
    p = 1 / (1 + np.exp(-(sign * numeric[:, 0] - 2)))
    label = (rng.random(len(groups)) < p).astype(np.float32)
    categorical = np.zeros((len(groups), 0), dtype=np.int64)
    return EncodedTable(numeric=numeric, categorical=categorical, label=label), groups


def _tiny_model() -> CreditModel:
    frame = pd.DataFrame({"a": [0.0, 1.0, 2.0, 3.0], "b": [1.0, 0.0, 1.0, 0.0], "y": [0, 1, 0, 1]})
    schema = FeatureSchema.fit(frame, "y", None, source="test")
    return build_model(schema, ModelConfig(hidden_sizes=(8,)), seed=0)


def _fitted(table: EncodedTable) -> CreditModel:
    """The tiny model trained to the pooled optimum, as pretraining leaves the public model."""
    model = _tiny_model()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=60, line_search_fn="strong_wolfe")
    numeric, categorical = torch.from_numpy(table.numeric), torch.from_numpy(table.categorical)
    assert table.label is not None
    target = torch.from_numpy(table.label)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(numeric, categorical), target
        )
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def test_groups_that_differ_only_by_chance_show_no_signal_however_small() -> None:
    model = _tiny_model()  # untrained: a large pooled gradient, which is not a group signal
    table, _ = _table(4_000, 0.0, seed=1)
    few = measure_gradient_signal(model, table, np.arange(4_000) % 4, max_grad_norm=1.0)
    many = measure_gradient_signal(model, table, np.arange(4_000) % 200, max_grad_norm=1.0)
    # Without the finite-size correction 20-row groups would show about 1/sqrt(20) = 0.22.
    assert few.signal_norm < 0.03 and many.signal_norm < 0.03
    assert many.groups == 200 and few.groups == 4


def test_at_the_pooled_optimum_only_shifted_groups_show_a_signal() -> None:
    same, groups = _table(2_000, 0.0, seed=1)
    shifted, shifted_groups = _table(2_000, 2.0, seed=1)
    plain = measure_gradient_signal(_fitted(same), same, groups, max_grad_norm=1.0)
    moved = measure_gradient_signal(_fitted(shifted), shifted, shifted_groups, 1.0)
    assert moved.signal_norm > 0.05
    assert plain.signal_norm < moved.signal_norm / 3
    assert 0 < plain.mean_clipped_norm <= 1.0


def test_the_plan_uses_the_banks_own_noise_calibration() -> None:
    question = PlanQuestion(bank_rows=10_000, banks=5, epsilon=1.0)
    candidate = evaluate(question, _signal(0.1), sample_rate=0.1, rounds=5)
    assert candidate is not None
    bank_sigma = calibrate_noise_multiplier([], 0.1, 10, 5, 1e-5, 1.0, 0.5, 1.0, 20.0, "rdp")
    assert candidate.noise_multiplier == bank_sigma
    assert candidate.steps == 50 and candidate.expected_batch == pytest.approx(1_000)


def test_more_loans_and_more_epsilon_keep_more_of_the_gain_and_more_banks_do_not() -> None:
    def retained(rows: int, banks: int, epsilon: float) -> float:
        c = evaluate(PlanQuestion(rows, banks, epsilon), _signal(0.05), 0.1, 3)
        assert c is not None
        return c.retained

    assert retained(1_000, 5, 1.0) < retained(10_000, 5, 1.0) < retained(100_000, 5, 1.0)
    assert retained(1_000, 5, 1.0) == retained(1_000, 20, 1.0)  # the map measured no √K gain
    assert retained(1_000, 5, 1.0) < retained(1_000, 5, 8.0)
    assert retained(1_000, 5, math.inf) == 1.0


def test_small_banks_at_epsilon_one_are_told_to_keep_the_public_model() -> None:
    small = recommend(PlanQuestion(1_000, 5, 1.0), _signal(0.05), sample_rates=[0.1], rounds=[3])
    large = recommend(PlanQuestion(100_000, 5, 1.0), _signal(0.05), sample_rates=[0.1], rounds=[3])
    assert small.verdict == "keep the public model" and "noise would remove" in small.reason
    assert large.verdict == "federate"


def test_no_public_signal_means_keep_the_public_model() -> None:
    rec = recommend(PlanQuestion(100_000, 20, 8.0), _signal(0.0), sample_rates=[0.1], rounds=[3])
    assert rec.verdict == "keep the public model"
    assert "no gradient signal" in rec.reason


def test_fedfin_plan_reads_only_public_files_and_writes_its_json(
    pretrained: Pretrained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    public = tmp_path / "public.parquet"
    pretrained.split.public.to_parquet(public)
    out = tmp_path / "plan.json"
    code = main(
        [
            "plan",
            "--encoder",
            str(pretrained.checkpoint_dir),
            "--public-data",
            str(public),
            "--group-by",
            "addr_state",
            "--bank-rows",
            "1000",
            "--epsilon",
            "1,inf",
            "--rounds",
            "3",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "public signal: |g|" in printed and "verdict" in printed
    plan = json.loads(out.read_text())
    assert [p["epsilon"] for p in plan["plans"]] == [1.0, None]
    assert plan["plans"][1]["plan"]["noise_multiplier"] == 0.0
    assert plan["signal"]["rows"] == len(pretrained.split.public)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--bank-rows", "ten"], "--bank-rows"),
        (["--epsilon", "-1"], "--epsilon"),
        (["--group-by", "no_such_column"], "no_such_column"),
    ],
)
def test_bad_plan_flags_get_one_line_naming_the_flag(
    pretrained: Pretrained,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    named: str,
) -> None:
    public = tmp_path / "public.parquet"
    pretrained.split.public.to_parquet(public)
    base = ["plan", "--encoder", str(pretrained.checkpoint_dir), "--public-data", str(public)]
    with_group = [] if "--group-by" in flags else ["--group-by", "addr_state"]
    try:
        code = main([*base, *with_group, "--rounds", "3", "--bank-rows", "1000", *flags])
    except SystemExit as exit_:  # argparse's own refusal
        code = int(exit_.code or 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and named in err[0]


def test_a_bank_signal_at_the_break_even_keeps_exactly_half_the_gain() -> None:
    question = PlanQuestion(10_000, 5, 1.0)
    blind = evaluate(question, _signal(0.0), 0.1, 3)
    assert blind is not None and blind.retained == 0.0
    at_break_even = evaluate(question, _signal(blind.break_even_signal), 0.1, 3)
    assert at_break_even is not None
    assert at_break_even.retained == pytest.approx(0.5)
