"""Which model a bank serves: the public one or the federated one, chosen on its own rows.

No bank should end up worse off for joining: at ε = 1 and ~880 loans a bank, DP federation
can fall below the public model (public encoder + the source head shipped with it). So the
bank compares the two on its validation rows (a keyed slice of its training rows, left out
of DP training and disjoint from its test rows: client/bank_data.py), serves the federated
model only if its validation AUC is higher beyond chance (DeLong's paired test, one-sided
95%), and recalibrates the served model's
probabilities (client/calibration.py) on all of its non-test rows: validation and training.

Why the calibration does not use the validation rows alone: a Lending Club bank's ~180
validation rows hold 4 to 12 defaults, so their default rate alone is off the bank's by up
to 50%, and a calibration fitted on them inherited that (mean predicted PD 41% below the
observed rate on one bank's test rows, 30% above on another). Adding the ~700 training rows
brought every bank within 8%. The public model never saw those rows; the federated model saw
them only through DP-SGD, which bounds how much any one row moves its own score. The choice
itself stays on validation rows only: it compares a model that trained on the training rows
with one that did not, and only rows neither trained on compare them fairly. The test rows
are used for neither, only to report.

All of it happens inside the bank and is written to its state directory only:
    serving.json        the choice, both models' validation and test metrics, the calibration
    drift-reference.json  the served model's scores and the features of the bank's non-test
                        rows, binned: what `fedfin serve`/`score` watch drift against
    reliability.png     predicted default probability against the observed rate, test rows
    evaluations.jsonl   one "serving-choice" record (the bank's local report)
Nothing here is released, so nothing is charged; if any of it (a metric, the calibration)
were ever sent, it would need a DP mechanism and a charge in the ledger.

`served_model` rebuilds what `serving.json` names for `fedfin score` and `fedfin serve`.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfin.client.bank_data import load_bank_splits
from fedfin.client.bank_settings import BankSettings
from fedfin.client.bank_state import BankState
from fedfin.client.bank_worker import encoder_sha256
from fedfin.client.calibration import PlattCalibration, fit_platt, fold_calibration
from fedfin.common.atomic import write_atomically, write_json_atomically
from fedfin.common.checkpoint import (
    SOURCE_HEAD_FILE,
    EncoderCheckpoint,
    load_encoder_checkpoint,
    load_source_head,
)
from fedfin.common.errors import CheckpointError, ConfigError
from fedfin.common.metrics import (
    ReliabilityBin,
    credit_metrics,
    paired_auc_difference,
    reliability_table,
)
from fedfin.common.model import CreditModel
from fedfin.common.schema import EncodedTable
from fedfin.common.tensors import predict_logits

SERVING_FILE = "serving.json"
RELIABILITY_PLOT = "reliability.png"
PUBLIC = "public"
FEDERATED = "federated"
SERVING_CHOICE = "serving-choice"  # the kind of its record in evaluations.jsonl
_VERSION = 1
_ONE_SIDED_95 = 1.6449  # z of a one-sided 95% test


@dataclass(frozen=True)
class ServedModel:
    """The model a bank serves (calibration already folded in) and its model card."""

    checkpoint: EncoderCheckpoint
    model: CreditModel
    card: dict[str, Any]


def public_model(public_dir: Path) -> tuple[EncoderCheckpoint, CreditModel]:
    """The public model: the pretrained encoder and the source head shipped with it."""
    checkpoint = load_encoder_checkpoint(public_dir)
    head = load_source_head(public_dir)
    if head is None:
        raise CheckpointError(f"{public_dir}: no source_head.npz; not a pretrained checkpoint")
    model = checkpoint.build_model()
    _load_head_arrays(model, head, public_dir)
    return checkpoint, model


def federated_model(state: BankState, encoder_dir: Path) -> tuple[EncoderCheckpoint, CreditModel]:
    """The federated model: a global encoder and this bank's private head."""
    checkpoint = load_encoder_checkpoint(encoder_dir)
    model = checkpoint.build_model()
    state.load_head(model, checkpoint.schema.fingerprint)
    return checkpoint, model


