"""The bank's side of secure aggregation: Flower's SecAgg+ mod, held to the bank's policy.

Flower's `secaggplus_mod` does the protocol (key pairs, Shamir shares of the mask seed and
key, pairwise and private masks, quantisation). This mod wraps it so that:
- a plain train message still reaches the bank's handler unchanged;
- the setup is refused unless its reconstruction threshold is at least the bank's own
  `secagg-min-banks` (K) and a strict majority of the round's banks (`majority_threshold`);
- in the collect stage the bank's handler trains (ledger first, as always), the mod masks
  the *update* (trained minus received encoder, weight 1), and a "secagg-masked" ledger
  entry records the masked vector's hash before the reply leaves; the plain arrays never
  reach the reply;
- a failure in any stage becomes a plain declined status (the server counts a dropout),
  never an exception text.
It sits inside `release_guard`, so the guard checks the masked reply that actually leaves.
"""

import importlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE, Key
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_state import BankState
from fedfin.client.release import array_sha256, record_release
from fedfin.common.errors import ConfigError
from fedfin.common.protocol import (
    ARRAYS,
    CONFIG,
    EPSILON,
    LEDGER_HEAD,
    LEDGER_SEQ,
    METRICS,
    REASON_DECLINED,
    REASON_KEY,
    STATUS,
    STATUS_DECLINED,
    STATUS_KEY,
    STATUS_OK,
)
from fedfin.common.secure_aggregation import (
    COLLECT,
    MAX_BANKS,
    MODULUS_RANGE,
    QUANTIZATION_RANGE,
    SECAGG,
    SETUP,
    STAGE,
    UNMASK,
    SecureRound,
    majority_threshold,
    mask_generator,
)
from fedfin.common.shared_weights import from_array_record

log = logging.getLogger("fedfin.bank")
# Flower's mod draws its masks through this module-level name; fedfin's generator uses the
# whole 256-bit seed (common/secure_aggregation.py says why). fedfin's server unmasks with
# the same generator, so a fedfin bank cannot take part in a stock Flower SecAgg+ round.
# (The package re-exports the mod function under the module's name: import the module.)
FLOWER_SECAGGPLUS: Any = importlib.import_module(
    "flwr.client.mod.secure_aggregation.secaggplus_mod"
)
FLOWER_SECAGGPLUS.pseudo_rand_gen = mask_generator
MASKED = "secagg-masked"  # the ledger kind of a masked release
SettingsResolver = Callable[[Context], BankSettings]

# Set only by this mod, around the handler call of a verified secure round: the handler
# reads it to know its update will be summed with at least `threshold` others. It cannot
# come from the server (a message field could), and it is reset when the call returns.
_SECURE_ROUND: ContextVar[SecureRound | None] = ContextVar("fedfin_secure_round", default=None)


def current_secure_round() -> SecureRound | None:
    """The secure round the current train call belongs to, or None for a plain round."""
    return _SECURE_ROUND.get()


@contextmanager
def _in_secure_round(round_: SecureRound) -> Iterator[None]:
    token = _SECURE_ROUND.set(round_)
    try:
        yield
    finally:
        _SECURE_ROUND.reset(token)


class _HandlerDeclined(Exception):
    """The handler declined (budget, bad input): its status reply goes out as it is."""

    def __init__(self, reply: Message) -> None:
        super().__init__("declined")
        self.reply = reply


def setup_problem(configs: ConfigRecord, min_banks: int) -> str | None:
    """Why this bank refuses a setup request, or None: the threshold protects the bank."""
    try:
        banks = int(cast(int, configs[Key.SAMPLE_NUMBER]))
        shares = int(cast(int, configs[Key.SHARE_NUMBER]))
        threshold = int(cast(int, configs[Key.THRESHOLD]))
        target, modulus = configs[Key.TARGET_RANGE], configs[Key.MOD_RANGE]
        weight = float(cast(float, configs[Key.MAX_WEIGHT]))
    except (KeyError, TypeError, ValueError):
        return "secure aggregation setup is malformed"
    if not 2 <= banks <= MAX_BANKS or shares != banks:
        return f"secure aggregation over {banks} banks with {shares} shares is not supported"
    if threshold < min_banks:
        return f"reconstruction threshold {threshold} is below this bank's secagg-min-banks"
    if threshold < majority_threshold(shares) or threshold > shares:
        return f"reconstruction threshold {threshold} of {shares} is not a strict majority"
    if target != QUANTIZATION_RANGE or modulus != MODULUS_RANGE or weight != 1.0:
        return "secure aggregation ranges or weight differ from fedfin's"
    return None


def _check_collect(configs: ConfigRecord, context: Context) -> None:
    """Before training: enough banks sent this bank shares to mask its update with."""
    sources = configs.get(Key.SOURCE_LIST)
    threshold = _secure_round(context).threshold
    if not isinstance(sources, list) or len(set(sources)) + 1 < threshold:
        raise ConfigError(f"fewer than {threshold} banks in the collect stage; not training")


