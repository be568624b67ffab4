"""Every way a person or a bank can get input wrong: one clear line, a non-zero exit (or a
declined round for the ClientApp), no traceback, and nothing already stored is changed.

Each case builds its broken input in a fresh directory that also holds "stored" state (a
pretrained encoder, a bank's state directory with its ledger and head); after the case,
every file that existed before must be byte-for-byte the same.
"""

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_worker import train_round
from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.config import PrivacyPolicy, TrainPlanConfig
from fedfin.common.errors import FedfinError, PrivacyBudgetError
from fedfin.common.ledger import PrivacyLedger
from fedfin.common.protocol import RoundInstructions
from fedfin.common.synthetic import generate_credit_data
from fedfin.simulations.cli import main
from tests.conftest import Pretrained, write_bank_data
from tests.harness.messages import bank_context, send, server_identity, status, train_message


@dataclass
class Workspace:
    root: Path
    encoder: Path  # a stored, valid encoder checkpoint
    state: Path  # a stored bank state dir: ledger + private head after one round
    data: Path  # the bank's valid data directory (train/test parquet)
    loans: Path  # a valid user CSV: synthetic loans, label 'default'


@pytest.fixture(scope="module")
def template(pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus-template")
    shutil.copytree(pretrained.checkpoint_dir, root / "encoder")
    write_bank_data(pretrained, 2, root / "data")
    checkpoint = load_encoder_checkpoint(root / "encoder")
    settings = BankSettings("bank-02", root / "data", root / "state", PrivacyPolicy())
    instructions = RoundInstructions(
        1, 2, TrainPlanConfig(), checkpoint.schema, checkpoint.model_config
    )
    train_round(settings, instructions, checkpoint.arrays, None, run_id=1)
    generate_credit_data(1_500, 3, seed=1).to_csv(root / "loans.csv", index=False)
    return root


@pytest.fixture
def workspace(template: Path, tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(template, root)
    return Workspace(root, root / "encoder", root / "state", root / "data", root / "loans.csv")


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _frame(ws: Workspace) -> pd.DataFrame:
    return pd.read_csv(ws.loans)


def _write(ws: Workspace, name: str, frame: pd.DataFrame) -> Path:
    path = ws.root / name
    frame.to_csv(path, index=False)
    return path


def _bytes(ws: Workspace, name: str, data: bytes) -> Path:
    path = ws.root / name
    path.write_bytes(data)
    return path


def _pretrain(path: Path | str, *extra: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: [
        "pretrain",
        "--data",
        str(path),
        "--label",
        "default",
        "--out",
        str(ws.root / "new-encoder"),
        "--quiet",
        *extra,
    ]


def _pretrain_on(
    make: Callable[[Workspace], Path], *extra: str
) -> Callable[[Workspace], list[str]]:
    return lambda ws: _pretrain(make(ws), *extra)(ws)


def _simulate(
    *flags: str, encoder: Callable[[Workspace], Path] | None = None
) -> Callable[[Workspace], list[str]]:
    def build(ws: Workspace) -> list[str]:
        args = ["simulate", "--banks", "3", "--rounds", "1", "--out", str(ws.root / "run"), *flags]
        return args + (["--encoder", str(encoder(ws))] if encoder else [])

    return build


def _data_flags(path: Path, *extra: str) -> tuple[str, ...]:
    return ("--data", str(path), "--label", "default", *extra)


def _csv_text(ws: Workspace, name: str, text: str) -> Path:
    return _bytes(ws, name, text.encode())


def _duplicated_header(ws: Workspace) -> Path:
    frame = _frame(ws)
    text = frame.to_csv(index=False)
    header, rest = text.split("\n", 1)
    return _csv_text(ws, "dup.csv", header.replace("dti", "annual_income") + "\n" + rest)


def _duplicated_parquet_header(ws: Workspace) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = _frame(ws)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    names = ["annual_income" if n == "dti" else n for n in table.column_names]
    path = ws.root / "dup.parquet"
    pq.write_table(table.rename_columns(names), path)
    return path


def _with_cell(ws: Workspace, name: str, column: str, value: str, row: int = 5) -> Path:
    frame = _frame(ws).astype({column: object})
    frame.loc[row, column] = value
    return _write(ws, name, frame)


def _row_in_a_bank(ws: Workspace, column: str, value: str) -> Path:
    """The bad cell in a row of a bank's group, not the public pool's."""
    frame = _frame(ws)
    row = int(frame.index[frame["bank"] == "bank-01"][0])
    return _with_cell(ws, "bank-row.csv", column, value, row)


def _encoder_of_other_data(ws: Workspace) -> Path:
    """An --out that already holds an encoder pretrained on another table."""
    out = ws.root / "new-encoder"
    shutil.copytree(ws.encoder, out)
    return out


def _pretrain_into(data: Path, out: Path) -> list[str]:
    return ["pretrain", *_data_flags(data), "--out", str(out), "--quiet"]


def _public_parquet(ws: Workspace) -> Path:
    path = ws.root / "public.parquet"
    _frame(ws).to_parquet(path, index=False)
    return path


def _corrupt_encoder(ws: Workspace) -> Path:
    (ws.encoder / "encoder.npz").write_bytes(b"not a zip file")
    return ws.encoder


def _truncated_encoder(ws: Workspace) -> Path:
    data = (ws.encoder / "encoder.npz").read_bytes()
    (ws.encoder / "encoder.npz").write_bytes(data[: len(data) // 2])
    return ws.encoder


def _schema_from_another_encoder(ws: Workspace) -> Path:
    other = generate_credit_data(2_000, 3, seed=3)
    path = _write(ws, "other.csv", other)
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(path),
                "--label",
                "default",
                "--out",
                str(ws.root / "other"),
                "--quiet",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    shutil.copy(ws.root / "other" / "schema.json", ws.encoder / "schema.json")
    return ws.encoder


def _broken_ledger(ws: Workspace) -> Path:
    """Claim fewer DP steps in the first entry: well-formed JSON, caught only by its hash."""
    ledger = ws.state / "ledger.jsonl"
    text = ledger.read_text()
    altered = re.sub(r'"steps":(\d+)', lambda m: f'"steps":{int(m.group(1)) - 1}', text, count=1)
    assert altered != text
    ledger.write_text(altered)
    return ws.state


def _check_data(
    data: Callable[[Workspace], Path] | None = None,
    *extra: str,
    encoder: Callable[[Workspace], Path] | None = None,
) -> Callable[[Workspace], list[str]]:
    """`fedfin check-data` on the bank's data (or `data`), writing beside the workspace."""

    def argv(ws: Workspace) -> list[str]:
        return [
            "check-data",
            "--encoder",
            str(encoder(ws) if encoder else ws.encoder),
            "--data",
            str(data(ws) if data else ws.data),
            "--out",
            str(ws.root / "check"),
            *extra,
        ]

    return argv


def _encoder_without_profile(ws: Workspace) -> Path:
    """An encoder pretrained before fedfin kept the public profile."""
    older = ws.root / "older-encoder"
    shutil.copytree(ws.encoder, older)
    (older / "public_profile.json").unlink()
    return older


def _bank_table(ws: Workspace, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    return _write(ws, "bank.csv", change(pd.read_parquet(ws.data / "train.parquet")))


# (name, argv builder, expected exit code, words the one line must contain)
CLI_CASES: list[tuple[str, Callable[[Workspace], list[str]], int, str]] = [
    (
        "distributed DP without secure aggregation",
        _simulate("--mode", "fedsgd", "--distributed-dp", "--server-epsilon", "8"),
        2,
        "--distributed-dp needs --secure-aggregation and --mode fedsgd",
    ),
    (
        "distributed DP without a server budget",
        _simulate("--secure-aggregation", "--mode", "fedsgd", "--distributed-dp"),
        2,
        "--distributed-dp needs --server-epsilon",
    ),
    (
        "a server budget below the budget",
        _simulate(
            *("--secure-aggregation", "--mode", "fedsgd", "--distributed-dp"),
            *("--epsilon", "2", "--server-epsilon", "1"),
        ),
        2,
        "distributed-dp-server-budget",
    ),
    ("missing file", _pretrain("/no/such/loans.csv"), 2, "file not found"),
    ("empty file", _pretrain_on(lambda ws: _bytes(ws, "empty.csv", b"")), 2, "empty"),
    ("directory as data", _pretrain_on(lambda ws: ws.data), 2, "directory"),
    (
        "unreadable parquet",
        _pretrain_on(lambda ws: _bytes(ws, "x.parquet", b"PAR1garbage")),
        2,
        "cannot read parquet",
    ),
    (
        "a gzip file that is not gzip",
        _pretrain_on(lambda ws: _bytes(ws, "loans.csv.gz", b"loan,default\n1,0\n")),
        2,
        "cannot read csv",
    ),
    (
        "a zip archive",
        _pretrain_on(lambda ws: _bytes(ws, "loans.csv.zip", b"PK\x03\x04")),
        2,
        "unsupported file type '.csv.zip'",
    ),
    (
        "semicolon delimiter",
        _pretrain_on(
            lambda ws: _bytes(ws, "semi.csv", _frame(ws).to_csv(sep=";", index=False).encode())
        ),
        2,
        "delimiter",
    ),
    (
        "latin-1 encoding",
        _pretrain_on(
            lambda ws: _bytes(ws, "latin.csv", "a,b,default\nJosé,1,0\n".encode("latin-1"))
        ),
        2,
        "UTF-8",
    ),
    (
        "missing label",
        _pretrain_on(lambda ws: _write(ws, "nolabel.csv", _frame(ws).drop(columns=["default"]))),
        2,
        "label column 'default' is missing",
    ),
    (
        "label with 3 values",
        _pretrain_on(
            lambda ws: _write(ws, "three.csv", _frame(ws).assign(default=lambda f: f.index % 3))
        ),
        2,
        "exactly 2 values",
    ),
    (
        "label all one class",
        _pretrain_on(lambda ws: _write(ws, "one.csv", _frame(ws).assign(default=0))),
        2,
        "exactly 2 values",
    ),
    (
        "strings in numeric column",
        _pretrain_on(
            lambda ws: _write(
                ws,
                "str.csv",
                _frame(ws)
                .astype({"dti": object})
                .assign(dti=lambda f: f["dti"].where(f.index != 5, "twelve")),
            )
        ),
        2,
        "'dti'",
    ),
    (
        "Inf in a column",
        _pretrain_on(
            lambda ws: _write(
                ws, "inf.csv", _frame(ws).assign(dti=lambda f: f["dti"].where(f.index != 5, np.inf))
            )
        ),
        2,
        "Inf",
    ),
    (
        "all-missing column",
        _pretrain_on(lambda ws: _write(ws, "nan.csv", _frame(ws).assign(dti=np.nan))),
        2,
        "entirely missing",
    ),
    ("zero epochs", _pretrain_on(lambda ws: ws.loans, "--epochs", "0"), 2, "--epochs"),
    (
        "file without --label",
        lambda ws: ["pretrain", "--data", str(ws.loans), "--out", str(ws.root / "x")],
        2,
        "--label is required",
    ),
    ("negative epsilon", _simulate("--epsilon", "-1"), 2, "--epsilon"),
    ("delta of 1 or more", _simulate("--delta", "1.5"), 2, "--delta"),
    ("zero rounds", _simulate("--rounds", "0"), 2, "--rounds"),
    ("corrupt encoder checkpoint", _simulate(encoder=_corrupt_encoder), 3, "corrupt"),
    ("truncated encoder checkpoint", _simulate(encoder=_truncated_encoder), 3, "encoder.npz"),
    (
        "schema from another encoder",
        _simulate(encoder=_schema_from_another_encoder),
        3,
        "schema does not belong",
    ),
    ("missing encoder dir", _simulate(encoder=lambda ws: ws.root / "nope"), 3, "not found"),
    (
        "altered ledger line",
        lambda ws: ["audit", str(_broken_ledger(ws)), "--plot", str(ws.root / "p.png")],
        5,
        "chain broken",
    ),
    ("no ledger to audit", lambda ws: ["audit", str(ws.data)], 2, "ledger.jsonl"),
    (
        "applications missing a column",
        lambda ws: [
            "score",
            "--state-dir",
            str(ws.state),
            "--encoder",
            str(ws.encoder),
            "--data",
            str(
                _write(
                    ws,
                    "apps.csv",
                    pd.read_parquet(ws.data / "test.parquet").drop(columns=["int_rate"]),
                )
            ),
            "--out",
            str(ws.root / "scores.csv"),
        ],
        2,
        "'int_rate'",
    ),
    (
        "corrupt private head for scoring",
        lambda ws: [
            "score",
            "--state-dir",
            str(_bytes(ws, "state/head.npz", b"junk").parent),
            "--encoder",
            str(ws.encoder),
            "--data",
            str(ws.data / "test.parquet"),
            "--out",
            str(ws.root / "scores.csv"),
        ],
        3,
        "head",
    ),
    # --- headers and cells (common/tables.py, common/cells.py) ---
    ("duplicated CSV header", _pretrain_on(_duplicated_header), 2, "'annual_income' appears 2"),
    (
        "duplicated Parquet header",
        _pretrain_on(_duplicated_parquet_header),
        2,
        "'annual_income' appears 2",
    ),
    (
        "unnamed column that is not a row index",
        _pretrain_on(lambda ws: _csv_text(ws, "unnamed.csv", "a,,default\n1,x,0\n2,y,1\n")),
        2,
        "column 2 has no name",
    ),
    (
        "word in a numeric column, row in a bank (simulate)",
        lambda ws: _simulate(
            *_data_flags(_row_in_a_bank(ws, "dti", "twelve"), "--partition-by", "bank")
        )(ws),
        2,
        "column 'dti' must be numeric, but row",
    ),
    (
        "decimal comma in a numeric column",
        _pretrain_on(lambda ws: _with_cell(ws, "comma.csv", "int_rate", "12,5")),
        2,
        "'12,5'",
    ),
    (
        "dash for missing in a numeric column",
        _pretrain_on(lambda ws: _with_cell(ws, "dash.csv", "loan_amount", "-")),
        2,
        "leave the cell empty for missing",
    ),
    # --- grouping (common/partition.py) ---
    (
        "more banks than a grouping column allows",
        lambda ws: _simulate(*_data_flags(ws.loans, "--partition-by", "bank", "--banks", "4"))(ws),
        2,
        "--partition-by 'bank': its 4 groups",
    ),
    (
        "two-valued grouping column, several banks",
        lambda ws: _pretrain(
            _write(ws, "two.csv", _frame(ws).assign(bank=lambda f: f.index % 2 == 0)),
            "--partition-by",
            "bank",
            "--banks",
            "2",
        )(ws),
        2,
        "allow at most 1 bank",
    ),
    (
        "grouping by the label",
        _pretrain_on(lambda ws: ws.loans, "--partition-by", "default"),
        2,
        "is the label column",
    ),
    # --- run flags (simulations/cli.py, server/plan_cli.py) ---
    ("delta of 0.5", _simulate("--delta", "0.5"), 2, "--delta must be a number in (0, 0.01)"),
    ("rounds past any plan", _simulate("--rounds", "100000000000"), 2, "--rounds must be"),
    ("noise floor above the ceiling", _simulate("--min-noise", "50"), 2, "--min-noise"),
    ("NaN epsilon", _simulate("--epsilon", "nan"), 2, "--epsilon"),
    ("huge synthetic table", _simulate("--data", "synthetic", "--rows", "1e12"), 2, "--rows"),
    ("seed out of range", _pretrain_on(lambda ws: ws.loans, "--seed", "-1"), 2, "--seed"),
    ("learning rate above 1", _pretrain_on(lambda ws: ws.loans, "--lr", "5"), 2, "--lr"),
    (
        "plan delta of 0.5",
        lambda ws: ["plan", "--encoder", str(ws.encoder), "--delta", "0.5"],
        2,
        "--delta must be in (0, 0.01)",
    ),
    (
        "plan negative seed",
        lambda ws: ["plan", "--encoder", str(ws.encoder), "--seed", "-1"],
        2,
        "--seed",
    ),
    # --- outputs over inputs ---
    (
        "pretrain --out onto an encoder of other data",
        lambda ws: _pretrain_into(ws.loans, _encoder_of_other_data(ws)),
        2,
        "already holds an encoder pretrained on other data",
    ),
    (
        "pretrain --out onto a directory of other files",
        lambda ws: _pretrain_into(ws.loans, ws.data),
        2,
        "not empty",
    ),
    (
        "simulate --out is the --encoder",
        lambda ws: [
            "simulate",
            "--banks",
            "3",
            "--encoder",
            str(ws.encoder),
            "--out",
            str(ws.encoder),
        ],
        2,
        "is the --encoder directory",
    ),
    (
        "split --out would overwrite its --data",
        lambda ws: ["split", *_data_flags(_public_parquet(ws)), "--out", str(ws.root)],
        2,
        "would overwrite the --data file",
    ),
    (
        "split --out a bank's state dir",
        lambda ws: ["split", *_data_flags(ws.loans), "--out", str(ws.state)],
        2,
        "not empty (holds",
    ),
    (
        "check-data: encoder without a public profile",
        _check_data(encoder=_encoder_without_profile),
        3,
        "no public_profile.json",
    ),
    (
        "check-data: a feature column missing",
        _check_data(lambda ws: _bank_table(ws, lambda f: f.drop(columns=["term"]))),
        2,
        "feature column 'term' is missing",
    ),
    (
        "check-data: words in a numeric column",
        _check_data(
            lambda ws: _bank_table(
                ws,
                lambda f: f.astype({"int_rate": object}).assign(
                    int_rate=lambda g: g["int_rate"].where(g.index != 3, "high")
                ),
            )
        ),
        2,
        "'int_rate'",
    ),
    (
        "check-data: --label not in the data",
        _check_data(None, "--label", "defaulted"),
        2,
        "--label column 'defaulted' is missing",
    ),
    (
        "check-data: --out is a file",
        lambda ws: [*_check_data()(ws)[:-2], "--out", str(ws.loans)],
        2,
        "exists and is not a directory",
    ),
    (
        "key that already exists",
        lambda ws: ["keys", "--out", str(ws.root), "--name", "loans.csv"],
        2,
        "already exists",
    ),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(
    case: tuple[str, Callable[[Workspace], list[str]], int, str],
    workspace: Workspace,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, build, expected, words = case
    argv = build(workspace)
    capsys.readouterr()
    before = _snapshot(workspace.root)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses bad flags before main's handler
        code = exit_.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert code == expected, err
    assert err.count("\n") == 1 and err.startswith("fedfin") and words in err, err
    assert "Traceback" not in err
    after = _snapshot(workspace.root)
    assert {k: after.get(k) for k in before} == before, "stored files changed"


# --- the ClientApp: bad bank data or state is a declined round, nothing stored changes ----


def _data_with(ws: Workspace, change: Callable[[pd.DataFrame], pd.DataFrame]) -> Path:
    directory = ws.root / "bad-data"
    directory.mkdir()
    change(pd.read_parquet(ws.data / "train.parquet")).to_parquet(directory / "train.parquet")
    shutil.copy(ws.data / "test.parquet", directory / "test.parquet")
    return directory


BANK_CASES: dict[str, Callable[[Workspace], tuple[Path, Path]]] = {
    "data path missing": lambda ws: (ws.root / "nothing-here.csv", ws.state),
    "extra column": lambda ws: (_data_with(ws, lambda f: f.assign(ssn="123")), ws.state),
    "missing feature column": lambda ws: (
        _data_with(ws, lambda f: f.drop(columns=["term"])),
        ws.state,
    ),
    "label all one class": lambda ws: (_data_with(ws, lambda f: f.assign(Class="good")), ws.state),
    "strings in numeric column": lambda ws: (
        _data_with(ws, lambda f: f.astype({"int_rate": object}).assign(int_rate="high")),
        ws.state,
    ),
    "state dir is a file": lambda ws: (ws.data, _bytes(ws, "state-file", b"x")),
    "corrupt private head": lambda ws: (ws.data, _bytes(ws, "state/head.npz", b"junk").parent),
    "head from another schema": lambda ws: (
        ws.data,
        _bytes(ws, "state/head.json", b'{"schema_fingerprint": "0000"}').parent,
    ),
    "altered ledger": lambda ws: (ws.data, _broken_ledger(ws)),
}


@pytest.fixture
def _server() -> Iterator[None]:
    with server_identity():
        yield


@pytest.mark.parametrize("kind", sorted(BANK_CASES))
def test_client_app_bad_input_is_a_declined_round(
    kind: str, workspace: Workspace, _server: None, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = load_encoder_checkpoint(workspace.encoder)
    data, state = BANK_CASES[kind](workspace)
    before = _snapshot(workspace.root)
    ledger_path = workspace.state / "ledger.jsonl"
    ledger_before = ledger_path.read_bytes() if ledger_path.exists() else b""
    ledger_entries = ledger_before.count(b"\n")
    reply = send(train_message(checkpoint), bank_context(data, state))
    assert status(reply) == "declined"
    assert "arrays" not in reply.content.array_records
    after = _snapshot(workspace.root)
    ledger = "state/ledger.jsonl"
    unchanged = {k: after.get(k) for k in before if k != ledger}
    assert unchanged == {k: v for k, v in before.items() if k != ledger}, "stored files changed"
    if ledger in before:  # a decline may be recorded: appended, never rewritten
        assert (workspace.root / ledger).read_bytes().startswith(ledger_before)
        declines = PrivacyLedger(workspace.state).check().entries[ledger_entries:]
        assert all(e["kind"] == "declined" and not e["dp_events"] for e in declines)
    if kind == "altered ledger":  # refused by the hash check, not by a parse error
        assert "altered (hash mismatch)" in caplog.text


# --- what real credit tables do that is not an error: read, not refused ---------------------


def _habit(
    change: Callable[[pd.DataFrame], pd.DataFrame], suffix: str = ".csv"
) -> Callable[[Workspace], Path]:
    def make(ws: Workspace) -> Path:
        path = ws.root / f"habit{suffix}"
        frame = change(_frame(ws).drop(columns=["bank"]))
        if suffix.startswith(".csv"):  # pandas compresses by the suffix: .csv.gz, .csv.xz
            frame.to_csv(path, index=False)
        else:
            frame.to_parquet(path, index=False)
        return path

    return make


def _money(values: pd.Series) -> pd.Series:
    return values.map(lambda v: f"${v:,.2f}")


# (name, table, column, its kind in the fitted schema: "numeric" or the categories)
HABITS: list[tuple[str, Callable[[Workspace], Path], str, object]] = [
    (
        "bool column in Parquet",
        _habit(lambda f: f.assign(owner=f.index % 3 == 0), ".parquet"),
        "owner",
        ("False", "True"),
    ),
    (
        "True/False text with blanks",
        _habit(lambda f: f.assign(owner=np.where(f.index % 7 == 0, "", f.index % 3 == 0))),
        "owner",
        ("False", "True"),
    ),
    (
        "yes/no text",
        _habit(lambda f: f.assign(student=np.where(f.index % 3 == 0, "yes", "no"))),
        "student",
        ("no", "yes"),
    ),
    (
        "numbers stored as text in Parquet",
        _habit(lambda f: f.assign(dti=f["dti"].astype(str)), ".parquet"),
        "dti",
        "numeric",
    ),
    (
        "quoted thousands separators",
        _habit(lambda f: f.assign(loan_amount=f["loan_amount"].map(lambda v: f"{v:,.0f}"))),
        "loan_amount",
        "numeric",
    ),
    (
        "currency amounts",
        _habit(lambda f: f.assign(annual_income=_money(f["annual_income"]))),
        "annual_income",
        "numeric",
    ),
    (
        "percent signs",
        _habit(lambda f: f.assign(int_rate=f["int_rate"].map(lambda v: f"{v}%"))),
        "int_rate",
        "numeric",
    ),
    (
        "blank and whitespace cells as missing",
        _habit(
            lambda f: f.astype({"dti": object}).assign(
                dti=lambda g: g["dti"].where(g.index % 5 != 0, np.where(g.index % 2, "", "  "))
            )
        ),
        "dti",
        "numeric",
    ),
    (
        "a gzip-compressed CSV",
        _habit(
            lambda f: f.assign(loan_amount=f["loan_amount"].map(lambda v: f"{v:,.0f}")), ".csv.gz"
        ),
        "loan_amount",
        "numeric",
    ),
    (
        "an xz-compressed CSV",
        _habit(lambda f: f, ".csv.xz"),
        "dti",
        "numeric",
    ),
    (
        "a loan number column",
        _habit(lambda f: f.assign(LoanID=f.index * 13 + 70_000_000)),
        "LoanID",
        "identifier",
    ),
    (
        "R's rownames column",
        _habit(lambda f: f.assign(rownames=(f.index + 1).astype(str))),
        "rownames",
        "identifier",
    ),
    (
        "a customer key as text",
        _habit(lambda f: f.assign(customer=[f"C-{i * 7919 % 100_003:06d}" for i in f.index])),
        "customer",
        "identifier",
    ),
    (
        "a saved row index (to_csv's default)",
        lambda ws: _write_with_index(ws),
        "dti",
        "numeric",
    ),
]


def _write_with_index(ws: Workspace) -> Path:
    path = ws.root / "indexed.csv"
    _frame(ws).drop(columns=["bank"]).to_csv(path)  # index=True: an unnamed first column
    return path


@pytest.mark.parametrize("habit", HABITS, ids=[h[0] for h in HABITS])
def test_real_table_habits_are_read_as_people_mean_them(
    habit: tuple[str, Callable[[Workspace], Path], str, object],
    workspace: Workspace,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, make, column, kind = habit
    out = workspace.root / "habit-encoder"

    code = main(
        ["pretrain", *_data_flags(make(workspace)), "--out", str(out), "--quiet", "--epochs", "1"]
    )

    assert code == 0, capsys.readouterr().err
    schema = load_encoder_checkpoint(out).schema
    assert not [n for n in schema.feature_names if n.startswith("Unnamed")]
    if kind == "identifier":
        assert column not in schema.feature_names
        assert column in dict(schema.identifier_columns)
        assert f"column '{column}' is not used as a feature" in capsys.readouterr().out
    elif kind == "numeric":
        assert column in [f.name for f in schema.numeric]
    else:
        assert [c.vocabulary for c in schema.categorical if c.name == column] == [kind]


def test_pretrain_reruns_into_its_own_out_but_not_with_other_flags(
    workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace.root / "enc"
    argv = [*_pretrain_into(workspace.loans, out), "--epochs", "1"]
    assert main(argv) == 0
    assert main(argv) == 0, capsys.readouterr().err  # the same data and flags: a rerun
    before = _snapshot(out)
    capsys.readouterr()

    assert main([*argv, "--seed", "1"]) == 2
    assert "seed" in capsys.readouterr().err
    assert _snapshot(out) == before


def test_a_refused_run_leaves_nothing_so_the_corrected_run_is_not_called_other_data(
    workspace: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused at the split (too many banks for the column): nothing is written. The
    corrected command, given the data by a relative path this time, gets past the run
    directory's manifest; it stops only at the (deliberately corrupt) encoder."""
    out = workspace.root / "run"
    grouped = ("--partition-by", "bank", "--rounds", "1")
    refused = ["simulate", *_data_flags(workspace.loans, *grouped), "--banks", "4"]
    assert main([*refused, "--out", str(out)]) == 2
    assert not out.exists()

    monkeypatch.chdir(workspace.root)
    _corrupt_encoder(workspace)
    corrected = ["simulate", *_data_flags(Path("loans.csv"), *grouped), "--banks", "3"]
    capsys.readouterr()
    assert main([*corrected, "--out", str(out), "--encoder", str(workspace.encoder)]) == 3
    assert "corrupt" in capsys.readouterr().err


def test_the_same_data_by_another_path_continues_the_run(
    workspace: Workspace, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """run.json written for the absolute path; the relative path is the same data (same
    content hash), so the run is not refused as other data."""
    from fedfin.common.config import SplitConfig
    from fedfin.common.sources import load_source
    from fedfin.simulations.simulate import MANIFEST

    source = load_source(str(workspace.loans), "default", "bank")
    split = source.split(SplitConfig(num_banks=3))
    out = workspace.root / "run"
    out.mkdir()
    manifest = {
        **source.identity(),
        "label": "default",
        "partition_by": "bank",
        "split": {"num_banks": 3, "public_fraction": 0.4, "test_fraction": 0.25, "seed": 0},
        "placement": split.placement(),
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.chdir(workspace.root)
    _corrupt_encoder(workspace)
    argv = ["simulate", *_data_flags(Path("loans.csv"), "--partition-by", "bank"), "--banks", "3"]

    code = main([*argv, "--out", "run", "--encoder", str(workspace.encoder)])

    assert code == 3, capsys.readouterr().err  # past the manifest, stopped by the encoder
    other = _write(workspace, "other.csv", _frame(workspace).assign(dti=0.5))
    capsys.readouterr()
    code = main([*argv[:2], str(other), *argv[3:], "--out", "run"])
    assert code == 2 and "other data" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("declines", "error", "words"),
    [
        (["bank-00: declined: privacy budget spent"] * 2, PrivacyBudgetError, "budget spent"),
        (["bank-00: declined: declined by the bank (details in the bank's log)"], FedfinError, ""),
    ],
)
def test_a_run_where_every_bank_declined_is_an_error_not_a_result(
    declines: list[str], error: type[FedfinError], words: str
) -> None:
    from fedfin.simulations.simulate import _refuse_a_run_where_every_bank_declined

    trained = {"round": 1, "banks_trained": 2, "banks_declined": []}
    stopped = {"round": 2, "banks_trained": 0, "banks_declined": declines}
    _refuse_a_run_where_every_bank_declined([trained], 5)  # a round trained: fine

    with pytest.raises(error, match=f"every bank declined round 2 of 5.*{words}") as caught:
        _refuse_a_run_where_every_bank_declined([trained, stopped], 5)
    assert caught.type is error


def test_a_bank_table_with_missing_text_values_loads(tmp_path: Path) -> None:
    """Real tables have blanks in categorical columns: the keyed split must hash them."""
    from fedfin.client.bank_data import keyed_test_mask

    frame = pd.DataFrame({"home": ["rent", None, "own", np.nan], "amount": [1.0, np.nan, 3, 4]})
    frame = frame.astype({"home": "str"})

    mask = keyed_test_mask(frame, b"k" * 16, 0.5)

    assert mask.dtype == bool and len(mask) == 4


def test_split_writes_a_new_directory_and_replaces_only_an_earlier_split(
    workspace: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    out = workspace.root / "split"
    flags = ["split", *_data_flags(workspace.loans), "--banks", "2", "--out", str(out)]
    assert main(flags) == 0
    first = {p.relative_to(out) for p in out.rglob("*")}
    assert main([*flags[:-2], "--seed", "1", "--out", str(out)]) == 0  # its own: replaced
    assert {p.relative_to(out) for p in out.rglob("*")} == first
    (out / "notes.txt").write_text("the bank's own file")
    assert main(flags) == 2
    assert "not empty (holds 'notes.txt')" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "the bank's own file"
