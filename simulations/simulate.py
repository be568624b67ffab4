"""`fedfin simulate`: pretrain if needed, then run the federation on Flower's simulation engine.

Everything of a run lives in its directory:
    pretrained/             the public encoder (when simulate pretrained it)
    banks/<bank>/data/      each bank's train/test tables (its private data)
    banks/<bank>/state/     each bank's ledger and private head
    global/round-NNN/       the global encoder after each round
    rounds.jsonl            one summary per round, as it happens
    report.json             the final report, for programs
Running again with the same directory continues each bank's privacy ledger.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flwr.clientapp.typing import Mod

from common.atomic import write_json_atomically
from common.checkpoint import load_encoder_checkpoint
from common.config import FederationConfig, PretrainConfig, PrivacyPolicy, SplitConfig
from common.errors import ConfigError, FedfinError
from common.ledger import PrivacyLedger
from common.metrics import credit_metrics
from common.partition import FederatedSplit
from common.sources import DataSource
from common.tensors import predict_proba
from server.pretrain import SOURCE_HEAD_FILE, pretrain
from server.server_app import build_server_app, load_source_head
from simulations.simulated_banks import SimulatedBanks, lay_out_banks

MANIFEST = "run.json"
REPORT = "report.json"
PRETRAINED_DIR = "pretrained"


@dataclass(frozen=True)
class SimulationRequest:
    source: DataSource
    split: SplitConfig
    federation: FederationConfig
    policy: PrivacyPolicy
    out_dir: Path
    encoder_dir: Path | None = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    verbose: bool = False
    client_mods: tuple[Mod, ...] = ()  # extra Flower client mods, e.g. to record replies


def simulate(request: SimulationRequest, echo: Any = print) -> dict[str, Any]:
    """Run a whole simulation and return (and write) its report."""
    out = request.out_dir
    out.mkdir(parents=True, exist_ok=True)
    _check_manifest(out, request)
    split = request.source.split(request.split)
    encoder_dir = request.encoder_dir or out / PRETRAINED_DIR
    if request.encoder_dir is None and not (encoder_dir / "encoder.npz").exists():
        echo(f"pretraining the shared encoder on {len(split.public)} public rows ...")
        pretrain(
            split.public,
            request.source.label,
            request.source.positive_label,
            encoder_dir,
            request.pretrain,
            exclude=request.source.excluded_columns,
            source=request.source.name,
            progress=request.verbose,
        )
    checkpoint = load_encoder_checkpoint(encoder_dir)
    banks = lay_out_banks(split, out, request.policy)
    before = public_model_metrics(encoder_dir, split)
    epsilon_at_start = {b.name: _ledger_epsilon(b.state_dir, request.policy) for b in banks.banks}

    federation = FederationConfig(
        **{
            **asdict(request.federation),
            "train": request.federation.train,
            "encoder_dir": str(encoder_dir),
            "out_dir": str(out),
        }
    )
    echo(
        f"federating {len(banks.banks)} banks for {federation.num_rounds} rounds "
        f"({federation.strategy}, mode {federation.train.mode}, ε budget "
        f"{request.policy.epsilon_budget} per bank) on Flower's simulation engine ..."
    )
    def on_round(summary: dict[str, Any]) -> None:
        echo(_round_line(summary, federation.num_rounds))

    started = time.perf_counter()
    _run_flower_simulation(federation, banks, on_round, request)
    rounds = _rounds_on_disk(out)  # includes rounds done before a crash, when resuming
    if len(rounds) != federation.num_rounds:
        raise FedfinError(
            f"the simulation stopped after {len(rounds)} of {federation.num_rounds} rounds; "
            "run the same command again to resume, or add --verbose to see Flower's log"
        )
    report = _report(request, split, banks, before, epsilon_at_start, rounds, started, checkpoint)
    write_json_atomically(out / REPORT, report)
    return report


def public_model_metrics(encoder_dir: Path, split: FederatedSplit) -> dict[str, dict[str, float]]:
    """Each bank's test metrics under the public model (encoder + source head): the start."""
    checkpoint = load_encoder_checkpoint(encoder_dir)
    model = checkpoint.build_model()
    head = load_source_head(encoder_dir)
    if head is None:
        raise FedfinError(f"{encoder_dir / SOURCE_HEAD_FILE}: source head missing")
    import torch

    model.head.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in head.items()})
    out = {}
    for bank in split.banks:
        test = checkpoint.schema.transform(bank.test, f"{bank.name} test")
        out[bank.name] = credit_metrics(test.label, predict_proba(model, test))  # type: ignore[arg-type]
    return out


