"""Encoder checkpoints: the shared weights, the schema they expect, and the model shape.

Layout of a checkpoint directory:
    encoder.npz   the encoder's arrays (numpy, no pickle)
    schema.json   the feature schema fitted on public data
    model.json    model config, schema fingerprint and provenance
    source_head.npz  (a pretrained checkpoint) the public source head: encoder + this head
                  is the public model
    public_profile.json  (a pretrained checkpoint) binned distribution of each feature on the
                  public rows, for PSI and range checks (common/profile.py)
All files are written atomically; the schema fingerprint ties weights to their schema.
"""

import json
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfin.common.atomic import write_atomically, write_json_atomically
from fedfin.common.config import ModelConfig
from fedfin.common.errors import CheckpointError
from fedfin.common.model import CreditModel, build_model
from fedfin.common.schema import FeatureSchema
from fedfin.common.shared_weights import load_shared_arrays

ENCODER_FILE = "encoder.npz"
SCHEMA_FILE = "schema.json"
MODEL_FILE = "model.json"
SOURCE_HEAD_FILE = "source_head.npz"


@dataclass(frozen=True)
class EncoderCheckpoint:
    """What a server or a bank needs to rebuild the shared encoder."""

    schema: FeatureSchema
    model_config: ModelConfig
    arrays: OrderedDict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)

    def build_model(self, seed: int = 0) -> CreditModel:
        """A model whose encoder holds these weights and whose head is freshly initialised."""
        model = build_model(self.schema, self.model_config, seed)
        load_shared_arrays(model, self.arrays)
        return model


def save_encoder_checkpoint(
    directory: Path,
    schema: FeatureSchema,
    model_config: ModelConfig,
    arrays: OrderedDict[str, np.ndarray],
    info: dict[str, Any] | None = None,
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    schema.save(directory / SCHEMA_FILE)

    def write_arrays(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]

    write_atomically(directory / ENCODER_FILE, write_arrays)
    meta = {
        "model_config": asdict(model_config),
        "schema_fingerprint": schema.fingerprint,
        "array_order": list(arrays),
        "info": info or {},
    }
    write_json_atomically(directory / MODEL_FILE, meta)


def load_encoder_checkpoint(directory: Path) -> EncoderCheckpoint:
    """Load and cross-check a checkpoint; any problem is one `CheckpointError` naming the file."""
    if not directory.is_dir():
        raise CheckpointError(
            f"{directory}: encoder checkpoint directory not found; run `fedfin pretrain` first"
        )
    schema = FeatureSchema.load(directory / SCHEMA_FILE)
    meta_path = directory / MODEL_FILE
    try:
        meta = json.loads(meta_path.read_text())
        model_config = ModelConfig.from_dict(meta["model_config"])
        order = list(meta["array_order"])
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: model file not found") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta_path}: not a valid fedfin model file ({exc})") from None
    if meta.get("schema_fingerprint") != schema.fingerprint:
        raise CheckpointError(
            f"{directory / SCHEMA_FILE}: schema does not belong to this encoder "
            "(fingerprint mismatch)"
        )
    weights_path = directory / ENCODER_FILE
    try:
        with np.load(weights_path, allow_pickle=False) as npz:
            arrays = OrderedDict((key, npz[key]) for key in order)
    except FileNotFoundError:
        raise CheckpointError(f"{weights_path}: encoder weights not found") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{weights_path}: corrupt encoder weights ({exc})") from None
    checkpoint = EncoderCheckpoint(schema, model_config, arrays, dict(meta.get("info", {})))
    checkpoint.build_model()  # proves the arrays fit this schema and model shape
    return checkpoint


def load_source_head(directory: Path) -> OrderedDict[str, np.ndarray] | None:
    """The public source head written by pretraining, if present; corrupt is a `CheckpointError`."""
    path = directory / SOURCE_HEAD_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return OrderedDict((key, npz[key]) for key in npz.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path}: corrupt source head ({exc})") from None
