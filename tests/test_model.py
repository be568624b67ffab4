"""The credit model and the one definition of what is shared: the encoder, nothing else."""

import re
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from fedfin.common.config import ModelConfig
from fedfin.common.model import build_model
from fedfin.common.schema import EncodedTable, FeatureSchema
from fedfin.common.shared_weights import (
    SharedWeightsError,
    check_shared_arrays,
    from_array_record,
    load_shared_arrays,
    shared_arrays,
    to_array_record,
)
from fedfin.common.synthetic import GROUP_COLUMN, LABEL, generate_credit_data

MODEL_CONFIGS = [ModelConfig(), ModelConfig(hidden_sizes=(32, 16, 8), head_hidden=4)]


@pytest.fixture(scope="module")
def schema_and_table() -> tuple[FeatureSchema, EncodedTable]:
    frame = generate_credit_data(600, 2, seed=0)
    schema = FeatureSchema.fit(frame, LABEL, exclude=(GROUP_COLUMN,))
    return schema, schema.transform(frame, "synthetic")


@pytest.fixture
def schema(schema_and_table: tuple[FeatureSchema, EncodedTable]) -> FeatureSchema:
    return schema_and_table[0]


@pytest.fixture
def table(schema_and_table: tuple[FeatureSchema, EncodedTable]) -> EncodedTable:
    return schema_and_table[1]


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def assert_same_state(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


def logits(model: nn.Module, table: EncodedTable) -> torch.Tensor:
    return model(torch.from_numpy(table.numeric), torch.from_numpy(table.categorical))


# --- the model --------------------------------------------------------------------------


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=["logistic-head", "mlp-head"])
def test_no_batchnorm_anywhere_because_dp_sgd_cannot_account_for_it(
    schema: FeatureSchema, config: ModelConfig
) -> None:
    model = build_model(schema, config, seed=0)

    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any("running_" in key for key in model.state_dict())
    assert any(isinstance(m, nn.LayerNorm) for m in model.encoder.modules())


def test_the_model_gives_one_default_logit_per_row(
    schema: FeatureSchema, table: EncodedTable
) -> None:
    model = build_model(schema, ModelConfig(), seed=0)

    assert logits(model, table).shape == (len(table.numeric),)


def test_the_encoder_outputs_the_representation_size(
    schema: FeatureSchema, table: EncodedTable
) -> None:
    config = ModelConfig(hidden_sizes=(16, 12))
    encoder = build_model(schema, config, seed=0).encoder

    output = encoder(torch.from_numpy(table.numeric), torch.from_numpy(table.categorical))

    assert output.shape == (len(table.numeric), config.representation_dim)


def test_the_same_seed_builds_the_same_model_without_touching_global_randomness(
    schema: FeatureSchema,
) -> None:
    global_state = torch.random.get_rng_state()

    first = build_model(schema, ModelConfig(), seed=3)
    second = build_model(schema, ModelConfig(), seed=3)

    assert_same_state(state_of(first), state_of(second))
    assert torch.equal(torch.random.get_rng_state(), global_state)
    other = build_model(schema, ModelConfig(), seed=4)
    assert not torch.equal(
        state_of(first)["head.layers.weight"], state_of(other)["head.layers.weight"]
    )


# --- what is shared ---------------------------------------------------------------------


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=["logistic-head", "mlp-head"])
def test_shared_arrays_are_exactly_the_encoder_weights(
    schema: FeatureSchema, config: ModelConfig
) -> None:
    model = build_model(schema, config, seed=0)

    arrays = shared_arrays(model)

    assert list(arrays) == list(model.encoder.state_dict())
    encoder_keys = [
        k.removeprefix("encoder.") for k in model.state_dict() if k.startswith("encoder.")
    ]
    assert list(arrays) == encoder_keys
    for key, value in model.encoder.state_dict().items():
        np.testing.assert_array_equal(arrays[key], value.numpy())


def test_no_head_weight_is_ever_in_the_shared_arrays(schema: FeatureSchema) -> None:
    model = build_model(schema, ModelConfig(head_hidden=4), seed=0)
    head_values = [value.numpy() for value in model.head.state_dict().values()]

    arrays = shared_arrays(model)

    assert not any(key.startswith("head") for key in arrays)
    for head_value in head_values:
        for shared in arrays.values():
            assert not (shared.shape == head_value.shape and np.array_equal(shared, head_value))


def test_shared_arrays_are_float32_copies_the_model_does_not_see_changed(
    schema: FeatureSchema,
) -> None:
    model = build_model(schema, ModelConfig(), seed=0)
    before = state_of(model)

    arrays = shared_arrays(model)
    for value in arrays.values():
        assert value.dtype == np.float32
        value += 1.0

    assert_same_state(state_of(model), before)


def test_loading_shared_arrays_replaces_the_encoder_and_leaves_the_head_unchanged(
    schema: FeatureSchema,
) -> None:
    sender = build_model(schema, ModelConfig(), seed=0)
    receiver = build_model(schema, ModelConfig(), seed=1)
    head_before = state_of(receiver.head)

    load_shared_arrays(receiver, shared_arrays(sender))

    assert_same_state(state_of(receiver.encoder), state_of(sender.encoder))
    assert_same_state(state_of(receiver.head), head_before)
    assert not torch.equal(
        state_of(receiver.head)["layers.weight"], state_of(sender.head)["layers.weight"]
    )


