"""The server's side of secure aggregation: SecAgg+'s four stages inside fedfin's round.

Flower's `SecAggPlusWorkflow` drives the same stages but only through the legacy strategy
API (`LegacyContext`, `configure_fit`, `FitRes`); fedfin's loop is Message-API. So this
module runs the stages itself on `Grid.send_and_receive`, with Flower's own primitives
(Shamir `combine_shares`, key agreement, modular arithmetic, dequantise) and fedfin's
mask generator (`mask_generator`: the whole 256-bit seed, where Flower's uses 32 bits),
and differs from the workflow where fedfin needs it:
- every bank is every other bank's neighbour (SecAgg+ with as many shares as banks);
- the collect-stage message is fedfin's train message (encoder, round config) plus the
  forwarded shares, and its reply is fedfin's status and metrics plus the masked vector;
- a bank that declines or fails in any stage is a dropout: only banks whose keys were
  shared count as dropped (their pairwise masks are removed; banks that never shared keys
  masked with nobody), and masks are removed only against banks that sent a vector;
- too few banks at any stage ends the round with one message naming stage and counts.
What this module ever holds of a bank: public keys, encrypted shares it forwards, a
masked vector (uniform mod 2^32 without the other banks' masks), and secret shares. It
adds the masked vectors as they arrive, so what is left is their sum, then the mean.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.serverapp import Grid
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fedfin.common.errors import FedfinError
from fedfin.common.protocol import ARRAYS, METRICS, STATUS, STATUS_KEY, STATUS_OK
from fedfin.common.secure_aggregation import (
    COLLECT,
    MAX_BANKS,
    MODULUS_RANGE,
    QUANTIZATION_RANGE,
    SECAGG,
    SETUP,
    SHARE_KEYS,
    STAGE,
    UNMASK,
    majority_threshold,
    mask_generator,
    masked_shapes,
)
from fedfin.common.shared_weights import from_array_record, to_array_record

log = logging.getLogger("fedfin.server")
Vector = list[np.ndarray]
MaskGenerator = Callable[[bytes, int, list[tuple[int, ...]]], Vector]


class SecureAggregationError(FedfinError):
    """A secure round could not recover the sum (too few banks, inconsistent replies)."""


@dataclass
class SecureRoundResult:
    """What a secure round leaves the server with: replies without vectors, and the mean."""

    replies: list[Message]  # collect-stage replies (status, metrics), masked vectors removed
    mean_update: OrderedDict[str, np.ndarray] | None = None
    threshold: int = 0
    contributors: int = 0
    failure: str | None = None
    dropped: list[int] = field(default_factory=list)


def secure_train_round(
    grid: Grid,
    train_messages: list[Message],
    server_round: int,
    threshold: int,
    clipping_range: float,
    timeout: float | None,
    *,
    masks: MaskGenerator = mask_generator,
) -> SecureRoundResult:
    """Run SecAgg+ over the banks `train_messages` address; the mean of their updates.

    `threshold` 0 means a strict majority of the banks. A round that ends with fewer than
    `threshold` banks at any stage returns `failure`, one line naming the stage.
    """
    nodes = [m.metadata.dst_node_id for m in train_messages]
    t = threshold or majority_threshold(len(nodes))
    result = SecureRoundResult(replies=[], threshold=t)
    if not 2 <= len(nodes) <= MAX_BANKS or t > len(nodes):
        result.failure = (
            f"secure aggregation needs at least {t} banks (2 to {MAX_BANKS}); "
            f"the round has {len(nodes)}"
        )
        return result

    def send(contents: dict[int, RecordDict]) -> list[Message]:
        messages = [
            Message(c, dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(server_round))
            for n, c in contents.items()
        ]
        return list(grid.send_and_receive(messages, timeout=timeout))

    def too_few(stage: str, alive: set[int]) -> str | None:
        if len(alive) >= t:
            return None
        return (
            f"secure aggregation needs {t} of {len(nodes)} banks to reconstruct the sum; "
            f"only {len(alive)} remained after the '{stage}' stage"
        )

    # Stage 0, setup: protocol parameters out, two public keys back.
    setup = ConfigRecord(
        {
            STAGE: SETUP,
            Key.SAMPLE_NUMBER: len(nodes),
            Key.SHARE_NUMBER: len(nodes),
            Key.THRESHOLD: t,
            Key.CLIPPING_RANGE: float(clipping_range),
            Key.TARGET_RANGE: QUANTIZATION_RANGE,
            Key.MOD_RANGE: MODULUS_RANGE,
            Key.MAX_WEIGHT: 1.0,
        }
    )
    public_keys: dict[int, list[bytes]] = {}
    for reply in send({n: RecordDict({SECAGG: ConfigRecord(dict(setup))}) for n in nodes}):
        keys = _stage_reply(reply)
        if keys is not None and Key.PUBLIC_KEY_1 in keys and Key.PUBLIC_KEY_2 in keys:
            pk = [cast(bytes, keys[Key.PUBLIC_KEY_1]), cast(bytes, keys[Key.PUBLIC_KEY_2])]
            public_keys[reply.metadata.src_node_id] = pk
    if failure := too_few(SETUP, set(public_keys)):
        return _failed(result, failure, nodes, set(public_keys))

    # Stage 1, share keys: everyone's public keys out, encrypted shares back.
    keyed = set(public_keys)
    key_list = {str(n): public_keys[n] for n in keyed}
    forward: dict[int, tuple[list[int], list[bytes]]] = {n: ([], []) for n in keyed}
    shared: set[int] = set()
    contents = {
        n: RecordDict({SECAGG: ConfigRecord({**key_list, STAGE: SHARE_KEYS})}) for n in keyed
    }
    for reply in send(contents):
        sent = _stage_reply(reply)
        src = reply.metadata.src_node_id
        if sent is None or src not in keyed:
            continue
        shared.add(src)
        dsts = cast(list[int], sent[Key.DESTINATION_LIST])
        for dst, ciphertext in zip(dsts, cast(list[bytes], sent[Key.CIPHERTEXT_LIST]), strict=True):
            if dst in forward:
                forward[dst][0].append(src)
                forward[dst][1].append(ciphertext)
    if failure := too_few(SHARE_KEYS, shared):
        return _failed(result, failure, nodes, shared)

    # Stage 2, collect: the train message plus forwarded shares out, masked vectors back.
    by_node = {m.metadata.dst_node_id: m for m in train_messages}
    contents = {}
    for n in shared:
        srcs = [s for s in forward[n][0] if s in shared]
        ciphertexts = [c for s, c in zip(*forward[n], strict=True) if s in shared]
        content = RecordDict(dict(by_node[n].content.items()))
        content[SECAGG] = ConfigRecord(
            {STAGE: COLLECT, Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: srcs}
        )
        contents[n] = content
    encoder = from_array_record(train_messages[0].content.array_records[ARRAYS])
    shapes = masked_shapes(tuple(a.shape) for a in encoder.values())
    total: Vector | None = None
    sent_vector: set[int] = set()
    for reply in send(contents):
        vector = _masked_vector(reply, shapes)
        if not reply.has_error() and SECAGG in reply.content:
            del reply.content[SECAGG]  # only the running sum keeps it
        result.replies.append(reply)
        if vector is None or reply.metadata.src_node_id not in shared:
            continue
        sent_vector.add(reply.metadata.src_node_id)
        total = vector if total is None else parameters_addition(total, vector)
        total = parameters_mod(total, MODULUS_RANGE)
    if failure := too_few(COLLECT, sent_vector):
        return _failed(result, failure, nodes, sent_vector)
    assert total is not None
    dead = shared - sent_vector

    # Stage 3, unmask: who is alive and who dropped out; secret shares back.
    contents = {
        n: RecordDict(
            {
                SECAGG: ConfigRecord(
                    {
                        STAGE: UNMASK,
                        Key.ACTIVE_NODE_ID_LIST: sorted(sent_vector),
                        Key.DEAD_NODE_ID_LIST: sorted(dead),
                    }
                )
            }
        )
        for n in sent_vector
    }
    shares: dict[int, list[bytes]] = {n: [] for n in shared}
    answered: set[int] = set()
    for reply in send(contents):
        sent = _stage_reply(reply)
        if sent is None:
            continue
        answered.add(reply.metadata.src_node_id)
        owners = cast(list[int], sent[Key.NODE_ID_LIST])
        for owner, share in zip(owners, cast(list[bytes], sent[Key.SHARE_LIST]), strict=True):
            if owner in shares:
                shares[owner].append(share)
    if failure := too_few(UNMASK, answered):
        return _failed(result, failure, nodes, sent_vector)
    for owner, owner_shares in shares.items():
        if len(owner_shares) < t:
            return _failed(
                result,
                f"secure aggregation needs {t} shares of each bank's secret; "
                f"only {len(owner_shares)} arrived in the 'unmask' stage",
                nodes,
                sent_vector,
            )
        secret = combine_shares(owner_shares)
        if owner in sent_vector:  # its private mask
            total = parameters_subtraction(total, masks(secret, MODULUS_RANGE, shapes))
            continue
        for alive in sent_vector:  # a dropout: the pairwise masks the live banks added
            key = generate_shared_key(
                bytes_to_private_key(secret), bytes_to_public_key(public_keys[alive][0])
            )
            mask = masks(key, MODULUS_RANGE, shapes)
            total = (
                parameters_subtraction(total, mask)
                if alive > owner
                else parameters_addition(total, mask)
            )
    total = parameters_mod(total, MODULUS_RANGE)
    result.mean_update = _mean_update(total, len(sent_vector), clipping_range, encoder)
    result.contributors = len(sent_vector)
    result.dropped = sorted(set(nodes) - sent_vector)
    return result


def _failed(
    result: SecureRoundResult, failure: str, nodes: list[int], alive: set[int]
) -> SecureRoundResult:
    result.failure = failure
    result.dropped = sorted(set(nodes) - alive)
    return result


def _stage_reply(reply: Message) -> ConfigRecord | None:
    """A stage reply's SecAgg+ record, or None for an error or a declined bank (a dropout)."""
    if reply.has_error() or SECAGG not in reply.content.config_records:
        return None
    return reply.content.config_records[SECAGG]


