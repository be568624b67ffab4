"""The `fedfin` command as a person runs it: help, pretraining, and one clear line per error."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.synthetic import generate_credit_data
from fedfin.simulations.cli import main

FEDFIN = Path(sys.executable).with_name("fedfin")  # the installed console script


def fedfin(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FEDFIN), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """CSV files a user might pass: good synthetic bank data and two broken variants."""
    directory = tmp_path_factory.mktemp("tables")
    loans = generate_credit_data(3_000, 6, seed=0)
    paths = {
        "good": directory / "loans.csv",
        "no-label": directory / "no_label.csv",
        "three-labels": directory / "three_labels.csv",
    }
    loans.to_csv(paths["good"], index=False)
    loans.drop(columns=["default"]).to_csv(paths["no-label"], index=False)
    loans.assign(default=loans.index % 3).to_csv(paths["three-labels"], index=False)
    return paths


def test_the_installed_console_script_exists() -> None:
    assert FEDFIN.exists(), f"{FEDFIN} is missing; is the project installed in this venv?"


def test_help_explains_the_subcommands(tmp_path: Path) -> None:
    result = fedfin("--help", cwd=tmp_path)

    assert result.returncode == 0
    assert "pretrain" in result.stdout
    assert "train the shared encoder on public/source data" in result.stdout
    assert "federated transfer learning for credit risk" in result.stdout


def test_pretrain_help_explains_its_flags(tmp_path: Path) -> None:
    result = fedfin("pretrain", "--help", cwd=tmp_path)

    assert result.returncode == 0
    for flag in ("--data", "--label", "--positive-label", "--partition-by", "--banks", "--out"):
        assert flag in result.stdout
    assert "lending-club" in result.stdout
    assert "encoder.npz" in result.stdout


def test_pretrain_on_the_built_in_lending_club_data_writes_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "encoder"

    result = fedfin("pretrain", "--data", "lending-club", "--out", out, "--quiet", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # --quiet: no progress bar
    assert "hold-out AUC" in result.stdout
    assert str(out) in result.stdout
    checkpoint = load_encoder_checkpoint(out)
    assert checkpoint.schema.label == "Class"
    metrics = json.loads((out / "pretrain_metrics.json").read_text())
    assert metrics["holdout"]["auc"] > 0.6


def test_pretrain_on_a_user_csv_grouped_into_banks_by_a_column(
    tables: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "encoder"

    result = fedfin(
        "pretrain",
        "--data",
        tables["good"],
        "--label",
        "default",
        "--partition-by",
        "bank",
        "--banks",
        "3",
        "--epochs",
        "3",
        "--out",
        out,
        "--quiet",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    schema = load_encoder_checkpoint(out).schema
    assert schema.label == "default"
    assert schema.positive_label == "1"
    assert "bank" not in schema.feature_names  # the grouping column only says whose row it is
    assert json.loads((out / "pretrain_metrics.json").read_text())["source"] == str(tables["good"])


BAD_INPUTS = {
    "missing-file": (["--data", "{tmp}/nowhere.csv", "--label", "default"], "file not found"),
    "csv-without-the-label-column": (
        ["--data", "{no-label}", "--label", "default"],
        "label column 'default' is missing",
    ),
    "negative-banks": (["--banks", "-1"], "--banks must be an integer from 1 to 1000"),
    "file-without-label-flag": (["--data", "{good}"], "--label is required"),
    "label-with-three-values": (
        ["--data", "{three-labels}", "--label", "default"],
        "must have exactly 2 values",
    ),
    "too-many-banks-for-the-groups": (
        ["--data", "{good}", "--label", "default", "--partition-by", "bank", "--banks", "9"],
        "--partition-by 'bank': its 7 groups",
    ),
    "negative-seed": (["--seed", "-1"], "--seed must be an integer from 0 to"),
    "out-is-a-file": (["--out", "{good}"], "exists and is not a directory"),
}


def resolve(args: list[str], tables: dict[str, Path], tmp_path: Path) -> list[str]:
    """Fill in the table paths and add `--out` unless the case is about `--out`."""
    names = {"tmp": str(tmp_path), **{name: str(path) for name, path in tables.items()}}
    argv = ["pretrain", *(arg.format_map(names) for arg in args), "--quiet"]
    return argv if "--out" in argv else [*argv, "--out", str(tmp_path / "encoder")]


def assert_one_error_line(code: int | str | None, stderr: str, problem: str) -> None:
    assert code == 2
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fedfin pretrain: error: ")
    assert problem in lines[0]


@pytest.mark.parametrize(("args", "problem"), BAD_INPUTS.values(), ids=BAD_INPUTS)
def test_bad_input_is_one_line_on_stderr_and_a_nonzero_exit(
    tables: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    problem: str,
) -> None:
    # In process for speed; the console script is exactly `sys.exit(main())`.
    try:
        code: int | str | None = main(resolve(args, tables, tmp_path))
    except SystemExit as exit_:  # argparse rejects a bad flag by exiting
        code = exit_.code

    assert_one_error_line(code, capsys.readouterr().err, problem)
    assert not (tmp_path / "encoder").exists()


@pytest.mark.parametrize("case", ["csv-without-the-label-column", "negative-banks"])
def test_the_console_script_prints_bad_input_as_one_line_without_a_traceback(
    tables: dict[str, Path], tmp_path: Path, case: str
) -> None:
    args, problem = BAD_INPUTS[case]

    result = fedfin(*resolve(args, tables, tmp_path), cwd=tmp_path)

    assert_one_error_line(result.returncode, result.stderr, problem)


def test_no_subcommand_is_one_line_and_a_nonzero_exit(tmp_path: Path) -> None:
    result = fedfin(cwd=tmp_path)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("fedfin")
