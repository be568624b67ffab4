"""The ClientApp that runs inside each bank.

It reads the bank's private settings from the SuperNode's node config, hands each message
to `bank_worker`, and replies with the encoder arrays and the numbers the bank's policy
allows, or with a declined status. The private head, raw rows and per-example values are
never put in a reply; the reply is recorded in the ledger before it is returned.
"""

import logging
from collections.abc import Callable, Sequence

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import ConfigRecordValues as ConfigValue
from flwr.app import MetricRecordValues as MetricValue
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.bank_settings import BankSettings, settings_from_node_config
from client.bank_worker import BankReply, evaluate_round, train_round
from client.release_guard import release_guard
from common.errors import FedfinError, PrivacyBudgetError
from common.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    SOURCE_HEAD,
    STATUS,
    STATUS_DECLINED,
    STATUS_OK,
    RoundInstructions,
)
from common.shared_weights import from_array_record, to_array_record

log = logging.getLogger("fedfin.bank")
SettingsResolver = Callable[[Context], BankSettings]


def settings_from_context(context: Context) -> BankSettings:
    return settings_from_node_config(dict(context.node_config))


def declined_reason(exc: Exception) -> str:
    """What the server may learn about a failure: its kind, and budget figures (already public).

    Data errors can quote a bank's own values, so their text stays in the bank's log.
    """
    if isinstance(exc, PrivacyBudgetError):
        return f"privacy budget: {exc}"
    kind = type(exc).__name__ if isinstance(exc, FedfinError) else "internal error"
    return f"{kind} (details in the bank's log)"


def build_client_app(
    resolve_settings: SettingsResolver = settings_from_context,
    torch_threads: int | None = None,
    mods: Sequence[Mod] = (),
) -> ClientApp:
    """A ClientApp whose bank settings come from `resolve_settings` (node config by default).

    `release_guard` always wraps the handlers, innermost, so that extra `mods` (e.g. for
    logging or measuring) see exactly what leaves the bank.
    """
    app = ClientApp(mods=[*mods, release_guard])

    def handle(message: Message, context: Context, train: bool) -> Message:
        if torch_threads:
            torch.set_num_threads(torch_threads)
        name = "bank"
        try:
            settings = resolve_settings(context)
            name = settings.name
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
                reply = train_round(settings, instructions, encoder, source_head, run_id)
            else:
                reply = evaluate_round(settings, instructions, encoder, run_id)
        except Exception as exc:  # the bank keeps running; the server sees a declined round
            if isinstance(exc, FedfinError):
                log.warning("%s declined %s: %s", name, message.metadata.message_type, exc)
            else:
                log.exception("%s failed on %s", name, message.metadata.message_type)
            status: dict[str, ConfigValue] = {
                "status": STATUS_DECLINED,
                "bank": name,
                "reason": declined_reason(exc),
            }
            return Message(RecordDict({STATUS: ConfigRecord(status)}), reply_to=message)
        content = RecordDict(
            {
                METRICS: MetricRecord(dict[str, MetricValue](reply.metrics)),
                STATUS: ConfigRecord({"status": STATUS_OK, "bank": name}),
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
