"""Move encoded tables in and out of torch."""

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedfin.common.schema import EncodedTable


def as_dataset(table: EncodedTable) -> TensorDataset:
    """(numeric, categorical, label) tensors; the table must carry labels."""
    if table.label is None:
        raise ValueError("a training dataset needs labels")
    return TensorDataset(
        torch.from_numpy(table.numeric),
        torch.from_numpy(table.categorical),
        torch.from_numpy(table.label),
    )


@torch.no_grad()
def predict_proba(model: nn.Module, table: EncodedTable, batch_size: int = 8192) -> np.ndarray:
    """Probability of default for every row, in eval mode, without tracking gradients."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(table.numeric), batch_size):
        numeric = torch.from_numpy(table.numeric[start : start + batch_size])
        categorical = torch.from_numpy(table.categorical[start : start + batch_size])
        out.append(torch.sigmoid(model(numeric, categorical)).numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


@torch.no_grad()
def predict_logits(model: nn.Module, table: EncodedTable, batch_size: int = 8192) -> np.ndarray:
    """Log-odds of default for every row (float64), in eval mode: what calibration refits."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(table.numeric), batch_size):
        numeric = torch.from_numpy(table.numeric[start : start + batch_size])
        categorical = torch.from_numpy(table.categorical[start : start + batch_size])
        out.append(model(numeric, categorical).numpy().astype(np.float64))
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float64)


@torch.no_grad()
def representations(encoder: nn.Module, table: EncodedTable, batch_size: int = 8192) -> np.ndarray:
    """The encoder's output for every row (used for transfer checks and baselines)."""
    was_training = encoder.training
    encoder.eval()
    out = [
        encoder(
            torch.from_numpy(table.numeric[s : s + batch_size]),
            torch.from_numpy(table.categorical[s : s + batch_size]),
        ).numpy()
        for s in range(0, len(table.numeric), batch_size)
    ]
    encoder.train(was_training)
    return np.concatenate(out)
