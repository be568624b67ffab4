"""Run a 5-bank simulation in which, in round 2, two banks fail mid-training and one is slow.

Usage: python -m tests.harness.faulty_simulation OUT_DIR ROUND_TIMEOUT
The fault mods are defined here, in __main__, so Ray ships them to its workers by value.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

FAULT_ROUND = 2
FAILING = (1, 3)
SLOW = 4


def _is(message: Message, context: Context, partitions: tuple[int, ...]) -> bool:
    config = message.content.config_records.get("config")
    return (
        message.metadata.message_type == "train"
        and config is not None
        and int(config["server-round"]) == FAULT_ROUND  # type: ignore[call-overload]
        and int(context.node_config["partition-id"]) in partitions  # type: ignore[call-overload]
    )


@dataclass(frozen=True)
class FailMidTraining:
    """Makes the DP training loop raise after a few steps, inside the real handler."""

    def __call__(self, message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if not _is(message, context, FAILING):
            return call_next(message, context)
        import fedfin.client.dp_training as training

        original = training.poisson_batches

        def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
            for step, batch in enumerate(original(*args, **kwargs)):
                if step == 2:
                    raise RuntimeError("injected fault in the middle of DP training")
                yield batch

        training.poisson_batches = failing
        try:
            return call_next(message, context)
        finally:
            training.poisson_batches = original


@dataclass(frozen=True)
class SlowBank:
    delay: float

    def __call__(self, message: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if _is(message, context, (SLOW,)):
            time.sleep(self.delay)
        return call_next(message, context)


def main() -> None:
    from fedfin.common.config import FederationConfig, PrivacyPolicy, SplitConfig
    from fedfin.common.sources import load_source
    from fedfin.simulations.simulate import SimulationRequest, simulate

    out, timeout = Path(sys.argv[1]), float(sys.argv[2])
    request = SimulationRequest(
        source=load_source("lending-club"),
        split=SplitConfig(num_banks=5, seed=0),
        federation=FederationConfig(num_rounds=2, min_banks=2, round_timeout=timeout),
        policy=PrivacyPolicy(epsilon_budget=1.0),
        out_dir=out,
        # Late by 10 s: it misses the round, and the run does not wait long for its worker.
        client_mods=(FailMidTraining(), SlowBank(delay=timeout + 10.0)),
    )
    simulate(request)


if __name__ == "__main__":
    main()