def _run_flower_simulation(
    federation: FederationConfig, banks: SimulatedBanks, on_round: Any, request: SimulationRequest
) -> None:
    from flwr.simulation import run_simulation

    from client.client_app import build_client_app

    verbose = request.verbose
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)  # incl. run_simulation's deprecation
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    cpus = os.cpu_count() or 1
    run_simulation(
        server_app=build_server_app(federation, on_round),
        client_app=build_client_app(banks, torch_threads=1, mods=request.client_mods),
        num_supernodes=len(banks.banks),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose},
        },
        verbose_logging=verbose,
    )


def _rounds_on_disk(out: Path) -> list[dict[str, Any]]:
    path = out / "rounds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ledger_epsilon(state_dir: Path, policy: PrivacyPolicy) -> float:
    from common.accounting import epsilon_spent

    return epsilon_spent(PrivacyLedger(state_dir).dp_events(), policy.delta, policy.accountant)


def _round_line(summary: dict[str, Any], total: int) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    declined = summary["banks_declined"]
    return (
        f"round {summary['round']}/{total}: {summary['banks_trained']} banks trained, "
        f"mean AUC {fmt(summary['mean_auc'])}, worst bank {fmt(summary['worst_bank_auc'])}, "
        f"max ε {fmt(summary['max_epsilon'])} ({summary['seconds']:.1f} s)"
        + (f"; declined: {'; '.join(declined)}" if declined else "")
    )


def _report(
    request: SimulationRequest,
    split: FederatedSplit,
    banks: SimulatedBanks,
    before: dict[str, dict[str, float]],
    epsilon_at_start: dict[str, float],
    rounds: list[dict[str, Any]],
    started: float,
    checkpoint: Any,
) -> dict[str, Any]:
    last = rounds[-1]["per_bank"]
    per_bank = {}
    for settings, bank in zip(banks.banks, split.banks, strict=True):
        after = last.get(settings.name, {})
        per_bank[settings.name] = {
            "groups": list(bank.groups),
            "train_rows": len(bank.train),
            "test_rows": len(bank.test),
            "auc_public_model": before[settings.name]["auc"],
            "auc_federated": after.get("auc"),
            "ks_federated": after.get("ks"),
            "epsilon_at_start": epsilon_at_start[settings.name],
            "epsilon_spent": _ledger_epsilon(settings.state_dir, request.policy),
            "epsilon_budget": settings.policy.epsilon_budget,
            "delta": settings.policy.delta,
            "state_dir": str(settings.state_dir),
        }
    return {
        "data": request.source.name,
        "banks": len(banks.banks),
        "public_rows": len(split.public),
        "public_groups": list(split.public_groups),
        "federation": {
            **{k: v for k, v in asdict(request.federation).items() if k != "train"},
            "train": asdict(request.federation.train),
        },
        "policy": asdict(request.policy),
        "split": asdict(request.split),
        "schema_fingerprint": checkpoint.schema.fingerprint,
        "rounds": rounds,
        "per_bank": per_bank,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _check_manifest(out: Path, request: SimulationRequest) -> None:
    """A run directory belongs to one data split: refuse to mix banks from two."""
    manifest = {
        "data": request.source.name,
        "label": request.source.label,
        "partition_by": request.source.partition_by,
        "split": asdict(request.split),
        "rows": len(request.source.frame),
    }
    path = out / MANIFEST
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path}: corrupt run manifest; use a new --out") from None
        if existing != manifest:
            raise ConfigError(
                f"--out {out} holds a run on other data or another split; use a new --out"
            )
        return
    write_json_atomically(path, manifest)
