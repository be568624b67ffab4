"""A client mod that checks every reply before it leaves the bank.

Defence in depth behind `bank_worker`: whatever a handler returns, a reply may carry only
the encoder's arrays (keys, shapes and dtypes matching the received encoder exactly, and
only in a train reply), the metrics the protocol allows, and a status with the allowed keys
and, when declined, one of the fixed reasons. Anything else is replaced by a bare declined
status.
"""

import logging

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import Key

from fedfin.common.protocol import (
    ALLOWED_EVAL_METRICS,
    ALLOWED_REPLY_RECORDS,
    ALLOWED_STATUS_KEYS,
    ALLOWED_TRAIN_METRICS,
    ARRAYS,
    DECLINE_REASONS,
    METRICS,
    REASON_GUARD,
    REASON_KEY,
    STATUS,
    STATUS_DECLINED,
    STATUS_KEY,
    STATUS_OK,
)
from fedfin.common.secure_aggregation import (
    COLLECT,
    MODULUS_RANGE,
    REPLY_KEYS,
    SECAGG,
    STAGE,
    masked_shapes,
)

log = logging.getLogger("fedfin.bank")


def reply_problem(request: Message, reply: Message, secagg_stage: str | None = None) -> str | None:
    """Why `reply` may not be sent, or None when it carries only what is allowed.

    `secagg_stage`: the SecAgg+ stage the request asked for (read before the mod ran).
    """
    if reply.has_error():
        return None
    content = reply.content
    names = set(content.keys())
    if secagg_stage is not None:
        return _secagg_problem(request, reply, secagg_stage)
    if SECAGG in names:
        return "secure-aggregation material in a reply to a plain request"
    if not names <= ALLOWED_REPLY_RECORDS:
        return f"reply records {sorted(names - ALLOWED_REPLY_RECORDS)} are not allowed"
    is_train = request.metadata.message_type == MessageType.TRAIN
    if ARRAYS in names:
        if not is_train or ARRAYS not in content.array_records:
            return "only a train reply may carry arrays, as an array record"
        problem = _arrays_problem(request, content.array_records[ARRAYS])
        if problem:
            return problem
    if METRICS in names:
        if METRICS not in content.metric_records:
            return "metrics must be a metric record"
        allowed = ALLOWED_TRAIN_METRICS if is_train else ALLOWED_EVAL_METRICS
        extra = set(content.metric_records[METRICS].keys()) - allowed
        if extra:
            return f"reply metrics {sorted(extra)} are not allowed"
    if STATUS not in content.config_records:
        return "reply has no status"
    status = content.config_records[STATUS]
    extra = set(status.keys()) - ALLOWED_STATUS_KEYS
    if extra:
        return f"status keys {sorted(extra)} are not allowed"
    if status.get(STATUS_KEY) == STATUS_DECLINED:
        if status.get(REASON_KEY) not in DECLINE_REASONS:
            return "a declined reply may only give one of the fixed reasons"
        if ARRAYS in names or METRICS in names:
            return "a declined reply carries no arrays or metrics"
    elif status.get(STATUS_KEY) != STATUS_OK or REASON_KEY in status:
        return "status must be ok (without a reason) or declined"
    return None


def _secagg_problem(request: Message, reply: Message, stage: str) -> str | None:
    """A secure round's reply: the stage's key material, or (collect) masked vectors."""
    content = reply.content
    names = set(content.keys())
    if ARRAYS in names:
        return "a secure-aggregation reply may not carry arrays"
    if SECAGG not in names:  # a declined status (a dropout): the plain rules apply
        return reply_problem(request, reply)
    if stage not in REPLY_KEYS or SECAGG not in content.config_records:
        return f"unknown secure-aggregation stage '{stage}'"
    sent = content.config_records[SECAGG]
    if set(sent.keys()) != REPLY_KEYS[stage]:
        return f"secure-aggregation stage '{stage}' reply keys {sorted(sent.keys())}"
    if stage != COLLECT:
        if names != {SECAGG}:
            return f"secure-aggregation stage '{stage}' reply carries {sorted(names)}"
        return None
    problem = _masked_problem(request, sent)
    if problem:
        return problem
    without = Message(
        RecordDict({k: v for k, v in content.items() if k != SECAGG}), reply_to=request
    )
    problem = reply_problem(request, without)
    if problem is None and without.content.config_records[STATUS].get(STATUS_KEY) != STATUS_OK:
        return "masked vectors in a declined reply"
    return problem


def _masked_problem(request: Message, sent: ConfigRecord) -> str | None:
    """Masked vectors: integers in [0, 2^32), the weight factor then the encoder's shapes."""
    received = request.content.array_records.get(ARRAYS)
    if received is None:
        return "a masked reply to a request without an encoder"
    blobs = sent.get(Key.MASKED_PARAMETERS)
    expected = masked_shapes(tuple(a.shape) for a in received.values())
    if not isinstance(blobs, list) or len(blobs) != len(expected):
        return "masked vectors do not match the received encoder"
    for blob, shape in zip(blobs, expected, strict=True):
        try:
            vector = bytes_to_ndarray(blob) if isinstance(blob, bytes) else None
        except ValueError:
            vector = None
        if vector is None or vector.dtype.kind not in "iu" or tuple(vector.shape) != shape:
            return "masked vectors must be integer arrays of the received encoder's shapes"
        if vector.size and (vector.min() < 0 or vector.max() >= MODULUS_RANGE):
            return "masked vectors must lie in [0, 2^32)"
    return None


def _arrays_problem(request: Message, sent: ArrayRecord) -> str | None:
    """The reply's arrays must be the received encoder's, in names, shapes and dtypes."""
    received = request.content.array_records.get(ARRAYS)
    if received is None or list(sent.keys()) != list(received.keys()):
        return "reply arrays are not exactly the received encoder's keys"
    for key, array in sent.items():
        expected = received[key]
        if tuple(array.shape) != tuple(expected.shape) or array.dtype != expected.dtype:
            return f"reply array '{key}' does not have the received encoder's shape and dtype"
    return None


def release_guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let a reply through only if it carries nothing but what the protocol allows."""
    stage = None
    if SECAGG in message.content.config_records:  # read now: Flower's mod consumes it
        stage = str(message.content.config_records[SECAGG].get(STAGE))
    reply = call_next(message, context)
    problem = reply_problem(message, reply, stage)
    if problem is None:
        return reply
    log.error("release guard stopped a reply: %s", problem)
    status: dict[str, ConfigRecordValues] = {
        STATUS_KEY: STATUS_DECLINED,
        REASON_KEY: REASON_GUARD,
    }
    return Message(RecordDict({STATUS: ConfigRecord(status)}), reply_to=message)
