"""Every way a person or a bank can get input wrong: one clear line, a non-zero exit (or a
declined round for the ClientApp), no traceback, and nothing already stored is changed.

Each case builds its broken input in a fresh directory that also holds "stored" state (a
pretrained encoder, a bank's state directory with its ledger and head); after the case,
every file that existed before must be byte-for-byte the same.
"""

import hashlib
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.bank_settings import BankSettings
from client.bank_worker import train_round
from common.checkpoint import load_encoder_checkpoint
from common.config import PrivacyPolicy, TrainPlanConfig
from common.ledger import PrivacyLedger
from common.protocol import RoundInstructions
from common.synthetic import generate_credit_data
from simulations.cli import main
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


# (name, argv builder, expected exit code, words the one line must contain)
CLI_CASES: list[tuple[str, Callable[[Workspace], list[str]], int, str]] = [
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
