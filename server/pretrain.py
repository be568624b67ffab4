"""Source pretraining: encoder + source head on the public pool, without DP.

The public pool is public data, so no privacy budget is spent here. The schema is
fitted on the pool's training part only, and the reported AUC is on a public hold-out.
"""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fedfin.common.atomic import replace_directory, write_atomically, write_json_atomically
from fedfin.common.checkpoint import (
    ENCODER_FILE,
    MODEL_FILE,
    SCHEMA_FILE,
    SOURCE_HEAD_FILE,
    save_encoder_checkpoint,
)
from fedfin.common.config import PretrainConfig
from fedfin.common.errors import ConfigError, DataError
from fedfin.common.metrics import credit_metrics
from fedfin.common.model import CreditModel, build_model
from fedfin.common.partition import split_train_test
from fedfin.common.profile import PUBLIC_PROFILE_FILE, DataProfile, fit_public_profile
from fedfin.common.schema import FeatureSchema
from fedfin.common.shared_weights import shared_arrays
from fedfin.common.tensors import as_dataset, predict_proba

METRICS_FILE = "pretrain_metrics.json"
CHECKPOINT_FILES = (
    ENCODER_FILE,
    SCHEMA_FILE,
    MODEL_FILE,
    SOURCE_HEAD_FILE,
    METRICS_FILE,
    PUBLIC_PROFILE_FILE,
)
_MIN_PUBLIC_ROWS = 50


@dataclass(frozen=True)
class PretrainResult:
    directory: Path
    metrics: dict[str, Any]


def pretrain(
    public: pd.DataFrame,
    label: str,
    positive_label: str | None,
    out: Path,
    config: PretrainConfig,
    exclude: tuple[str, ...] = (),
    source: str = "public data",
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
) -> PretrainResult:
    """Fit the schema, train encoder + source head, write the checkpoint and metrics to `out`.

    `out` is written as a whole or not at all (a new directory swapped in at the end), and
    only when it is new, empty or an encoder checkpoint `check_encoder_out` accepts.
    `provenance` (the data and flags it was trained with) is kept in its metrics so a later
    pretrain into the same directory can tell a rerun from other data.
    """
    check_encoder_out(out, provenance)
    started = time.perf_counter()
    fit_rows, holdout_rows = split_train_test(public, label, config.holdout_fraction, config.seed)
    schema = fit_public_schema(public, label, positive_label, config, exclude, source)
    fit = schema.transform(fit_rows, source)
    profile = fit_public_profile(fit_rows, schema, source)  # public data: it ships with the encoder
    holdout = schema.transform(holdout_rows, source)

    torch.manual_seed(config.seed)
    model = build_model(schema, config.model, config.seed)
    best_state, history = _train(model, fit, holdout, config, progress)
    model.load_state_dict(best_state)

    holdout_metrics = credit_metrics(holdout.label, predict_proba(model, holdout))  # type: ignore[arg-type]
    metrics: dict[str, Any] = {
        "source": source,
        "public_rows": len(public),
        "fit_rows": len(fit_rows),
        "holdout_rows": len(holdout_rows),
        "holdout": holdout_metrics,
        "best_epoch": int(np.argmax([h["holdout_auc"] for h in history])) + 1,
        "history": history,
        "seconds": round(time.perf_counter() - started, 2),
        "config": asdict(config),
        "provenance": provenance,
    }
    head = {k: v.detach().numpy() for k, v in model.head.state_dict().items()}

    def write_head(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **head)

    def write_checkpoint(directory: Path) -> None:
        save_encoder_checkpoint(
            directory,
            schema,
            config.model,
            shared_arrays(model),
            info={"source": source, "public_holdout_auc": holdout_metrics["auc"]},
        )
        write_atomically(directory / SOURCE_HEAD_FILE, write_head)
        write_json_atomically(directory / METRICS_FILE, metrics)
        profile.save(directory / PUBLIC_PROFILE_FILE)

    replace_directory(out, write_checkpoint)
    return PretrainResult(directory=out, metrics=metrics)


