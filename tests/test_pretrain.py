"""Source pretraining: an encoder learned on the public pool that transfers to the banks."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from torch import nn

from fedfin.common.checkpoint import (
    ENCODER_FILE,
    SCHEMA_FILE,
    load_encoder_checkpoint,
    save_encoder_checkpoint,
)
from fedfin.common.config import ModelConfig, PretrainConfig
from fedfin.common.errors import CheckpointError, ConfigError, DataError
from fedfin.common.model import build_model
from fedfin.common.partition import BankData, split_train_test
from fedfin.common.schema import FeatureSchema
from fedfin.common.shared_weights import shared_arrays
from fedfin.common.synthetic import GROUP_COLUMN, LABEL, PUBLIC_GROUP, generate_credit_data
from fedfin.common.tensors import representations
from fedfin.server.pretrain import METRICS_FILE, SOURCE_HEAD_FILE, pretrain
from tests.conftest import Pretrained


def copy_of(checkpoint_dir: Path, tmp_path: Path) -> Path:
    """A private copy, so that damaging it leaves the session's checkpoint intact."""
    return Path(shutil.copytree(checkpoint_dir, tmp_path / "copy"))


def another_checkpoint(pretrained: Pretrained, tmp_path: Path) -> Path:
    """A checkpoint of a different encoder: schema fitted on other rows, fresh weights."""
    other_rows = pretrained.split.banks[0].train
    source = pretrained.source
    schema = FeatureSchema.fit(
        other_rows, source.label, source.positive_label, exclude=source.excluded_columns
    )
    config = ModelConfig(hidden_sizes=(16, 8))
    directory = tmp_path / "other"
    save_encoder_checkpoint(
        directory, schema, config, shared_arrays(build_model(schema, config, seed=0))
    )
    return directory


def transfer_auc(encoder: nn.Module, schema: FeatureSchema, bank: BankData) -> float:
    """Test AUC of a fresh logistic head fitted on the encoder's output for the bank's rows."""
    train = schema.transform(bank.train, bank.name)
    test = schema.transform(bank.test, bank.name)
    head = LogisticRegression(max_iter=2000).fit(representations(encoder, train), train.label)
    scores = head.predict_proba(representations(encoder, test))[:, 1]
    return float(roc_auc_score(test.label, scores))


# --- what pretraining writes ---------------------------------------------------------


def test_pretraining_writes_the_checkpoint_metrics_and_source_head(
    pretrained: Pretrained,
) -> None:
    written = {path.name for path in pretrained.checkpoint_dir.iterdir()}

    assert written == {
        "encoder.npz",
        "schema.json",
        "model.json",
        "pretrain_metrics.json",
        "source_head.npz",
        "public_profile.json",  # public statistics only: bins of the schema's public fit rows
    }


def test_the_checkpoint_loads_and_rebuilds_the_encoder(pretrained: Pretrained) -> None:
    checkpoint = load_encoder_checkpoint(pretrained.checkpoint_dir)
    model = checkpoint.build_model()

    assert list(checkpoint.arrays) == list(model.encoder.state_dict())
    for key, value in model.encoder.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), checkpoint.arrays[key])
    assert checkpoint.info["source"] == "lending-club"


def test_the_schema_is_fitted_on_the_public_training_rows_only(pretrained: Pretrained) -> None:
    source = pretrained.source
    config = PretrainConfig()
    fit_rows, _ = split_train_test(
        pretrained.split.public, source.label, config.holdout_fraction, config.seed
    )

    expected = FeatureSchema.fit(
        fit_rows, source.label, source.positive_label, exclude=source.excluded_columns
    )

    assert load_encoder_checkpoint(pretrained.checkpoint_dir).schema == expected


def test_the_state_a_bank_is_in_is_not_a_feature(pretrained: Pretrained) -> None:
    schema = load_encoder_checkpoint(pretrained.checkpoint_dir).schema

    assert "addr_state" not in schema.feature_names
    assert schema.label == "Class"
    assert schema.positive_label == "bad"


def test_the_encoder_file_holds_no_head_weights_and_the_source_head_file_only_head_weights(
    pretrained: Pretrained,
) -> None:
    checkpoint = load_encoder_checkpoint(pretrained.checkpoint_dir)
    model = checkpoint.build_model()

    with np.load(pretrained.checkpoint_dir / ENCODER_FILE) as encoder_file:
        assert set(encoder_file.files) == set(model.encoder.state_dict())
    with np.load(pretrained.checkpoint_dir / SOURCE_HEAD_FILE) as head_file:
        assert set(head_file.files) == set(model.head.state_dict())