def _masked_vector(reply: Message, shapes: list[tuple[int, ...]]) -> Vector | None:
    """The reply's masked vector if it is an accepted, well-formed one; else a dropout."""
    sent = _stage_reply(reply)
    if sent is None or STATUS not in reply.content.config_records:
        return None
    if reply.content.config_records[STATUS].get(STATUS_KEY) != STATUS_OK:
        return None
    blobs = sent.get(Key.MASKED_PARAMETERS)
    if not isinstance(blobs, list) or len(blobs) != len(shapes):
        return None
    try:
        vector = [bytes_to_ndarray(cast(bytes, b)).astype(np.int64) for b in blobs]
    except (ValueError, TypeError):
        return None
    if [tuple(v.shape) for v in vector] != shapes:
        return None
    return vector


def _mean_update(
    total: Vector, contributors: int, clipping_range: float, encoder: OrderedDict[str, np.ndarray]
) -> OrderedDict[str, np.ndarray]:
    """Unmasked sum -> the mean update, as Flower's workflow dequantises it (weight 1 each)."""
    weight_total, quantised = factor_extract(total)
    if weight_total != contributors * QUANTIZATION_RANGE:
        raise SecureAggregationError(
            f"the unmasked weight is {weight_total}, not {contributors} banks of weight 1: "
            "a bank's masked vector or share was wrong"
        )
    summed = dequantize(quantised, clipping_range, QUANTIZATION_RANGE)
    offset = -(contributors - 1) * clipping_range
    return OrderedDict(
        (key, ((vector + offset) / contributors))
        for key, vector in zip(encoder, summed, strict=True)
    )


def apply_mean_update(
    arrays: ArrayRecord, mean_update: OrderedDict[str, np.ndarray]
) -> OrderedDict[str, np.ndarray]:
    """The banks' mean encoder: the round's encoder plus the mean update, in its dtypes."""
    start = from_array_record(arrays)
    return OrderedDict(
        (key, (start[key].astype(np.float64) + mean_update[key]).astype(start[key].dtype))
        for key in start
    )


def aggregate_reply(
    request: Message,
    arrays: ArrayRecord,
    mean_update: OrderedDict[str, np.ndarray],
    weight_key: str,
) -> Message:
    """One reply holding the banks' mean encoder, for the strategy to aggregate.

    Like Flower's workflow, which hands every `FitRes` the aggregate: FedAvg of this one
    reply is the mean; FedAdam and FedProx take their server step from it.
    """
    content = RecordDict(
        {
            ARRAYS: to_array_record(apply_mean_update(arrays, mean_update)),
            METRICS: MetricRecord({weight_key: 1.0}),
        }
    )
    return Message(content, reply_to=request)
