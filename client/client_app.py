"""The ClientApp that runs inside each bank.

It reads the bank's private settings (node config, or the bank runner's own config), hands
each message to `bank_worker`, and replies with the encoder arrays and the numbers the
bank's policy allows, or with a declined status. The private head, raw rows and exact
statistics are never put in a reply; the reply is recorded in the ledger before it is
returned, and carries that ledger entry's sequence number and hash (the server's anchor).

A declined reply says only "declined" (or "privacy budget spent", a public fact) with ε
spent and the budget: error types and texts can depend on the data, so they stay in the
bank's log.
"""

import logging
from collections.abc import Callable, Sequence

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import ConfigRecordValues as ConfigValue
from flwr.app import MetricRecordValues as MetricValue
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedfin.client.bank_settings import BankSettings, settings_from_node_config
from fedfin.client.bank_worker import BankReply, evaluate_round, record_decline, train_round
from fedfin.client.release_guard import release_guard
from fedfin.client.secure_aggregation import current_secure_round, secure_aggregation_mod
from fedfin.common.errors import FedfinError
from fedfin.common.logs import log_like_flower_unless_configured
from fedfin.common.protocol import (
    ARRAYS,
    BANK_KEY,
    CONFIG,
    EPSILON,
    EPSILON_BUDGET,
    EPSILON_SPENT,
    LEDGER_HEAD,
    LEDGER_SEQ,
    METRICS,
    REASON_BUDGET,
    REASON_DECLINED,
    REASON_KEY,
    SOURCE_HEAD,
    STATUS,
    STATUS_DECLINED,
    STATUS_KEY,
    STATUS_OK,
    RoundInstructions,
)
from fedfin.common.shared_weights import from_array_record, to_array_record

log = logging.getLogger("fedfin.bank")
SettingsResolver = Callable[[Context], BankSettings]


def settings_from_context(context: Context) -> BankSettings:
    return settings_from_node_config(dict(context.node_config))


def declined_reason(exc: Exception) -> str:
    """The one thing the server may learn about a failure: one of two fixed strings."""
    from fedfin.client.budget import BudgetSpentError

    return REASON_BUDGET if isinstance(exc, BudgetSpentError) else REASON_DECLINED


def declined_status(
    message: Message, settings: BankSettings | None, reason: str
) -> dict[str, ConfigValue]:
    """Status of a declined reply: the fixed reason, public budget facts, the ledger anchor."""
    status: dict[str, ConfigValue] = {STATUS_KEY: STATUS_DECLINED, REASON_KEY: reason}
    if settings is None:
        return status
    status[BANK_KEY] = settings.name
    try:
        config = message.content.config_records.get(CONFIG, ConfigRecord())
        decline = record_decline(
            settings,
            message.metadata.run_id,
            _int_or_zero(config.get("server-round")),
            str(config.get("federation-id", "")),
            reason,
        )
    except Exception:  # a broken ledger: the decline goes without an anchor
        log.exception("%s could not record its declined reply", settings.name)
        return status
    status[EPSILON_SPENT] = float(decline.metrics[EPSILON])
    status[EPSILON_BUDGET] = float(settings.policy.epsilon_budget)
    status[LEDGER_SEQ] = decline.ledger_seq
    status[LEDGER_HEAD] = decline.ledger_head
    return status


def _int_or_zero(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


def build_client_app(
    resolve_settings: SettingsResolver = settings_from_context,
    torch_threads: int | None = None,
    mods: Sequence[Mod] = (),
) -> ClientApp:
    """A ClientApp whose bank settings come from `resolve_settings` (node config by default).

    `release_guard` always wraps the handlers, so that extra `mods` (e.g. for logging or
    measuring) see exactly what leaves the bank. Inside it, the SecAgg+ mod masks a secure
    round's update: the guard checks the masked reply, the one that leaves, and would stop
    a plain update. A plain round passes through the SecAgg+ mod untouched.
    """
    log_like_flower_unless_configured()  # a Ray worker or SuperNode process: Flower's format
    app = ClientApp(mods=[*mods, release_guard, secure_aggregation_mod(resolve_settings)])

    def handle(message: Message, context: Context, train: bool) -> Message:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        settings: BankSettings | None = None
        try:
            settings = resolve_settings(context)
            instructions = RoundInstructions.from_config(
                dict(message.content.config_records[CONFIG])
            )
            encoder = from_array_record(message.content.array_records[ARRAYS])
            run_id = message.metadata.run_id
            reply: BankReply
            if train:
                source_head = (
                    from_array_record(message.content.array_records[SOURCE_HEAD])
                    if SOURCE_HEAD in message.content.array_records
                    else None
                )
                reply = train_round(
                    settings,
                    instructions,
                    encoder,
                    source_head,
                    run_id,
                    secure_round=current_secure_round(),
                )
            else:
                reply = evaluate_round(settings, instructions, encoder, run_id)
        except Exception as exc:  # the bank keeps running; the server sees a declined round
            name = settings.name if settings else "bank"
            if isinstance(exc, FedfinError):
                log.warning("%s declined %s: %s", name, message.metadata.message_type, exc)
            else:
                log.exception("%s failed on %s", name, message.metadata.message_type)
            status = declined_status(message, settings, declined_reason(exc))
            return Message(RecordDict({STATUS: ConfigRecord(status)}), reply_to=message)
        content = RecordDict(
            {
                METRICS: MetricRecord(dict[str, MetricValue](reply.metrics)),
                STATUS: ConfigRecord(
                    {
                        STATUS_KEY: STATUS_OK,
                        BANK_KEY: settings.name,
                        LEDGER_SEQ: reply.ledger_seq,
                        LEDGER_HEAD: reply.ledger_head,
                    }
                ),
            }
        )
        if reply.arrays:
            content[ARRAYS] = to_array_record(reply.arrays)
        return Message(content, reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle(message, context, train=True)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle(message, context, train=False)

    return app


app = build_client_app()
