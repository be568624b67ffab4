"""The setup several benchmarks share: the built-in Lending Club loans split into banks, an
encoder pretrained on the public pool, and a bank's train/test tables on disk."""

from pathlib import Path

from fedfin.common.config import PretrainConfig, SplitConfig
from fedfin.common.partition import FederatedSplit
from fedfin.common.sources import load_source
from fedfin.server.pretrain import pretrain


def pretrained_lending_club(num_banks: int, encoder: Path) -> FederatedSplit:
    """The split of `num_banks` banks (seed 0) and, unless `encoder` already holds one, the
    encoder pretrained on its public pool with the default recipe, as the tests use."""
    source = load_source("lending-club")
    split = source.split(SplitConfig(num_banks=num_banks, seed=0))
    if not (encoder / "encoder.npz").exists():
        pretrain(
            split.public,
            source.label,
            source.positive_label,
            encoder,
            PretrainConfig(),
            exclude=source.excluded_columns,
            source=source.name,
            progress=False,
        )
    return split


def write_bank_tables(split: FederatedSplit, index: int, directory: Path) -> Path:
    """Bank `index`'s train and test tables as Parquet in `directory` (created)."""
    directory.mkdir(parents=True)
    split.banks[index].train.to_parquet(directory / "train.parquet")
    split.banks[index].test.to_parquet(directory / "test.parquet")
    return directory