def test_the_public_hold_out_auc_shows_the_encoder_learned_something(
    pretrained: Pretrained,
) -> None:
    metrics = pretrained.result.metrics

    assert metrics["holdout"]["auc"] > 0.6
    assert metrics["fit_rows"] + metrics["holdout_rows"] == len(pretrained.split.public)
    assert 1 <= metrics["best_epoch"] <= len(metrics["history"]) <= PretrainConfig().epochs


def test_the_metrics_file_matches_the_returned_metrics(pretrained: Pretrained) -> None:
    written = json.loads((pretrained.checkpoint_dir / METRICS_FILE).read_text())

    assert written["holdout"] == pretrained.result.metrics["holdout"]
    assert written["source"] == "lending-club"


# --- the transfer test ------------------------------------------------------------------


def test_the_pretrained_encoder_transfers_to_the_banks_better_than_a_random_one(
    pretrained: Pretrained,
) -> None:
    checkpoint = load_encoder_checkpoint(pretrained.checkpoint_dir)
    pretrained_encoder = checkpoint.build_model().encoder
    random_encoder = build_model(checkpoint.schema, checkpoint.model_config, seed=0).encoder

    transferred = [
        transfer_auc(pretrained_encoder, checkpoint.schema, bank) for bank in pretrained.split.banks
    ]
    untrained = [
        transfer_auc(random_encoder, checkpoint.schema, bank) for bank in pretrained.split.banks
    ]

    assert len(transferred) == 5
    assert np.mean(transferred) > np.mean(untrained) + 0.05, (transferred, untrained)


# --- refusing damaged or mismatched checkpoints ------------------------------------------


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "flipped-bytes"])
def test_a_corrupt_encoder_file_is_a_checkpoint_error(
    pretrained: Pretrained, tmp_path: Path, damage: str
) -> None:
    directory = copy_of(pretrained.checkpoint_dir, tmp_path)
    weights = directory / ENCODER_FILE
    payload = weights.read_bytes()
    weights.write_bytes(
        {
            "empty": b"",
            "truncated": payload[: len(payload) // 2],
            "garbage": b"not a numpy archive" * 10,
            "flipped-bytes": payload[:300]
            + bytes(b ^ 0xFF for b in payload[300:600])
            + payload[600:],
        }[damage]
    )

    with pytest.raises(CheckpointError, match=r"encoder\.npz"):
        load_encoder_checkpoint(directory)


def test_a_schema_from_another_checkpoint_is_a_checkpoint_error(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    directory = copy_of(pretrained.checkpoint_dir, tmp_path)
    other = another_checkpoint(pretrained, tmp_path)
    shutil.copyfile(other / SCHEMA_FILE, directory / SCHEMA_FILE)

    with pytest.raises(CheckpointError, match="schema does not belong to this encoder"):
        load_encoder_checkpoint(directory)


def test_weights_from_another_checkpoint_are_a_checkpoint_error(
    pretrained: Pretrained, tmp_path: Path
) -> None:
    directory = copy_of(pretrained.checkpoint_dir, tmp_path)
    other = another_checkpoint(pretrained, tmp_path)
    shutil.copyfile(other / ENCODER_FILE, directory / ENCODER_FILE)

    with pytest.raises(CheckpointError):
        load_encoder_checkpoint(directory)


def test_a_missing_checkpoint_says_to_pretrain_first(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="fedfin pretrain"):
        load_encoder_checkpoint(tmp_path / "never-written")


# --- refusing to pretrain on too little or diverging ------------------------------------


@pytest.fixture(scope="module")
def small_public_pool() -> pd.DataFrame:
    loans = generate_credit_data(1_500, 2, seed=0)
    return loans[loans[GROUP_COLUMN] == PUBLIC_GROUP].reset_index(drop=True)


def test_too_few_public_rows_is_a_data_error(
    small_public_pool: pd.DataFrame, tmp_path: Path
) -> None:
    with pytest.raises(DataError, match="only 20 public rows"):
        pretrain(
            small_public_pool.head(20),
            LABEL,
            None,
            tmp_path / "out",
            PretrainConfig(),
            exclude=(GROUP_COLUMN,),
            progress=False,
        )


def test_a_diverging_learning_rate_is_a_config_error_and_writes_nothing(
    small_public_pool: pd.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    with pytest.raises(ConfigError, match=r"diverged.*lower --lr"):
        pretrain(
            small_public_pool,
            LABEL,
            None,
            out,
            PretrainConfig(learning_rate=1e10, epochs=3),
            exclude=(GROUP_COLUMN,),
            progress=False,
        )
    assert not out.exists()