def choose_served_model(
    settings: BankSettings, public_dir: Path, federated_dir: Path
) -> dict[str, Any]:
    """Choose, calibrate, and record in the bank's state directory; returns `serving.json`.

    The federated model is served only if its validation AUC is higher beyond chance; a tie,
    a small difference, or a slice with too few of a class keeps the public model.
    """
    state = BankState(settings.state_dir)
    public_checkpoint, public = public_model(public_dir)
    federated_checkpoint, federated = federated_model(state, federated_dir)
    schema = federated_checkpoint.schema
    if public_checkpoint.schema.fingerprint != schema.fingerprint:
        raise CheckpointError(
            f"{federated_dir}: its schema is not the public checkpoint's ({public_dir})"
        )
    if settings.validation_fraction <= 0:
        raise ConfigError("validation-fraction is 0: no rows to choose the served model on")
    splits = load_bank_splits(
        settings.data_path,
        schema,
        settings.test_fraction,
        state.split_key(),
        settings.validation_fraction,
    )
    train, validation, test = splits.train, splits.validation, splits.test
    assert train.label is not None and validation.label is not None and test.label is not None
    logits = {
        name: (predict_logits(model, validation), predict_logits(model, test))
        for name, model in ((PUBLIC, public), (FEDERATED, federated))
    }
    on_validation = {
        name: credit_metrics(validation.label, _sigmoid(v)) for name, (v, _) in logits.items()
    }
    served_model_of = {PUBLIC: public, FEDERATED: federated}
    served, reason = _choice(
        validation.label, _sigmoid(logits[PUBLIC][0]), _sigmoid(logits[FEDERATED][0])
    )
    calibration = fit_platt(
        np.concatenate([logits[served][0], predict_logits(served_model_of[served], train)]),
        np.concatenate([validation.label, train.label]),
    )
    served_test = calibration.probabilities(logits[served][1])
    reliability = reliability_table(test.label, served_test)
    record = {
        "version": _VERSION,
        "bank": settings.name,
        "served": served,
        "reason": reason,
        "public_encoder": _encoder_entry(public_dir, public_checkpoint),
        "federated_encoder": _encoder_entry(federated_dir, federated_checkpoint),
        "head_sha256": _file_sha256(state.head_path),
        "schema_fingerprint": schema.fingerprint,
        "calibration": {**calibration.to_dict(), "fitted_on": "validation and training rows"},
        "validation": {
            **_slice_counts(validation),
            PUBLIC: _finite(on_validation[PUBLIC]),
            FEDERATED: _finite(on_validation[FEDERATED]),
        },
        "test": {
            **_slice_counts(test),
            PUBLIC: _finite(credit_metrics(test.label, _sigmoid(logits[PUBLIC][1]))),
            FEDERATED: _finite(credit_metrics(test.label, _sigmoid(logits[FEDERATED][1]))),
            "served": _finite(credit_metrics(test.label, served_test)),
        },
        "train_rows": len(splits.train.numeric),
        "reliability_test": [_finite(vars(b)) for b in reliability],
    }
    write_json_atomically(state.dir / SERVING_FILE, record)
    write_reliability_plot(state.dir / RELIABILITY_PLOT, reliability, settings.name, served)
    state.append_evaluation({"kind": SERVING_CHOICE, **_without(record, "reliability_test")})
    from fedfin.client.drift import write_drift_reference  # it loads the model served now

    write_drift_reference(
        settings.state_dir, federated_dir, settings.data_path, settings.test_fraction
    )
    return record


def _choice(
    labels: np.ndarray, public_scores: np.ndarray, federated_scores: np.ndarray
) -> tuple[str, str]:
    """Public unless the federated model is better on validation beyond chance.

    The public model is the safe default (it used none of the bank's rows); switching on a
    higher validation AUC alone is a coin toss when the slice holds ~10 defaults, and left
    3 of 5 quickstart banks below the public model on test. So the federated model is
    served only when DeLong's paired one-sided test says its AUC is higher at 95%.
    """
    difference, error = paired_auc_difference(labels, public_scores, federated_scores)
    if not (np.isfinite(difference) and np.isfinite(error)):
        return PUBLIC, "the validation slice holds too few of one class: keep the public model"
    if difference > 0 and (error == 0.0 or difference / error > _ONE_SIDED_95):
        return FEDERATED, (
            f"validation AUC higher by {difference:.4f} (z = "
            f"{difference / error if error else float('inf'):.2f}, DeLong, one-sided 95%)"
        )
    return PUBLIC, (
        f"the federated model is not better beyond chance on validation "
        f"(AUC difference {difference:+.4f}, standard error {error:.4f})"
    )


