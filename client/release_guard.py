"""A client mod that checks every reply before it leaves the bank.

Defence in depth behind `bank_worker`: whatever a handler returns, a reply may carry only
the encoder's arrays (keys matching the received encoder exactly), the metrics the
protocol allows, and a status. Anything else is replaced by a declined status.
"""

import logging

from flwr.app import ConfigRecord, ConfigRecordValues, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from common.protocol import (
    ALLOWED_EVAL_METRICS,
    ALLOWED_REPLY_RECORDS,
    ALLOWED_TRAIN_METRICS,
    ARRAYS,
    METRICS,
    STATUS,
    STATUS_DECLINED,
)

log = logging.getLogger("fedfin.bank")


def reply_problem(request: Message, reply: Message) -> str | None:
    """Why `reply` may not be sent, or None when it carries only what is allowed."""
    if reply.has_error():
        return None
    content = reply.content
    names = set(content.keys())
    if not names <= ALLOWED_REPLY_RECORDS:
        return f"reply records {sorted(names - ALLOWED_REPLY_RECORDS)} are not allowed"
    if ARRAYS in content.array_records:
        sent = list(content.array_records[ARRAYS].keys())
        received = (
            list(request.content.array_records[ARRAYS].keys())
            if ARRAYS in request.content.array_records
            else []
        )
        if sent != received:
            return "reply arrays are not exactly the received encoder's keys"
    if METRICS in content.metric_records:
        allowed = ALLOWED_TRAIN_METRICS if ARRAYS in content.array_records else ALLOWED_EVAL_METRICS
        extra = set(content.metric_records[METRICS].keys()) - allowed
        if extra:
            return f"reply metrics {sorted(extra)} are not allowed"
    return None


def release_guard(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let a reply through only if it carries nothing but what the protocol allows."""
    reply = call_next(message, context)
    problem = reply_problem(message, reply)
    if problem is None:
        return reply
    log.error("release guard stopped a reply: %s", problem)
    status: dict[str, ConfigRecordValues] = {
        "status": STATUS_DECLINED,
        "reason": "release guard stopped the reply",
    }
    return Message(RecordDict({STATUS: ConfigRecord(status)}), reply_to=message)