def _unknown_key(arrays: OrderedDict[str, np.ndarray]) -> None:
    arrays["extra.weight"] = np.zeros(3, dtype=np.float32)


def _head_key(arrays: OrderedDict[str, np.ndarray]) -> None:
    arrays["layers.weight"] = np.zeros((1, 32), dtype=np.float32)


def _missing_key(arrays: OrderedDict[str, np.ndarray]) -> None:
    del arrays["mlp.0.weight"]


def _wrong_shape(arrays: OrderedDict[str, np.ndarray]) -> None:
    arrays["mlp.0.weight"] = arrays["mlp.0.weight"][:, :-1].copy()


def _wrong_dtype(arrays: OrderedDict[str, np.ndarray]) -> None:
    arrays["mlp.0.weight"] = arrays["mlp.0.weight"].astype(np.float64)


def _nan(arrays: OrderedDict[str, np.ndarray]) -> None:
    arrays["mlp.0.bias"][0] = np.nan


def _inf(arrays: OrderedDict[str, np.ndarray]) -> None:
    arrays["embeddings.0.weight"][0, 0] = np.inf


BAD_ARRAYS = {
    "unknown-key": (_unknown_key, "unknown encoder weight 'extra.weight'"),
    "head-weight": (_head_key, "unknown encoder weight 'layers.weight'"),
    "missing-key": (_missing_key, "'mlp.0.weight' is missing"),
    "wrong-shape": (_wrong_shape, "'mlp.0.weight' has shape"),
    "wrong-dtype": (_wrong_dtype, "'mlp.0.weight' has dtype float64"),
    "nan": (_nan, "'mlp.0.bias' contains NaN"),
    "inf": (_inf, "'embeddings.0.weight' contains NaN or Inf"),
}


@pytest.mark.parametrize(("damage", "problem"), BAD_ARRAYS.values(), ids=BAD_ARRAYS)
def test_loading_refuses_anything_but_exactly_the_encoder_weights_and_changes_nothing(
    schema: FeatureSchema, damage: Callable[[OrderedDict[str, np.ndarray]], None], problem: str
) -> None:
    model = build_model(schema, ModelConfig(), seed=0)
    before = state_of(model)
    arrays = shared_arrays(build_model(schema, ModelConfig(), seed=1))
    damage(arrays)

    with pytest.raises(SharedWeightsError, match=re.escape(problem)):
        load_shared_arrays(model, arrays)
    with pytest.raises(SharedWeightsError):
        check_shared_arrays(model, arrays)

    assert_same_state(state_of(model), before)


def test_array_record_round_trip_keeps_keys_order_dtype_and_values(
    schema: FeatureSchema,
) -> None:
    arrays = shared_arrays(build_model(schema, ModelConfig(), seed=0))

    received = from_array_record(to_array_record(arrays))

    assert list(received) == list(arrays)
    for key, value in arrays.items():
        assert received[key].dtype == value.dtype
        np.testing.assert_array_equal(received[key], value)


def test_a_received_array_record_loads_into_another_model(schema: FeatureSchema) -> None:
    sender = build_model(schema, ModelConfig(), seed=0)
    receiver = build_model(schema, ModelConfig(), seed=1)

    load_shared_arrays(receiver, from_array_record(to_array_record(shared_arrays(sender))))

    assert_same_state(state_of(receiver.encoder), state_of(sender.encoder))


# --- through Opacus -----------------------------------------------------------------------


def test_shared_weights_work_through_an_opacus_wrapped_model(schema: FeatureSchema) -> None:
    sender = build_model(schema, ModelConfig(), seed=0)
    inner = build_model(schema, ModelConfig(), seed=1)
    head_before = state_of(inner.head)
    wrapped = GradSampleModule(inner)
    assert all(key.startswith("_module.") for key in wrapped.state_dict())

    load_shared_arrays(wrapped, shared_arrays(sender))

    assert list(shared_arrays(wrapped)) == list(shared_arrays(sender))
    assert_same_state(state_of(inner.encoder), state_of(sender.encoder))
    assert_same_state(state_of(inner.head), head_before)
    with pytest.raises(SharedWeightsError):
        load_shared_arrays(wrapped, {"_module.encoder.mlp.0.weight": np.zeros(1, np.float32)})


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # inputs need no grad
def test_an_opacus_wrapped_model_still_computes_per_example_gradients_after_loading(
    schema: FeatureSchema, table: EncodedTable
) -> None:
    wrapped = GradSampleModule(build_model(schema, ModelConfig(), seed=1))
    load_shared_arrays(wrapped, shared_arrays(build_model(schema, ModelConfig(), seed=0)))
    rows = 8
    batch = EncodedTable(table.numeric[:rows], table.categorical[:rows], table.label)

    logits(wrapped, batch).sum().backward()

    first_layer = dict(wrapped.named_parameters())["_module.encoder.mlp.0.weight"]
    grad_sample = first_layer.grad_sample
    assert grad_sample is not None
    assert grad_sample.shape == (rows, *first_layer.shape)