def fit_public_schema(
    public: pd.DataFrame,
    label: str,
    positive_label: str | None,
    config: PretrainConfig,
    exclude: tuple[str, ...] = (),
    source: str = "public data",
) -> FeatureSchema:
    """The schema `pretrain` fits (on the public pool's training part): cheap, so a caller
    can validate every bank's data before anything is trained or written."""
    if len(public) < _MIN_PUBLIC_ROWS:
        raise DataError(
            f"{source}: only {len(public)} public rows; need at least {_MIN_PUBLIC_ROWS}"
        )
    fit_rows, _ = split_train_test(public, label, config.holdout_fraction, config.seed)
    return FeatureSchema.fit(fit_rows, label, positive_label, exclude=exclude, source=source)


def public_profile(
    public: pd.DataFrame, schema: FeatureSchema, config: PretrainConfig, source: str
) -> DataProfile:
    """The public profile `pretrain` saves (same fit rows as the schema), without training:
    so a caller can check every bank's data against it before anything is written."""
    fit_rows, _ = split_train_test(public, schema.label, config.holdout_fraction, config.seed)
    return fit_public_profile(fit_rows, schema, source)


def check_encoder_out(out: Path, provenance: dict[str, Any] | None) -> None:
    """Refuse an `--out` that would overwrite something else: a file, a directory holding
    other files, or an encoder pretrained on other data or with other flags."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    present = {p.name for p in out.iterdir()}
    if not present:
        return
    foreign = sorted(present - set(CHECKPOINT_FILES))
    if foreign:
        raise ConfigError(
            f"--out {out}: not empty (holds '{foreign[0]}'); pretrain writes a new or empty "
            "directory, or reruns into its own"
        )
    try:
        earlier = json.loads((out / METRICS_FILE).read_text()).get("provenance")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if provenance is None or earlier != provenance:
        differs = _first_difference(earlier, provenance)
        raise ConfigError(
            f"--out {out}: already holds an encoder pretrained on other data or with other "
            f"flags ({differs}); use a new --out, or delete it to replace it"
        )


def _first_difference(earlier: Any, now: Any) -> str:
    if not isinstance(earlier, dict) or not isinstance(now, dict):
        return "its provenance is not recorded"
    for key in sorted(set(earlier) | set(now)):
        if earlier.get(key) != now.get(key):
            return f"{key}: {earlier.get(key)!r} there, {now.get(key)!r} now"
    return "same"


def _train(
    model: CreditModel,
    fit: Any,
    holdout: Any,
    config: PretrainConfig,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Adam with early stopping on hold-out AUC; returns the best weights and the history."""
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        as_dataset(fit), batch_size=config.batch_size, shuffle=True, generator=generator
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    loss_fn = nn.BCEWithLogitsLoss()
    best_auc, best_state, since_best = -1.0, _copy_state(model), 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(config.epochs), desc="pretrain", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        total = 0.0
        for numeric, categorical, target in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(numeric, categorical), target)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(target)
        train_loss = total / len(fit.label)
        probabilities = predict_proba(model, holdout)
        if not (math.isfinite(train_loss) and np.isfinite(probabilities).all()):
            bar.close()
            raise ConfigError(
                f"pretraining diverged in epoch {epoch + 1} (loss or predictions not finite); "
                "lower --lr"
            )
        auc = credit_metrics(holdout.label, probabilities)["auc"]
        history.append({"epoch": epoch + 1, "train_loss": train_loss, "holdout_auc": auc})
        bar.set_postfix(loss=f"{train_loss:.4f}", holdout_auc=f"{auc:.4f}")
        if auc > best_auc:
            best_auc, best_state, since_best = auc, _copy_state(model), 0
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    bar.close()
    return best_state, history


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
