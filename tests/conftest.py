"""Shared fixtures: the built-in Lending Club data, one pretrained encoder per session, and
bank 0 after one real DP round (`bank`, `scorer`) for the scoring, serving and drift tests."""

import argparse
import shutil
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import pytest
import torch

from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_worker import train_round
from fedfin.client.scoring import Scorer
from fedfin.common.checkpoint import EncoderCheckpoint, load_encoder_checkpoint
from fedfin.common.config import PretrainConfig, PrivacyPolicy, SplitConfig, TrainPlanConfig
from fedfin.common.partition import FederatedSplit
from fedfin.common.protocol import RoundInstructions
from fedfin.common.sources import DataSource, load_source
from fedfin.server.pretrain import PretrainResult, pretrain
from fedfin.simulations.cli_bank import add_bank_commands


class Pretrained(NamedTuple):
    """The Lending Club split into 5 banks and the encoder pretrained on its public pool."""

    split: FederatedSplit
    source: DataSource
    checkpoint_dir: Path
    result: PretrainResult


@pytest.fixture(scope="session")
def lending_club_source() -> DataSource:
    """The built-in Lending Club loans, grouped into banks by US state. Do not mutate."""
    return load_source("lending-club")


@pytest.fixture(scope="session")
def pretrained(
    lending_club_source: DataSource, tmp_path_factory: pytest.TempPathFactory
) -> Pretrained:
    """Pretrain once (about 3 s) with the default config; copy the directory before editing."""
    source = lending_club_source
    split = source.split(SplitConfig(num_banks=5, seed=0))
    checkpoint_dir = tmp_path_factory.mktemp("pretrained") / "encoder"
    result = pretrain(
        split.public,
        source.label,
        source.positive_label,
        checkpoint_dir,
        PretrainConfig(),
        exclude=source.excluded_columns,
        source=source.name,
        progress=False,
    )
    return Pretrained(split, source, checkpoint_dir, result)


@pytest.fixture(scope="module")
def checkpoint(pretrained: Pretrained) -> EncoderCheckpoint:
    """The pretrained encoder checkpoint as a bank receives it (module-scoped: copy to edit)."""
    return load_encoder_checkpoint(pretrained.checkpoint_dir)


def write_bank_data(pretrained: Pretrained, index: int, directory: Path) -> Path:
    """Bank `index`'s train/test tables as a SuperNode's data directory; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    bank = pretrained.split.banks[index]
    bank.train.to_parquet(directory / "train.parquet")
    bank.test.to_parquet(directory / "test.parquet")
    return directory


class TrainedBank(NamedTuple):
    """A bank's state dir with its private head, the encoder it goes with, unseen rows."""

    state_dir: Path
    encoder_dir: Path
    applications: pd.DataFrame  # the bank's test split, label and all


def trained_bank(pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory) -> TrainedBank:
    """Bank 0 after one DP round (train_round, as in a federation); made once per session."""
    root = tmp_path_factory.getbasetemp() / "scoring-bank-00"
    bank = pretrained.split.banks[0]
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        data = write_bank_data(pretrained, 0, root / "data")
        checkpoint = load_encoder_checkpoint(pretrained.checkpoint_dir)
        settings = BankSettings("bank-00", data, root / "state", PrivacyPolicy(epsilon_budget=1.0))
        instructions = RoundInstructions(
            1, 1, TrainPlanConfig(), checkpoint.schema, checkpoint.model_config
        )
        train_round(settings, instructions, checkpoint.arrays, None, run_id=1)
        (root / "done").touch()
    return TrainedBank(root / "state", pretrained.checkpoint_dir, bank.test.reset_index(drop=True))


def bank_command(command: str, bank: TrainedBank, data: Path, out: Path) -> list[str | Path]:
    """`score`/`explain` argv for a trained bank's state, encoder, input and output."""
    return [
        command,
        "--state-dir",
        bank.state_dir,
        "--encoder",
        bank.encoder_dir,
        "--data",
        data,
        "--out",
        out,
    ]


def score_table(bank: TrainedBank, frame: pd.DataFrame, tmp_path: Path, *extra: str) -> Path:
    """`fedfin score` of `frame` (written as CSV) with the bank's served model; its output."""
    data, out = tmp_path / "applications.csv", tmp_path / "scored.csv"
    frame.to_csv(data, index=False)
    assert run_bank_command(*bank_command("score", bank, data, out), *extra) == 0
    return out


def run_bank_command(*argv: str | Path) -> int:
    """Parse and run one of `score`/`explain`/`serve` as the fedfin CLI will."""
    parser = argparse.ArgumentParser(prog="fedfin")
    add_bank_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    threads = torch.get_num_threads()
    try:
        code: int = args.run(args)
        return code
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bank(pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory) -> TrainedBank:
    return trained_bank(pretrained, tmp_path_factory)


@pytest.fixture(scope="module")
def scorer(bank: TrainedBank) -> Scorer:
    return Scorer.load(bank.state_dir, bank.encoder_dir)