def serving_record(state_dir: Path) -> dict[str, Any] | None:
    """The bank's recorded choice (`serving.json`), or None if it has not chosen yet."""
    path = state_dir / SERVING_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable serving choice ({exc})") from None
    if not isinstance(record, dict) or record.get("version") != _VERSION:
        raise CheckpointError(f"{path}: not a fedfin serving choice (version {_VERSION})")
    return record


def served_model(state_dir: Path, encoder_dir: Path) -> ServedModel:
    """What the bank serves with the global encoder `encoder_dir`.

    If the bank chose for exactly this encoder and its current private head, that choice
    (public or federated, calibrated); otherwise the encoder with the private head,
    uncalibrated, and a card that says so.
    """
    if not state_dir.is_dir():
        raise CheckpointError(f"{state_dir}: bank state directory not found")
    state = BankState(state_dir)
    checkpoint, federated = federated_model(state, encoder_dir)
    record = serving_record(state_dir)
    encoder_sha = encoder_sha256(checkpoint.arrays)
    head_sha = _file_sha256(state.head_path)
    if record is None or not _chosen_for(record, encoder_sha, head_sha):
        note = (
            "no serving choice yet"
            if record is None
            else "the serving choice was made for another encoder or head"
        )
        card = {
            "served": FEDERATED,
            "validated": False,
            "note": f"{note}: serving this encoder with the private head, uncalibrated "
            "(run `fedfin choose-model`)",
            "encoder": str(encoder_dir),
            "model_version": model_version(FEDERATED, encoder_sha, head_sha, None),
        }
        return ServedModel(checkpoint, federated, card)
    calibration = PlattCalibration.from_dict(record["calibration"])
    if record["served"] == PUBLIC:
        entry = record["public_encoder"]
        checkpoint, model = public_model(Path(entry["path"]))
        encoder_sha = encoder_sha256(checkpoint.arrays)
        if encoder_sha != entry["sha256"]:
            raise CheckpointError(
                f"{entry['path']}: the public encoder changed since the bank chose it; "
                "run `fedfin choose-model` again"
            )
        head_sha = _file_sha256(Path(entry["path"]) / SOURCE_HEAD_FILE)
    else:
        model = federated
    fold_calibration(model, calibration)
    card = {
        "served": record["served"],
        "validated": True,
        "reason": record["reason"],
        "encoder": record[f"{record['served']}_encoder"]["path"],
        "calibration": record["calibration"],
        "validation": record["validation"],
        "test": record["test"],
        "reliability_test": record["reliability_test"],
        "model_version": model_version(
            record["served"], encoder_sha, head_sha, record["calibration"]
        ),
    }
    return ServedModel(checkpoint, model, card)


def model_version(
    served: str, encoder_sha: str, head_sha: str, calibration: dict[str, Any] | None
) -> str:
    """Which model answered, in one string for every response and log line.

    The served model (public or federated), the SHA-256 of its encoder arrays and of its head
    file, and of its calibration ("uncalibrated" without a choice for this encoder and head).
    """
    if calibration is None:
        calibrated = "uncalibrated"
    else:
        text = json.dumps(calibration, sort_keys=True, separators=(",", ":"))
        calibrated = "calibration-" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{served}/encoder-{encoder_sha[:12]}/head-{head_sha[:12]}/{calibrated}"


def _chosen_for(record: dict[str, Any], encoder_sha: str, head_sha: str) -> bool:
    return bool(
        record.get("federated_encoder", {}).get("sha256") == encoder_sha
        and record.get("head_sha256") == head_sha
    )


# --- for people ---------------------------------------------------------------------------


