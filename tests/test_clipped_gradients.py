"""fedfin's book-kept clipping gives exactly Opacus' clipped sum of per-example gradients.

The reference is Opacus itself: `GradSampleModule` (hooks mode) materialises every
example's gradient and `DPOptimizer.clip_and_accumulate` clips each to C and sums them.
The model is fedfin's real `CreditModel` with the pretrained encoder, on a real Lending Club
batch: its categorical columns repeat rows of every embedding table within the batch.
"""

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader

from fedfin.client.clipped_gradients import ClippedGradients, UnsupportedLayerError
from fedfin.client.dp_training import DpStepPlan, train_with_dp
from fedfin.client.poisson_batches import poisson_batches
from fedfin.common.checkpoint import EncoderCheckpoint
from fedfin.common.model import CreditModel
from fedfin.common.schema import EncodedTable
from fedfin.common.tensors import as_dataset
from tests.conftest import Pretrained

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

BATCH = 256
PHASES: dict[str, Callable[[CreditModel], nn.Module]] = {
    "full": lambda model: model,
    "fedrep head": lambda model: model.head,
    "fedrep encoder": lambda model: model.encoder,
}


@pytest.fixture(scope="module")
def table(pretrained: Pretrained, checkpoint: EncoderCheckpoint) -> EncodedTable:
    bank = pretrained.split.banks[0].train
    return checkpoint.schema.transform(bank, "bank 0")


@pytest.fixture(scope="module")
def batch(table: EncodedTable) -> tuple[torch.Tensor, ...]:
    numeric, categorical, target = as_dataset(table).tensors
    rows = torch.randperm(len(target), generator=torch.Generator().manual_seed(3))[:BATCH]
    return numeric[rows], categorical[rows], target[rows]


def _model(checkpoint: EncoderCheckpoint, phase: str) -> CreditModel:
    model = checkpoint.build_model(seed=0)
    trainable = {id(p) for p in PHASES[phase](model).parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trainable)
    return model


def _opacus_clipped_sum(
    model: nn.Module, batch: tuple[torch.Tensor, ...], max_grad_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Opacus' clipped sum and its per-example gradient norms (hooks mode, no noise)."""
    numeric, categorical, target = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampled = GradSampleModule(model, loss_reduction="sum")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(target),
    )
    loss = nn.BCEWithLogitsLoss(reduction="sum")(sampled(numeric, categorical), target)
    loss.backward()
    norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in optimizer.grad_samples], 1)
    optimizer.clip_and_accumulate()
    return [p.summed_grad for p in params], norms.norm(dim=1)


def _fedfin_clipped_sum(
    model: nn.Module, batch: tuple[torch.Tensor, ...], max_grad_norm: float
) -> list[torch.Tensor]:
    numeric, categorical, target = batch
    clipped = ClippedGradients(model)
    losses = nn.BCEWithLogitsLoss(reduction="none")(model(numeric, categorical), target)
    clipped.backward(losses)
    sums = clipped.clipped_sum(max_grad_norm)
    clipped.remove()
    return sums


@pytest.mark.parametrize("phase", list(PHASES))
def test_clipped_sum_equals_opacus_per_example_clipping(
    checkpoint: EncoderCheckpoint, batch: tuple[torch.Tensor, ...], phase: str
) -> None:
    model = _model(checkpoint, phase)
    _, norms = _opacus_clipped_sum(copy.deepcopy(model), batch, 1.0)
    clip = float(norms.quantile(0.25))  # a quarter of the batch unclipped, the rest clipped
    expected, norms = _opacus_clipped_sum(copy.deepcopy(model), batch, clip)
    assert float(norms.max()) > 3 * clip and int((norms < clip).sum()) >= BATCH // 5
    categorical = batch[1]
    assert all(len(categorical[:, j].unique()) < BATCH for j in range(categorical.shape[1]))
    actual = _fedfin_clipped_sum(model, batch, clip)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(actual) == len(expected) == len(params) > 0
    for parameter, mine, theirs in zip(params, actual, expected, strict=True):
        assert mine.shape == parameter.shape
        torch.testing.assert_close(mine, theirs.view_as(mine), rtol=1e-4, atol=1e-6)


def test_a_noiseless_dp_step_hands_adam_opacus_gradients(
    checkpoint: EncoderCheckpoint, table: EncodedTable
) -> None:
    """train_with_dp's whole step (σ = 0): the same gradient Opacus' hooks mode gives Adam,
    the clipped sum divided by the public batch size."""
    plan = DpStepPlan("full", 0.0, 0.05, 64, 0.02, 1e-3, 0, 1)
    seen: list[list[torch.Tensor]] = []
    train_with_dp(
        checkpoint.build_model(seed=0),
        table,
        plan,
        [],
        torch.Generator().manual_seed(11),
        observe_step=seen.append,
    )
    dataset = as_dataset(table)
    numeric, categorical, target = next(
        poisson_batches(dataset.tensors, plan.sample_rate, torch.Generator().manual_seed(11))
    )
    model = checkpoint.build_model(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, _ = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=plan.learning_rate),
            data_loader=DataLoader(dataset, batch_size=plan.batch_size),
            noise_multiplier=0.0,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=False,
            grad_sample_mode="hooks",
        )
    optimizer.expected_batch_size = plan.batch_size
    nn.BCEWithLogitsLoss()(private(numeric, categorical), target).backward()
    optimizer.step()
    assert len(seen) == 1
    for mine, parameter in zip(seen[0], model.parameters(), strict=True):
        torch.testing.assert_close(mine, parameter.grad, rtol=1e-4, atol=1e-7)


def test_a_layer_without_book_keeping_is_refused() -> None:
    with pytest.raises(UnsupportedLayerError, match="BatchNorm1d"):
        ClippedGradients(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    with pytest.raises(UnsupportedLayerError, match="Embedding"):
        ClippedGradients(nn.Embedding(5, 2, padding_idx=0))
    frozen = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    frozen[1].requires_grad_(False)
    ClippedGradients(frozen)  # a layer with nothing to train is no one's gradient


def test_a_layer_called_twice_in_one_forward_is_refused() -> None:
    layer = nn.Linear(3, 3)
    ClippedGradients(layer)
    with pytest.raises(UnsupportedLayerError, match="twice"):
        layer(layer(torch.ones(2, 3)))


def test_a_linear_layer_on_sequences_is_refused() -> None:
    layer = nn.Linear(3, 1)
    clipped = ClippedGradients(layer)
    clipped.backward(layer(torch.ones(2, 4, 3)).sum((1, 2)))
    with pytest.raises(UnsupportedLayerError, match="3-D input"):
        clipped.clipped_sum(1.0)
