"""`fedfin simulate`: pretrain if needed, then run the federation on Flower's simulation engine.

Everything of a run lives in its directory:
    pretrained/             the public encoder (when simulate pretrained it)
    banks/<bank>/data/      each bank's train/test tables (its private data)
    banks/<bank>/state/     each bank's ledger and private head
    banks/<bank>/state/evaluations.jsonl  each bank's own exact evaluations (never sent)
    banks/<bank>/state/serving.json       each bank's choice of served model, its calibration
    banks/<bank>/state/reliability.png    and the served model's reliability on test rows
    global/round-NNN/       the global encoder after each round
    rounds.jsonl            the server's summary per round, as it happens
    ledger-anchors.jsonl    the server's record of every reply's ledger head (for the audit)
    report.json             the final report, for programs
Running again with the same directory continues each bank's privacy ledger.

Banks do not send exact evaluation metrics: each keeps them in its own local report. The
AUC a simulation prints per round and in its final table is read from those reports. That
is legitimate only because a simulation plays every bank: each figure is a bank reading its
own report, nothing crosses the federation, and the server's record (rounds.jsonl) holds no
exact metric. In a deployment each bank reads its own report the same way.

After the last round each bank chooses the model it serves (public or federated, on its own
validation rows) and calibrates it (client/model_choice.py); the simulation plays each bank
for that too, and the final table reads the banks' `serving.json`.
"""

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from flwr.clientapp.typing import Mod

from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_state import BankState
from fedfin.client.data_check import check_frame
from fedfin.client.model_choice import choose_served_model
from fedfin.common.atomic import write_json_atomically
from fedfin.common.checkpoint import load_encoder_checkpoint, load_source_head
from fedfin.common.config import FederationConfig, PretrainConfig, PrivacyPolicy, SplitConfig
from fedfin.common.errors import CheckpointError, ConfigError, FedfinError, PrivacyBudgetError
from fedfin.common.ledger import PrivacyLedger
from fedfin.common.metrics import credit_metrics
from fedfin.common.partition import FederatedSplit
from fedfin.common.profile import DataProfile, load_public_profile
from fedfin.common.schema import FeatureSchema
from fedfin.common.sources import DataSource
from fedfin.common.tensors import predict_proba
from fedfin.server.federation import FINAL_DIR
from fedfin.server.pretrain import SOURCE_HEAD_FILE, fit_public_schema, pretrain, public_profile
from fedfin.server.server_app import build_server_app
from fedfin.simulations.simulated_banks import BANKS_DIR, SimulatedBanks, lay_out_banks

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
    """Run a whole simulation and return (and write) its report.

    Everything that can be checked is checked before anything is written: the run
    directory's manifest, the split, the schema (fitted, or the given encoder's) against
    every bank's data. A refused run leaves the run directory as it was, so the same
    command with corrected flags then works. Pretraining writes `pretrained/` whole or not
    at all.
    """
    out = request.out_dir
    _refuse_outputs_over_inputs(request)
    split = request.source.split(request.split)
    echo(split.summary())
    manifest = _manifest(request, split)
    existing = _existing_manifest(out)
    if existing is not None:
        _refuse_other_run(out, existing, manifest)
    encoder_dir = request.encoder_dir or out / PRETRAINED_DIR
    must_pretrain = request.encoder_dir is None and not (encoder_dir / "encoder.npz").exists()
    public_source = split.public_source(request.source.name)
    if must_pretrain:
        schema = fit_public_schema(
            split.public,
            request.source.label,
            request.source.positive_label,
            request.pretrain,
            request.source.excluded_columns,
            public_source,
        )
    else:
        schema = load_encoder_checkpoint(encoder_dir).schema
    for note in schema.identifier_notes():
        echo(note)
    _validate_banks(split, schema)
    _log_data_checks(split, schema, request, encoder_dir, must_pretrain, public_source, echo)
    _refuse_spent_budgets(out, split, request.policy)
    if must_pretrain:
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
    if existing is None:
        write_json_atomically(out / MANIFEST, manifest)
    banks = lay_out_banks(split, out, request.policy)
    before = public_model_metrics(encoder_dir, split)
    epsilon_at_start = {b.name: _ledger_epsilon(b.state_dir, request.policy) for b in banks.banks}
    state_dirs = {b.name: b.state_dir for b in banks.banks}

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
        echo(_round_line(with_local_metrics(summary, state_dirs), federation.num_rounds))

    started = time.perf_counter()
    _run_flower_simulation(federation, banks, on_round, request)
    # Includes rounds done before a crash, when resuming; AUC from the banks' own reports.
    rounds = [with_local_metrics(r, state_dirs) for r in _rounds_on_disk(out)]
    _refuse_a_run_where_every_bank_declined(rounds, federation.num_rounds)
    if len(rounds) != federation.num_rounds:
        raise FedfinError(
            f"the simulation stopped after {len(rounds)} of {federation.num_rounds} rounds; "
            "run the same command again to resume, or add --verbose to see Flower's log"
        )
    echo("each bank chooses its served model on its validation rows and calibrates it ...")
    choices = {b.name: _bank_choice(b, encoder_dir, out / FINAL_DIR) for b in banks.banks}
    report = _report(
        request, split, banks, before, epsilon_at_start, rounds, started, checkpoint, choices
    )
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


