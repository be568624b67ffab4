"""What bank and server agree on for secure aggregation (SecAgg+): keys, ranges, error bound.

Both sides use Flower's SecAgg+ record names and stages. The bank masks its encoder
*update* (trained minus received encoder), not its weights: updates are small, so they fit
the clipping range and quantise finely. Every bank has weight 1 (a count may not leave a
bank), so the server recovers the plain mean of the updates, up to quantisation.
"""

from collections.abc import Iterable
from dataclasses import dataclass

from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)

SECAGG = RECORD_KEY_CONFIGS  # the record a secure-aggregation message or reply carries
STAGE = Key.STAGE
SETUP, SHARE_KEYS, COLLECT, UNMASK = Stage.all()
QUANTIZATION_RANGE = 1 << 22  # Flower's default: each coordinate becomes an integer < 2^22
MODULUS_RANGE = 1 << 32  # masks are uniform mod 2^32; n banks * 2^22 must stay below it
MAX_BANKS = MODULUS_RANGE // QUANTIZATION_RANGE - 1  # more could overflow the modular sum
# What may leave a bank at each stage, inside the SECAGG record (Flower's key names).
REPLY_KEYS = {
    SETUP: frozenset({Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}),
    SHARE_KEYS: frozenset({Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}),
    COLLECT: frozenset({Key.MASKED_PARAMETERS}),
    UNMASK: frozenset({Key.NODE_ID_LIST, Key.SHARE_LIST}),
}


@dataclass(frozen=True)
class SecureRound:
    """A round the bank has verified to be securely aggregated: the server learns only the
    sum of at least `threshold` banks' updates (honest-but-curious server)."""

    threshold: int
    banks: int


def majority_threshold(banks: int) -> int:
    """The default reconstruction threshold: a strict majority, and at least 2.

    Above half, a server cannot get one bank's mask seed from some banks and its private
    key from others by telling them different stories about who dropped out.
    """
    return max(2, banks // 2 + 1)


def quantisation_error_bound(clipping_range: float) -> float:
    """Largest error of one coordinate of the mean update: one quantisation step, 2c/2^22.

    Each bank rounds each coordinate stochastically to a step of 2c/Q (error below one
    step); the mean of n such errors is below one step too.
    """
    return 2.0 * clipping_range / QUANTIZATION_RANGE


def masked_shapes(encoder_shapes: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """The shapes of a masked vector: Flower's weight factor (one integer), then the encoder's."""
    return [(1,), *(tuple(shape) for shape in encoder_shapes)]
