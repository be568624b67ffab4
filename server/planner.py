"""`fedfin plan`'s work: the public model's gradient signal on public groups, then the plans.

Runs on the coordinator's (or any bank's) public data only: the pretrained encoder, its
source head, and the public pool it was trained on. No private row is read and no budget
is spent.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.errors import CheckpointError, ConfigError
from fedfin.common.gradient_signal import GradientSignal, measure_gradient_signal
from fedfin.common.planning import ROUND_CANDIDATES, PlanQuestion, Recommendation, recommend
from fedfin.server.server_app import load_source_head

_MIN_GROUP_ROWS = 20  # smaller groups are pooled into one: their means are mostly noise


@dataclass(frozen=True)
class Plan:
    signal: GradientSignal
    recommendations: list[Recommendation]


def public_gradient_signal(
    encoder_dir: Path, public: pd.DataFrame, group_column: str, source: str, max_grad_norm: float
) -> GradientSignal:
    """Measure the public model's signal on `public`, grouped by `group_column`."""
    checkpoint = load_encoder_checkpoint(encoder_dir)
    head = load_source_head(encoder_dir)
    if head is None:
        raise CheckpointError(
            f"{encoder_dir}: no source head (source_head.npz); rerun `fedfin pretrain`"
        )
    if group_column not in public.columns:
        raise ConfigError(f"--group-by: column '{group_column}' is not in {source}")
    model = checkpoint.build_model()  # the encoder's weights; the head is set next
    model.head.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in head.items()})
    table = checkpoint.schema.transform(public, source)
    groups = _grouped(public[group_column])
    return measure_gradient_signal(model, table, groups, max_grad_norm)


def _grouped(column: pd.Series) -> np.ndarray:
    """Group labels, with missing values and groups under `_MIN_GROUP_ROWS` pooled as 'other'."""
    labels = column.astype("string").fillna("<missing>")
    sizes = labels.value_counts()
    small = set(sizes[sizes < _MIN_GROUP_ROWS].index)
    return np.asarray(labels.where(~labels.isin(small), "<small groups>"), dtype=object)


def make_plan(
    signal: GradientSignal,
    questions: Sequence[PlanQuestion],
    rounds: Sequence[int] = ROUND_CANDIDATES,
) -> Plan:
    return Plan(signal, [recommend(q, signal, rounds=rounds) for q in questions])
