"""Everything a bank keeps between rounds, runs and restarts, in its state directory.

    ledger.jsonl   every release (the accountant's history; see common/ledger.py)
    head.npz       the private head: it never leaves the bank
    head.json      which schema and model shape the head belongs to
    plan.json      the noise multiplier calibrated for the current run
    split.key      the secret key of the keyed train/test split (mode 0600)
    evaluations.jsonl  exact metrics of every encoder evaluated here, and each choice of
                   served model: the bank's own report, never sent (see `append_evaluation`)
    serving.json   which model the bank serves (public or federated), why, its calibration
    reliability.png  the served model's predicted default probability against the observed
                   rate (serving.json and the plot: client/model_choice.py)
`context.state` is lost when a run ends or a SuperNode restarts; this directory is not.
"""

import json
import os
import secrets
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedfin.common.atomic import write_atomically, write_json_atomically
from fedfin.common.errors import CheckpointError, ConfigError
from fedfin.common.ledger import PrivacyLedger
from fedfin.common.model import CreditModel

HEAD_FILE = "head.npz"
HEAD_META_FILE = "head.json"
PLAN_FILE = "plan.json"
LAST_RELEASE_FILE = "last-release.npz"
EVALUATIONS_FILE = "evaluations.jsonl"
SPLIT_KEY_FILE = "split.key"
_SPLIT_KEY_BYTES = 32


@dataclass(frozen=True)
class NoisePlan:
    """The noise calibrated for one run, reused while its inputs are unchanged."""

    run_id: int
    sample_rate: float
    steps_per_round: int
    num_rounds: int
    noise_multiplier: float


class BankState:
    """The bank's state directory: private head, ledger and noise plan."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state-dir {state_dir}: cannot create ({exc.strerror})") from None
        if not os.access(state_dir, os.W_OK):
            raise ConfigError(f"state-dir {state_dir}: not writable")
        self.ledger = PrivacyLedger(state_dir)

    @property
    def head_path(self) -> Path:
        return self.dir / HEAD_FILE

    def has_head(self) -> bool:
        return self.head_path.exists()

    def load_head(self, model: CreditModel, fingerprint: str) -> None:
        """Load the private head into `model`; refuse a head made for another schema."""
        meta_path = self.dir / HEAD_META_FILE
        try:
            meta = json.loads(meta_path.read_text())
            with np.load(self.head_path, allow_pickle=False) as npz:
                state = {key: torch.from_numpy(npz[key].copy()) for key in npz.files}
        except FileNotFoundError as exc:
            raise CheckpointError(f"{exc.filename}: private head file missing") from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise CheckpointError(f"{self.head_path}: corrupt private head ({exc})") from None
        if meta.get("schema_fingerprint") != fingerprint:
            raise CheckpointError(
                f"{self.head_path}: private head belongs to another encoder schema; "
                "move it away to start a new head"
            )
        try:
            model.head.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise CheckpointError(
                f"{self.head_path}: head does not fit the model ({first})"
            ) from None

    def save_head(self, model: CreditModel, fingerprint: str) -> None:
        arrays = {k: v.detach().cpu().numpy() for k, v in model.head.state_dict().items()}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

        write_atomically(self.head_path, write)
        write_json_atomically(self.dir / HEAD_META_FILE, {"schema_fingerprint": fingerprint})

    def split_key(self) -> bytes:
        """The bank's secret train/test split key; made once, on first use, readable only here.

        Losing it reshuffles the split of a single-file `data-path`; keep it with the ledger.
        """
        path = self.dir / SPLIT_KEY_FILE
        if not path.exists():
            key = secrets.token_bytes(_SPLIT_KEY_BYTES)

            def write(tmp: Path) -> None:
                tmp.write_bytes(key)
                tmp.chmod(0o600)

            try:
                write_atomically(path, write)
            except OSError as exc:
                raise ConfigError(f"{path}: cannot write split key ({exc.strerror})") from None
        try:
            key = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read split key ({exc.strerror})") from None
        if len(key) != _SPLIT_KEY_BYTES:
            raise CheckpointError(
                f"{path}: split key is {len(key)} bytes, expected {_SPLIT_KEY_BYTES}; "
                "restore it from backup"
            )
        return key

    def noise_plan(self) -> NoisePlan | None:
        path = self.dir / PLAN_FILE
        try:
            return NoisePlan(**json.loads(path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None  # recalibrate: the plan is a cache, the ledger is the record

    def save_noise_plan(self, plan: NoisePlan) -> None:
        write_json_atomically(self.dir / PLAN_FILE, asdict(plan))

    def save_last_release(
        self,
        federation_id: str,
        server_round: int,
        arrays: dict[str, np.ndarray],
        metrics: dict[str, float | int],
    ) -> None:
        """Keep the last encoder sent, to replay it if a restarted server asks again."""
        payload = {f"array/{k}": v for k, v in arrays.items()}
        payload |= {f"metric/{k}": np.asarray(v) for k, v in metrics.items()}
        payload["federation"] = np.asarray(federation_id)
        payload["round"] = np.asarray(server_round)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **payload)  # type: ignore[arg-type]

        write_atomically(self.dir / LAST_RELEASE_FILE, write)

    def last_release(
        self, federation_id: str, server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float | int]] | None:
        """The saved release of that federation's round, if it is the one on disk."""
        path = self.dir / LAST_RELEASE_FILE
        try:
            with np.load(path, allow_pickle=False) as npz:
                if str(npz["federation"]) != federation_id or int(npz["round"]) != server_round:
                    return None
                arrays = {k[6:]: npz[k] for k in npz.files if k.startswith("array/")}
                metrics = {k[7:]: npz[k].item() for k in npz.files if k.startswith("metric/")}
        except (FileNotFoundError, OSError, ValueError, KeyError, zipfile.BadZipFile):
            return None
        return arrays, metrics

    def append_evaluation(self, record: dict[str, Any]) -> None:
        """Add one exact evaluation to the bank's local report (never part of a reply).

        Fields of a round's evaluation: run_id, federation_id, server_round, encoder_sha256,
        test_rows, metrics. A choice of served model has `kind` "serving-choice" and the
        fields of serving.json (client/model_choice.py).
        """
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        with open(self.dir / EVALUATIONS_FILE, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def evaluations(self) -> list[dict[str, Any]]:
        """The local evaluation report, oldest first; a half-written last line is skipped."""
        path = self.dir / EVALUATIONS_FILE
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records
