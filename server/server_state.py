"""What the server needs to resume a federation after a crash: written after every round.

    server-state.json  federation id, last completed round, config fingerprint, bank names
    server-state.npz   the strategy's own state (FedAdam's moments), if it has any
The global encoder of the last completed round is `global/round-NNN/`. The federation id
travels with every round, so a bank asked twice for the same round of the same federation
replays its recorded release instead of spending its budget again.
"""

import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedfin.common.atomic import write_atomically, write_json_atomically
from fedfin.common.errors import CheckpointError, ConfigError

STATE_FILE = "server-state.json"
STRATEGY_FILE = "server-state.npz"
_STRATEGY_ARRAYS = ("m_t", "v_t")  # FedOpt's moments; other strategies keep no state


@dataclass
class ServerState:
    federation_id: str
    config_fingerprint: str
    completed_round: int = 0
    bank_names: dict[str, str] = field(default_factory=dict)  # node id -> bank name


def new_state(config_fingerprint: str) -> ServerState:
    return ServerState(federation_id=uuid.uuid4().hex, config_fingerprint=config_fingerprint)


def load_state(out_dir: Path, config_fingerprint: str, num_rounds: int) -> ServerState | None:
    """An unfinished federation to resume, or None to start a new one.

    A finished federation in the same directory is followed by a new one (a new id);
    an unfinished one made with another config is refused rather than mixed.
    """
    path = out_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        state = ServerState(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: corrupt server state ({exc})") from None
    if state.completed_round >= num_rounds and state.config_fingerprint == config_fingerprint:
        return None
    if state.config_fingerprint != config_fingerprint:
        if state.completed_round == 0 or _finished(state, out_dir):
            return None
        raise ConfigError(
            f"{path}: this out-dir holds a federation with another config; "
            "use a new out-dir, or the same config to resume"
        )
    return state


def save_state(out_dir: Path, state: ServerState, strategy: Any) -> None:
    """Strategy arrays first, then the JSON that names the completed round."""
    arrays = {
        f"{name}/{key}": value
        for name in _STRATEGY_ARRAYS
        for key, value in (getattr(strategy, name, None) or {}).items()
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    write_atomically(out_dir / STRATEGY_FILE, write)
    write_json_atomically(out_dir / STATE_FILE, asdict(state))


def restore_strategy(out_dir: Path, strategy: Any) -> None:
    path = out_dir / STRATEGY_FILE
    if not path.exists():
        return
    with np.load(path, allow_pickle=False) as npz:
        for name in _STRATEGY_ARRAYS:
            values = {k.split("/", 1)[1]: npz[k] for k in npz.files if k.startswith(f"{name}/")}
            if values and hasattr(strategy, name):
                setattr(strategy, name, values)


def _finished(state: ServerState, out_dir: Path) -> bool:
    """Did the saved federation run all its rounds? (Its final checkpoint is written last.)"""
    return (out_dir / "final" / "model.json").exists() and state.completed_round > 0