def _bank_choice(
    settings: BankSettings, public_dir: Path, federated_dir: Path
) -> dict[str, Any] | None:
    """The bank's own choice of served model (played here, as the bank would run it)."""
    try:
        return choose_served_model(settings, public_dir, federated_dir)
    except FedfinError as exc:  # e.g. a bank that never trained has no head to compare
        logging.getLogger("fedfin").warning("%s: no serving choice (%s)", settings.name, exc)
        return None


def _run_flower_simulation(
    federation: FederationConfig, banks: SimulatedBanks, on_round: Any, request: SimulationRequest
) -> None:
    from flwr.simulation import run_simulation

    from fedfin.client.client_app import build_client_app

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
    from fedfin.common.accounting import epsilon_spent

    return epsilon_spent(PrivacyLedger(state_dir).dp_events(), policy.delta, policy.accountant)


def local_evaluation(
    state_dir: Path, federation_id: str | None, server_round: int
) -> dict[str, Any] | None:
    """A bank's own exact evaluation of one round's global encoder, from its local report.

    The simulation plays the bank here, reading the bank's report in the bank's state dir;
    no figure came through the federation. A round evaluated twice (a resumed server asked
    again) counts by its last evaluation. Without a federation id (a summary written before
    rounds carried one), the last evaluation of that round number is taken.
    """
    matches = [
        record
        for record in BankState(state_dir).evaluations()
        if record.get("server_round") == server_round
        and (federation_id is None or record.get("federation_id") == federation_id)
    ]
    return matches[-1] if matches else None


def with_local_metrics(summary: dict[str, Any], state_dirs: dict[str, Path]) -> dict[str, Any]:
    """The server's round summary plus each bank's exact AUC and KS from its own report.

    Adds per bank `auc`, `ks` (and `test_rows`), and across banks `mean_auc`,
    `weighted_mean_auc` (by test rows) and `worst_bank_auc`: all of the encoder aggregated
    in this round. `metrics_source` says where they come from, for whoever reads report.json.
    """
    per_bank = {name: dict(row) for name, row in summary.get("per_bank", {}).items()}
    aucs: list[tuple[float, int]] = []
    for name, state_dir in state_dirs.items():
        record = local_evaluation(state_dir, summary.get("federation_id"), int(summary["round"]))
        metrics = record.get("metrics", {}) if record else {}
        auc = metrics.get("auc")
        if record is None or auc is None:
            continue
        row = per_bank.setdefault(name, {})
        row |= {"auc": auc, "ks": metrics.get("ks"), "test_rows": record.get("test_rows")}
        aucs.append((float(auc), int(record.get("test_rows") or 0)))
    rows = sum(n for _, n in aucs)
    return {
        **summary,
        "per_bank": per_bank,
        "metrics_source": "each bank's own local report (banks/<bank>/state/evaluations.jsonl)",
        "mean_auc": sum(a for a, _ in aucs) / len(aucs) if aucs else None,
        "weighted_mean_auc": sum(a * n for a, n in aucs) / rows if rows else None,
        "worst_bank_auc": min((a for a, _ in aucs), default=None),
    }