def _check_unmask(configs: ConfigRecord, node_id: int) -> None:
    """A bank is either alive (mask seed share) or dropped (key share), never both."""
    alive = configs.get(Key.ACTIVE_NODE_ID_LIST)
    dropped = configs.get(Key.DEAD_NODE_ID_LIST)
    if not isinstance(alive, list) or not isinstance(dropped, list):
        raise ConfigError("unmask request is malformed")
    if set(alive) & set(dropped) or node_id not in alive:
        raise ConfigError("unmask request names a bank both alive and dropped, or not this one")


def _secure_round(context: Context) -> SecureRound:
    """The verified setup of this round, from the mod's own (local) state."""
    state = context.state.config_records[RECORD_KEY_STATE]
    return SecureRound(int(cast(int, state["threshold"])), int(cast(int, state["sample_num"])))


def _declined(message: Message) -> Message:
    status = ConfigRecord({STATUS_KEY: STATUS_DECLINED, REASON_KEY: REASON_DECLINED})
    return Message(RecordDict({STATUS: status}), reply_to=message)


def secure_aggregation_mod(resolve_settings: SettingsResolver) -> Mod:
    """The bank's SecAgg+ mod; `resolve_settings` gives its own policy (never the server's)."""

    def mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if (
            message.metadata.message_type != MessageType.TRAIN
            or SECAGG not in message.content.config_records
        ):
            return call_next(message, context)
        stage = message.content.config_records[SECAGG].get(STAGE)
        try:
            settings = resolve_settings(context)
            if stage == SETUP:
                problem = setup_problem(
                    message.content.config_records[SECAGG], settings.policy.secagg_min_banks
                )
                if problem:
                    raise ConfigError(problem)
            if stage == COLLECT:
                _check_collect(message.content.config_records[SECAGG], context)
                return _collect(message, context, call_next, settings)
            if stage == UNMASK:
                _check_unmask(message.content.config_records[SECAGG], message.metadata.dst_node_id)
            reply = secaggplus_mod(message, context, call_next)
        except _HandlerDeclined as declined:
            return declined.reply
        except Exception as exc:  # protocol texts stay in the log; the server sees a dropout
            log.warning("secure aggregation stage '%s' declined: %s", stage, exc)
            return _declined(message)
        return Message(RecordDict({SECAGG: reply.content.config_records[SECAGG]}), reply_to=message)

    return mod


def _collect(
    message: Message, context: Context, call_next: ClientAppCallable, settings: BankSettings
) -> Message:
    """Train (ledger first), mask the update with Flower's mod, record it, reply masked."""
    received = from_array_record(message.content.array_records[ARRAYS])
    round_ = _secure_round(context)
    trained: list[Message] = []

    def train_then_hand_over_update(msg: Message, ctxt: Context) -> Message:
        with _in_secure_round(round_):
            reply = call_next(msg, ctxt)
        if reply.has_error() or ARRAYS not in reply.content.array_records:
            raise _HandlerDeclined(reply)
        trained.append(reply)
        arrays = from_array_record(reply.content.array_records[ARRAYS])
        update = [
            np.asarray(arrays[key], dtype=np.float64) - np.asarray(received[key], np.float64)
            for key in received
        ]
        largest = max((float(np.abs(u).max()) for u in update if u.size), default=0.0)
        clip = float(
            cast(float, context.state.config_records[RECORD_KEY_STATE].get("clipping_range", 0.0))
        )
        if largest > clip:
            log.warning(
                "%s: update coordinates up to %.3g are clipped to the secure-aggregation "
                "range ±%.3g (raise the server's secagg-clipping-range)",
                settings.name,
                largest,
                clip,
            )
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), 1, {})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    masked = secaggplus_mod(message, context, train_then_hand_over_update)
    (plain,) = trained
    secagg = masked.content.config_records[SECAGG]
    vectors = [bytes_to_ndarray(b) for b in cast(list[bytes], secagg[Key.MASKED_PARAMETERS])]
    status = plain.content.config_records[STATUS]
    metrics = plain.content.metric_records[METRICS]
    state = BankState(settings.state_dir)
    config = message.content.config_records[CONFIG]
    entry = record_release(
        state,
        settings,
        message.metadata.run_id,
        int(cast(int, config["server-round"])),
        MASKED,
        [],
        float(cast(float, metrics[EPSILON])),
        {},
        {key: cast(float, value) for key, value in metrics.items()},
        str(config.get("federation-id", "")),
        extra={
            "train_seq": int(cast(int, status[LEDGER_SEQ])),
            "masked_sha256": [array_sha256(v) for v in vectors],
            "secure_aggregation": {
                "threshold": round_.threshold,
                "banks": round_.banks,
                "what_is_sent": "the update (trained minus received encoder), quantised "
                "and masked with SecAgg+ pairwise and private masks",
            },
        },
    )
    out = ConfigRecord({**dict(status), LEDGER_SEQ: int(entry["seq"]), LEDGER_HEAD: entry["hash"]})
    assert out[STATUS_KEY] == STATUS_OK
    return Message(
        RecordDict({STATUS: out, METRICS: metrics, SECAGG: ConfigRecord(dict(secagg), False)}),
        reply_to=message,
    )
