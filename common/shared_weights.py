"""The one place that says which weights are shared (the encoder) and how they travel.

Everything that sends, receives, aggregates or checkpoints shared weights goes through
here, so a head weight can never slip into a message by accident: only the keys of
`model.encoder` exist in what these functions produce, and loading refuses anything
that is not exactly the encoder's keys, shapes and dtypes, or is not finite.
"""

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedfin.common.errors import CheckpointError

SHARED_MODULE = "encoder"


class SharedWeightsError(CheckpointError):
    """Received or stored encoder weights do not match this encoder."""


def _raw(model: nn.Module) -> nn.Module:
    """Unwrap Opacus' GradSampleModule, whose keys carry a `_module.` prefix."""
    return getattr(model, "_module", model)


def encoder_of(model: nn.Module) -> nn.Module:
    encoder = getattr(_raw(model), SHARED_MODULE, None)
    if not isinstance(encoder, nn.Module):
        raise SharedWeightsError(f"model has no '{SHARED_MODULE}' module to share")
    return encoder


def shared_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """Copies of the encoder's weights, keyed as in `model.encoder.state_dict()`."""
    return OrderedDict(
        (key, tensor.detach().cpu().numpy().copy())
        for key, tensor in encoder_of(model).state_dict().items()
    )


def check_shared_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Refuse unknown or missing keys, wrong shapes or dtypes, and non-finite values."""
    expected = encoder_of(model).state_dict()
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise SharedWeightsError(f"unknown encoder weight '{unknown[0]}'")
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise SharedWeightsError(f"encoder weight '{missing[0]}' is missing")
    for key, reference in expected.items():
        value = arrays[key]
        if tuple(value.shape) != tuple(reference.shape):
            raise SharedWeightsError(
                f"encoder weight '{key}' has shape {tuple(value.shape)}, "
                f"expected {tuple(reference.shape)}"
            )
        if value.dtype != np.float32:
            raise SharedWeightsError(
                f"encoder weight '{key}' has dtype {value.dtype}, expected float32"
            )
        if not np.isfinite(value).all():
            raise SharedWeightsError(f"encoder weight '{key}' contains NaN or Inf")


def load_shared_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Check, then load the encoder weights into `model` (strictly)."""
    check_shared_arrays(model, arrays)
    state = {key: torch.from_numpy(np.array(value, copy=True)) for key, value in arrays.items()}
    encoder_of(model).load_state_dict(state, strict=True)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Encoder weights as the ArrayRecord a Flower message carries."""
    return ArrayRecord(OrderedDict((k, Array(np.ascontiguousarray(v))) for k, v in arrays.items()))


def from_array_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    """The arrays of a received ArrayRecord, as numpy, in the order sent."""
    return OrderedDict((key, array.numpy()) for key, array in record.items())