def _round_line(summary: dict[str, Any], total: int) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    declined = summary["banks_declined"]
    dp_auc = summary.get("dp_mean_auc")
    dp = (
        f", DP mean AUC of round {summary['dp_auc_of_round']}'s encoder {fmt(dp_auc)}"
        if dp_auc is not None
        else ""
    )
    return (
        f"round {summary['round']}/{total}: {summary['banks_trained']} banks trained, "
        f"mean AUC {fmt(summary['mean_auc'])}, worst bank {fmt(summary['worst_bank_auc'])} "
        f"(banks' own reports){dp}, max ε {fmt(summary['max_epsilon'])} "
        f"({summary['seconds']:.1f} s)" + (f"; declined: {'; '.join(declined)}" if declined else "")
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
    choices: dict[str, dict[str, Any] | None],
) -> dict[str, Any]:
    last = rounds[-1]["per_bank"]  # the last round's evaluation is of the final encoder
    per_bank = {}
    for settings, bank in zip(banks.banks, split.banks, strict=True):
        after = last.get(settings.name, {})
        public = before[settings.name]
        choice = choices.get(settings.name)
        per_bank[settings.name] = {
            "groups": list(bank.groups),
            "train_rows": len(bank.train),
            "test_rows": len(bank.test),
            "test_defaults": int(public["defaults"]),
            "auc_public_model": public["auc"],
            "auc_public_model_ci": [public["auc-ci-low"], public["auc-ci-high"]],
            "auc_federated": after.get("auc"),
            "ks_federated": after.get("ks"),
            **(_choice_columns(choice) if choice else {}),
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


def _choice_columns(choice: dict[str, Any]) -> dict[str, Any]:
    """The bank's serving choice, as report.json's per-bank fields (from its serving.json)."""
    test, validation = choice["test"], choice["validation"]

    def ci(metrics: dict[str, Any]) -> list[float | None]:
        return [metrics.get("auc-ci-low"), metrics.get("auc-ci-high")]

    return {
        "dp_train_rows": choice["train_rows"],
        "validation_rows": validation["rows"],
        "validation_defaults": validation["defaults"],
        "auc_federated": test["federated"]["auc"],
        "auc_federated_ci": ci(test["federated"]),
        "served": choice["served"],
        "served_reason": choice["reason"],
        "validation_auc_public_model": validation["public"]["auc"],
        "validation_auc_federated": validation["federated"]["auc"],
        "auc_served": test["served"]["auc"],
        "auc_served_ci": ci(test["served"]),
        "mean_pd_served": test["served"]["mean-pd"],
        "mean_pd_served_uncalibrated": test[choice["served"]]["mean-pd"],
        "default_rate_test": test["served"]["default-rate"],
        "calibration": choice["calibration"],
        "serving_source": "the bank's own serving.json (banks/<bank>/state/serving.json)",
    }


def _manifest(request: SimulationRequest, split: FederatedSplit) -> dict[str, Any]:
    """What a run directory belongs to: the data (by resolved path and content), the split
    and which groups and rows went where."""
    return {
        **request.source.identity(),
        "label": request.source.label,
        "partition_by": request.source.partition_by,
        "split": asdict(request.split),
        "placement": split.placement(),
    }


def _existing_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    try:
        existing = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"{path}: corrupt run manifest; use a new --out") from None
    if not isinstance(existing, dict):
        raise ConfigError(f"{path}: corrupt run manifest; use a new --out")
    return existing


def _refuse_other_run(out: Path, existing: dict[str, Any], manifest: dict[str, Any]) -> None:
    """A run directory belongs to one data split: refuse to mix banks from two.

    The data is the same when its content hash is (whatever path names it); a manifest
    written before hashes were recorded is compared by resolved path or name.
    """
    if "data_sha256" in existing and "data_sha256" in manifest:
        same_data = existing["data_sha256"] == manifest["data_sha256"]
    else:
        same_data = _same_path(str(existing.get("data")), str(manifest["data"]))
    skip = {"data", "data_sha256"}
    differs = [
        k for k in manifest if k in existing and k not in skip and existing[k] != manifest[k]
    ]
    if not same_data:
        differs.insert(0, "data")
    if differs:
        raise ConfigError(
            f"--out {out} holds a run on other data or another split ({differs[0]} differs: "
            f"{_short(existing.get(differs[0]))} there, {_short(manifest.get(differs[0]))} now); "
            "use a new --out, or the flags of that run to continue it"
        )


