"""Run `fedfin simulate` with a client mod that records every reply a bank sends.

Usage: python -m tests.harness.recorded_simulation OUT_DIR RECORD_DIR BANKS ROUNDS EPSILON MODE
The recorder is defined here, in __main__, so Ray ships it to its workers by value.
"""

import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable


@dataclass(frozen=True)
class ReplyRecorder:
    """Writes each outgoing reply's records (and its arrays) to `directory`."""

    directory: str

    def __call__(self, message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        name = uuid.uuid4().hex
        content = reply.content
        arrays = {
            f"{record}/{key}": array.numpy()
            for record, array_record in content.array_records.items()
            for key, array in array_record.items()
        }
        summary = {
            "type": message.metadata.message_type,
            "round": int(message.content.config_records["config"]["server-round"]),
            "partition": int(context.node_config["partition-id"]),
            "records": sorted(content.keys()),
            "array_records": {k: list(v.keys()) for k, v in content.array_records.items()},
            "metric_records": {k: dict(v) for k, v in content.metric_records.items()},
            "config_records": {k: dict(v) for k, v in content.config_records.items()},
        }
        np.savez(Path(self.directory) / f"{name}.npz", **arrays)
        (Path(self.directory) / f"{name}.json").write_text(json.dumps(summary))
        return reply


def main() -> None:
    from fedfin.common.config import FederationConfig, PrivacyPolicy, SplitConfig, TrainPlanConfig
    from fedfin.common.sources import load_source
    from fedfin.simulations.simulate import SimulationRequest, simulate

    out, record, banks, rounds, epsilon, mode = sys.argv[1:7]
    Path(record).mkdir(parents=True, exist_ok=True)
    request = SimulationRequest(
        source=load_source("lending-club"),
        split=SplitConfig(num_banks=int(banks), seed=0),
        federation=FederationConfig(
            num_rounds=int(rounds),
            min_banks=2,
            train=TrainPlanConfig(mode=mode),  # type: ignore[arg-type]
        ),
        policy=PrivacyPolicy(epsilon_budget=float(epsilon)),
        out_dir=Path(out),
        client_mods=(ReplyRecorder(record),),
    )
    simulate(request)


if __name__ == "__main__":
    main()
