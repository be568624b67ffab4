"""A 5-bank simulation in which bank-00 sends poisoned encoder updates every round.

Usage: python -m tests.harness.poisoned_simulation OUT_DIR STRATEGY ATTACK [ROUNDS]
ATTACK: none | scale (update x -20) | random (Gaussian weights). The attack mod is
defined here, in __main__, so Ray ships it to its workers by value.
"""

import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

ATTACKER = 0


@dataclass(frozen=True)
class PoisonedUpdates:
    attack: str

    def __call__(self, message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(message, context)
        if (
            self.attack == "none"
            or message.metadata.message_type != "train"
            or int(context.node_config["partition-id"]) != ATTACKER  # type: ignore[call-overload]
            or "arrays" not in reply.content.array_records
        ):
            return reply
        sent = reply.content.array_records["arrays"]
        received = message.content.array_records["arrays"]
        rng = np.random.default_rng(int(message.content.config_records["config"]["server-round"]))  # type: ignore[call-overload]
        poisoned = OrderedDict()
        for key in sent:
            local, start = sent[key].numpy(), received[key].numpy()
            if self.attack == "scale":
                value = start - 20.0 * (local - start)
            else:
                value = rng.normal(0.0, 1.0, size=local.shape)
            poisoned[key] = Array(np.asarray(value, dtype=np.float32))
        reply.content.array_records["arrays"] = ArrayRecord(poisoned)
        return reply


def main() -> None:
    from fedfin.common.config import FederationConfig, PrivacyPolicy, SplitConfig
    from fedfin.common.sources import load_source
    from fedfin.simulations.simulate import SimulationRequest, simulate

    out, strategy, attack = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 3
    request = SimulationRequest(
        source=load_source("lending-club"),
        split=SplitConfig(num_banks=5, seed=0),
        federation=FederationConfig(num_rounds=rounds, min_banks=2, strategy=strategy),  # type: ignore[arg-type]
        policy=PrivacyPolicy(epsilon_budget=3.0),
        out_dir=out,
        client_mods=(PoisonedUpdates(attack),),
    )
    simulate(request)


if __name__ == "__main__":
    main()