def _same_path(first: str, second: str) -> bool:
    return first == second or Path(first).resolve() == Path(second).resolve()


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _refuse_outputs_over_inputs(request: SimulationRequest) -> None:
    out = request.out_dir.resolve()
    if request.out_dir.exists() and not request.out_dir.is_dir():
        raise ConfigError(f"--out {request.out_dir}: exists and is not a directory")
    data = request.source.path
    if data is not None and (out == data or out in data.parents):
        raise ConfigError(
            f"--out {request.out_dir}: holds the --data file {data}; use a run directory of its own"
        )
    if request.encoder_dir is not None and request.encoder_dir.resolve() == out:
        raise ConfigError(
            f"--out {request.out_dir}: is the --encoder directory; use a run directory of its own"
        )


def _validate_banks(split: FederatedSplit, schema: FeatureSchema) -> None:
    """Every bank's tables against the schema, before anything is written: in a simulation
    the simulator plays every bank, so a bad bank is the user's data error, said at once."""
    for bank in split.banks:
        held = f" ({split.partition_by} = {', '.join(bank.groups)})" if bank.groups else ""
        for part, frame in (("train", bank.train), ("test", bank.test)):
            schema.validate(frame, f"{bank.name} {part}{held}")


def _log_data_checks(
    split: FederatedSplit,
    schema: FeatureSchema,
    request: SimulationRequest,
    encoder_dir: Path,
    must_pretrain: bool,
    public_source: str,
    echo: Any,
) -> None:
    """Each bank's `fedfin check-data` line before round 1, against the public profile that
    pretraining will save (or the one beside --encoder)."""
    if must_pretrain:
        profile = public_profile(split.public, schema, request.pretrain, public_source)
    else:
        try:
            profile = load_public_profile(encoder_dir, schema)
        except CheckpointError as exc:
            echo(f"data check skipped: {exc}")
            return
    for line in bank_check_lines(split, schema, profile):
        echo(line)


def bank_check_lines(
    split: FederatedSplit, schema: FeatureSchema, profile: DataProfile
) -> list[str]:
    """One data-check line per bank (its train and test rows together). The simulator plays
    every bank; each bank's check is its own, printed and never sent."""
    lines = []
    for bank in split.banks:
        frame = pd.concat([bank.train, bank.test], ignore_index=True)
        check = check_frame(frame, schema, profile, bank.name, label=schema.label)
        lines.append(f"{bank.name}: {check.summary_line()}")
    return lines


def _refuse_spent_budgets(out: Path, split: FederatedSplit, policy: PrivacyPolicy) -> None:
    """A run whose every bank has already spent its budget can only decline: say so."""
    states = [out / BANKS_DIR / bank.name / "state" for bank in split.banks]
    if not states or not all((s / "ledger.jsonl").exists() for s in states):
        return
    spent = [_ledger_epsilon(s, policy) for s in states]
    if all(e >= policy.epsilon_budget for e in spent):
        raise PrivacyBudgetError(
            f"--out {out}: every bank has already spent its ε budget "
            f"(ε = {min(spent):.3f} to {max(spent):.3f} of {policy.epsilon_budget}); nothing "
            "more can be trained: use a new --out (new banks) or read the results there"
        )


def _refuse_a_run_where_every_bank_declined(rounds: list[dict[str, Any]], total: int) -> None:
    """A round where every bank declined ends the federation (server/federation.py): that is
    an error of the run, exit 4 when the banks' budgets are spent, not a result."""
    if not rounds or rounds[-1].get("banks_trained"):
        return
    last = rounds[-1]
    reasons = sorted({str(d).split(": ", 1)[-1] for d in last["banks_declined"]})
    budget = bool(reasons) and all("budget" in reason for reason in reasons)
    error = PrivacyBudgetError if budget else FedfinError
    raise error(
        f"every bank declined round {last['round']} of {total}, so the federation stopped: "
        + ("; ".join(reasons)[:300] or "no bank replied")
        + ("" if budget else "; add --verbose to see the banks' log")
    )
