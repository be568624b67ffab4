"""What bank and server agree on for secure aggregation (SecAgg+): keys, ranges, error bound.

Both sides use Flower's SecAgg+ record names and stages. The bank masks its encoder
*update* (trained minus received encoder), not its weights: updates are small, so they fit
the clipping range and quantise finely. Every bank has weight 1 (a count may not leave a
bank), so the server recovers the plain mean of the updates, up to quantisation.
"""

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
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


def mask_generator(
    seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]
) -> list[np.ndarray]:
    """Masks uniform in [0, num_range) from the whole seed: the ChaCha20 keystream of
    SHA-256(seed).

    Replaces Flower's `pseudo_rand_gen`, which folds the 32-byte seed into 32 bits for
    NumPy's Mersenne Twister: pairwise masks a search of 2^32 seeds per bank could strip.
    Same signature, so Flower's SecAgg+ mod and fedfin's server use it alike.
    """
    if num_range & (num_range - 1) or not 0 < num_range <= 1 << 32:
        raise ValueError(f"mask range must be a power of 2 up to 2^32, got {num_range}")
    sizes = [int(np.prod(shape)) if shape else 1 for shape in dimensions_list]
    encryptor = Cipher(algorithms.ChaCha20(hashlib.sha256(seed).digest(), bytes(16)), None)
    stream = encryptor.encryptor().update(bytes(4 * sum(sizes)))
    values = np.frombuffer(stream, dtype="<u4").astype(np.int64) % num_range
    masks, start = [], 0
    for shape, size in zip(dimensions_list, sizes, strict=True):
        chunk = values[start : start + size]
        masks.append(np.array(chunk[0]) if not shape else chunk.reshape(shape))
        start += size
    return masks
