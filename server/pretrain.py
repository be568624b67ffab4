"""Source pretraining: encoder + source head on the public pool, without DP.

The public pool is public data, so no privacy budget is spent here. The schema is
fitted on the pool's training part only, and the reported AUC is on a public hold-out.
"""

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

from common.atomic import write_atomically, write_json_atomically
from common.checkpoint import SOURCE_HEAD_FILE, save_encoder_checkpoint
from common.config import PretrainConfig
from common.errors import ConfigError, DataError
from common.metrics import credit_metrics
from common.model import CreditModel, build_model
from common.partition import split_train_test
from common.schema import FeatureSchema
from common.shared_weights import shared_arrays
from common.tensors import as_dataset, predict_proba

METRICS_FILE = "pretrain_metrics.json"
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
) -> PretrainResult:
    """Fit the schema, train encoder + source head, write the checkpoint and metrics to `out`."""
    if len(public) < _MIN_PUBLIC_ROWS:
        raise DataError(
            f"{source}: only {len(public)} public rows; need at least {_MIN_PUBLIC_ROWS}"
        )
    started = time.perf_counter()
    fit_rows, holdout_rows = split_train_test(public, label, config.holdout_fraction, config.seed)
    schema = FeatureSchema.fit(fit_rows, label, positive_label, exclude=exclude, source=source)
    fit = schema.transform(fit_rows, source)
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
    }
    save_encoder_checkpoint(
        out,
        schema,
        config.model,
        shared_arrays(model),
        info={"source": source, "public_holdout_auc": holdout_metrics["auc"]},
    )
    head = {k: v.detach().numpy() for k, v in model.head.state_dict().items()}

    def write_head(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **head)

    write_atomically(out / SOURCE_HEAD_FILE, write_head)
    write_json_atomically(out / METRICS_FILE, metrics)
    return PretrainResult(directory=out, metrics=metrics)


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
