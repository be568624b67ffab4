"""A Flower `Grid` whose banks are real ClientApps in this process, behind the wire format.

Every message and reply goes through Flower's protobuf serialisation (so nothing is shared
by reference between server and bank), and the grid keeps every reply the server received
and the bytes each way. `drop(node_id, stage)` makes a bank vanish at a stage: its message
is never delivered and no reply comes (as after a round timeout).
"""

import time
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from fedfin.common.secure_aggregation import SECAGG, STAGE

PLAIN = "plain"
Dropper = Callable[[int, str], bool]


def stage_of(message: Message) -> str:
    """The SecAgg+ stage a server message asks for, or "plain"."""
    records = message.content.config_records
    return str(records[SECAGG].get(STAGE)) if SECAGG in records else PLAIN


def bank_contexts(banks: list[tuple[Path, Path]], **policy: object) -> dict[int, Context]:
    """One Context per bank (data dir, state dir), node ids 101, 102, ...; state persists."""
    return {
        101 + i: Context(
            run_id=7,
            node_id=101 + i,
            node_config={  # type: ignore[arg-type]
                "data-path": str(data),
                "state-dir": str(state),
                "bank-name": f"bank-{i}",
                "epsilon-budget": 2.0,
                **policy,
            },
            state=RecordDict(),
            run_config={},
        )
        for i, (data, state) in enumerate(banks)
    }


class InProcessGrid(Grid):
    """Deliver each message to its bank's ClientApp and hand back the serialised reply."""

    def __init__(
        self, contexts: dict[int, Context], app: ClientApp, drop: Dropper | None = None
    ) -> None:
        self.contexts = contexts
        self.app = app
        self.drop = drop or (lambda node, stage: False)
        self.received: list[tuple[str, Message]] = []  # (stage, reply) as the server got it
        self.bytes_to_banks = 0
        self.bytes_from_banks = 0
        self.bank_seconds = 0.0  # time spent inside the banks' ClientApps
        self.bank_seconds_by_stage: dict[str, float] = {}
        self._run = Run.create_empty(7)

    def set_run(self, run_id: int) -> None:
        self._run = Run.create_empty(run_id)

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers through send_and_receive only")

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = []
        for message in messages:
            node, stage = message.metadata.dst_node_id, stage_of(message)
            if self.drop(node, stage):
                continue
            wire = message_to_proto(message)
            self.bytes_to_banks += wire.ByteSize()
            delivered = message_from_proto(wire)
            started = time.perf_counter()
            answer = self.app(delivered, self.contexts[node])
            spent = time.perf_counter() - started
            self.bank_seconds += spent
            by_stage = self.bank_seconds_by_stage
            by_stage[stage] = by_stage.get(stage, 0.0) + spent
            reply_wire = message_to_proto(answer)
            self.bytes_from_banks += reply_wire.ByteSize()
            reply = message_from_proto(reply_wire)
            self.received.append((stage, message_from_proto(reply_wire)))  # a kept copy
            replies.append(reply)
        return replies
