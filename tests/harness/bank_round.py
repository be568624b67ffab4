"""One bank training round in its own process, for crash and race tests.

    python -m tests.harness.bank_round SPEC.json

SPEC: data, state, encoder (checkpoint dir), round, rounds, federation, run, policy (dict of
PrivacyPolicy fields), kill_at (optional: a point below; the process SIGKILLs itself there),
start_after (optional: a file to wait for, so two processes start together). Prints the
outcome as one JSON line: {"status": "ok", "epsilon": ...} or {"status": "declined"}.
"""

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fedfin.client.bank_worker as worker
from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_state import BankState
from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.config import PrivacyPolicy, TrainPlanConfig
from fedfin.common.errors import FedfinError
from fedfin.common.protocol import EPSILON, RoundInstructions

KILL_POINTS = (
    "before-charge",
    "after-charge",
    "after-training",
    "after-head",
    "after-release-entry",
)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _wrap(function: Callable[..., Any], before: bool, when: Callable[..., bool]) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before and when(*args, **kwargs):
            _die()
        result = function(*args, **kwargs)
        if not before and when(*args, **kwargs):
            _die()
        return result

    return wrapped


def _kind_is(kind: str) -> Callable[..., bool]:
    return lambda *args, **kwargs: args[4] == kind  # record_release(state, settings, run, rnd, kind


def install_kill_point(point: str) -> None:
    """Make this process die at `point` of `train_round` (see KILL_POINTS)."""
    import fedfin.client.dp_training as training

    if point == "before-charge":
        worker.record_release = _wrap(worker.record_release, True, _kind_is(worker.CHARGE))
    elif point == "after-charge":
        worker.record_release = _wrap(worker.record_release, False, _kind_is(worker.CHARGE))
    elif point == "after-training":
        training.train_with_dp = _wrap(training.train_with_dp, False, lambda *a, **k: True)
    elif point == "after-head":
        BankState.save_head = _wrap(BankState.save_head, False, lambda *a, **k: True)
    elif point == "after-release-entry":
        worker.record_release = _wrap(worker.record_release, False, _kind_is(worker.TRAIN))
    else:
        raise ValueError(point)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("kill_at"):
        install_kill_point(spec["kill_at"])
    checkpoint = load_encoder_checkpoint(Path(spec["encoder"]))
    settings = BankSettings(
        "bank-test",
        Path(spec["data"]),
        Path(spec["state"]),
        PrivacyPolicy(**spec.get("policy", {})),
        noise_seed=spec.get("noise_seed"),
    )
    instructions = RoundInstructions(
        spec["round"],
        spec["rounds"],
        TrainPlanConfig(),
        checkpoint.schema,
        checkpoint.model_config,
        federation_id=spec.get("federation", ""),
    )
    if spec.get("start_after"):
        while not Path(spec["start_after"]).exists():
            time.sleep(0.01)
    try:
        reply = worker.train_round(settings, instructions, checkpoint.arrays, None, spec["run"])
    except FedfinError as exc:
        print(json.dumps({"status": "declined", "error": str(exc)}), flush=True)
        return
    print(json.dumps({"status": "ok", "epsilon": reply.metrics[EPSILON]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