def model_card_text(card: dict[str, Any]) -> str:
    """The model card `fedfin score` prints: what is served, why, and how well it is calibrated."""
    version = f"\n  model version: {card['model_version']}" if "model_version" in card else ""
    if not card.get("validated"):
        return f"model card: {card['note']}{version}"
    validation, test = card["validation"], card["test"]
    calibration = card["calibration"]
    lines = [
        f"model card: serving the {card['served']} model ({card['encoder']})",
        f"  chosen on {validation['rows']} validation rows ({validation['defaults']} defaults): "
        f"{card['reason']}",
        f"  validation AUC: public {_auc(validation[PUBLIC])}, "
        f"federated {_auc(validation[FEDERATED])}",
        f"  test AUC ({test['rows']} rows, {test['defaults']} defaults): "
        f"public {_auc(test[PUBLIC])}, federated {_auc(test[FEDERATED])}, "
        f"served {_auc(test['served'])}",
        f"  calibration: Platt on {calibration['rows']} non-test rows, logit x "
        f"{calibration['slope']:.3f} "
        f"{calibration['intercept']:+.3f}; on test, mean predicted default probability "
        f"{test['served']['mean-pd']:.4f} against an observed rate of "
        f"{test['served']['default-rate']:.4f}",
        "  reliability on test (equal-count bins of predicted probability):",
        reliability_text(card["reliability_test"], indent="    "),
    ]
    return "\n".join(lines) + version


def reliability_text(bins: list[dict[str, Any]] | list[ReliabilityBin], indent: str = "") -> str:
    """A reliability table: each bin's rows, defaults, mean predicted PD, observed rate."""
    rows = [vars(b) if isinstance(b, ReliabilityBin) else b for b in bins]
    header = ("PD from", "PD to", "rows", "defaults", "mean PD", "observed")
    cells = [
        (
            f"{r['low']:.4f}",
            f"{r['high']:.4f}",
            str(r["rows"]),
            str(r["defaults"]),
            f"{r['mean_pd']:.4f}",
            f"{r['observed_rate']:.4f}",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    lines = [indent + "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += [
        indent + "  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells
    ]
    return "\n".join(lines)


def write_reliability_plot(
    path: Path, bins: list[ReliabilityBin], title: str, served: str = ""
) -> None:
    """Mean predicted default probability against the observed rate per bin, with counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 5))
    predicted = np.array([b.mean_pd for b in bins])
    observed = np.array([b.observed_rate for b in bins])
    low, high = np.array([_wilson(b.defaults, b.rows) for b in bins]).T
    top = max(float(predicted.max(initial=0)), float(high.max(initial=0)), 0.01) * 1.05
    axes.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=0.8, label="perfect")
    axes.errorbar(
        predicted,
        observed,
        yerr=[observed - low, high - observed],
        marker="o",
        capsize=3,
        label="equal-count bins, 95% Wilson interval",
    )
    axes.set_xlim(0, top)
    axes.set_ylim(0, top)
    axes.set_xlabel("mean predicted default probability")
    axes.set_ylabel("observed default rate")
    rows, defaults = sum(b.rows for b in bins), sum(b.defaults for b in bins)
    axes.set_title(
        f"{title}: reliability"
        + (f" of the {served} model" if served else "")
        + f"\n{rows} rows, {defaults} defaults, {len(bins)} bins",
        fontsize="medium",
    )
    axes.legend(fontsize="small")
    figure.tight_layout()

    def save(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=110)

    write_atomically(path, save)
    plt.close(figure)


# --- small helpers ------------------------------------------------------------------------


def _wilson(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson's 95% interval for a binomial rate: sensible at 0 of 29, unlike the normal one."""
    if trials == 0:
        return 0.0, 1.0
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials * trials))
    half /= 1 + z * z / trials
    return max(0.0, centre - half), min(1.0, centre + half)


def _load_head_arrays(model: CreditModel, head: dict[str, np.ndarray], where: Path) -> None:
    import torch

    try:
        model.head.load_state_dict(
            {k: torch.from_numpy(np.asarray(v, dtype=np.float32).copy()) for k, v in head.items()}
        )
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{where}: source head does not fit the model ({first})") from None


def _encoder_entry(directory: Path, checkpoint: EncoderCheckpoint) -> dict[str, str]:
    return {"path": str(directory.absolute()), "sha256": encoder_sha256(checkpoint.arrays)}


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _slice_counts(table: EncodedTable) -> dict[str, int]:
    assert table.label is not None
    return {"rows": len(table.label), "defaults": int(table.label.sum())}


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON without NaN: a metric that does not exist (one class) is null."""
    return {
        k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in values.items()
    }


def _without(record: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != key}


def _auc(metrics: dict[str, Any]) -> str:
    auc, low, high = metrics.get("auc"), metrics.get("auc-ci-low"), metrics.get("auc-ci-high")
    if auc is None:
        return "n/a"
    return f"{auc:.4f} [{low:.3f}, {high:.3f}]" if low is not None else f"{auc:.4f}"
