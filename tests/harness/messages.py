"""Talk to the real ClientApp in-process, as a (possibly hostile) server would."""

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedfin.client.client_app import build_client_app
from fedfin.common.checkpoint import EncoderCheckpoint
from fedfin.common.config import TrainPlanConfig
from fedfin.common.protocol import RoundInstructions
from fedfin.common.shared_weights import to_array_record

Arrays = OrderedDict[str, np.ndarray]


@contextmanager
def server_identity() -> Iterator[None]:
    """Messages are made by a server task; say which, as Flower's own runtime does."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def bank_context(data_path: Path, state_dir: Path, **policy: object) -> Context:
    node_config = {
        "data-path": str(data_path),
        "state-dir": str(state_dir),
        "epsilon-budget": 1.0,
        "bank-name": "bank-test",
        **policy,
    }
    return Context(
        run_id=7,
        node_id=1,
        node_config=node_config,  # type: ignore[arg-type]
        state=RecordDict(),
        run_config={},
    )


def train_message(
    checkpoint: EncoderCheckpoint,
    arrays: Arrays | ArrayRecord | None = None,
    extra_config: dict[str, object] | None = None,
    message_type: str = "train",
) -> Message:
    config = RoundInstructions(
        1, 1, TrainPlanConfig(), checkpoint.schema, checkpoint.model_config
    ).to_config()
    config.update(extra_config or {})
    arrays = checkpoint.arrays if arrays is None else arrays
    record = arrays if isinstance(arrays, ArrayRecord) else to_array_record(arrays)
    content = RecordDict({"arrays": record, "config": ConfigRecord(config)})  # type: ignore[arg-type]
    return Message(content=content, dst_node_id=1, message_type=message_type)


def send(message: Message, context: Context) -> Message:
    return build_client_app()(message, context)


def status(reply: Message) -> str:
    return str(reply.content.config_records["status"]["status"])
