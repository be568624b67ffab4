"""Shared fixtures: the built-in Lending Club data and one pretrained encoder per session."""

from pathlib import Path
from typing import NamedTuple

import pytest

from fedfin.common.checkpoint import EncoderCheckpoint, load_encoder_checkpoint
from fedfin.common.config import PretrainConfig, SplitConfig
from fedfin.common.partition import FederatedSplit
from fedfin.common.sources import DataSource, load_source
from fedfin.server.pretrain import PretrainResult, pretrain


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
