"""`fedfin choose-model`, `score`, `explain` and `serve`: the bank's model at work, inside the bank.

Each takes the bank's state directory (its private head) and the global encoder checkpoint
(e.g. RUN/final or RUN/global/round-NNN). `choose-model` compares that federated model with
the public one on the bank's validation rows and records the choice and its calibration in
the state directory; `score`, `explain` and `serve` then use the chosen, calibrated model.
Nothing is sent anywhere. Bad input raises a `FedfinError`, which the main CLI prints as one
line with its exit code.
"""

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedfin.common.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from fedfin.client.scoring import RowNotes

# Heavy imports (pandas, torch, captum, uvicorn) wait until a command runs: `fedfin --help`
# stays fast.

PROBABILITY_COLUMN = "default_probability"  # as client.scoring names them (not imported:
DECISION_COLUMN = "decision"  # it loads torch, and `fedfin --help` must stay fast)


def _number(flag: str, low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got '{text}'") from None
        if not low < value < high:
            raise argparse.ArgumentTypeError(f"{flag} must be in ({low:g}, {high:g}), got {text}")
        return value

    return parse


def _integer(flag: str, minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be an integer, got '{text}'") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{flag} must be at least {minimum}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    value = _integer("--port", 1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"--port must be at most 65535, got {value}")
    return value


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="the bank's state directory (holds its private head: head.npz, head.json)",
    )
    parser.add_argument(
        "--encoder",
        type=Path,
        required=True,
        help="global encoder checkpoint directory, e.g. RUN/final or RUN/global/round-005",
    )
    parser.add_argument(
        "--threads",
        type=_integer("--threads", 1),
        default=1,
        help="torch threads (default 1: on a busy small machine more threads wait on each other)",
    )


def add_bank_commands(commands: "argparse._SubParsersAction[Any]") -> None:
    """Add `choose-model`, `score`, `explain` and `serve` to the `fedfin` command line."""
    choose = commands.add_parser(
        "choose-model",
        help="choose the model this bank serves (public or federated) and calibrate it",
        description=(
            "Compare the federated model (--encoder with this bank's private head) with the "
            "public one (--public-encoder with its source head) on the bank's validation rows, "
            "serve the federated one only if its AUC is higher beyond chance (DeLong's paired "
            "test, one-sided 95%; otherwise the public one), fit a Platt "
            "calibration on the bank's non-test rows, and write serving.json, reliability.png "
            "and a record in evaluations.jsonl to --state-dir. Use the bank's own data-path, "
            "test-fraction and validation-fraction (its node config): the split must be the one "
            "it trained with. Also writes drift-reference.json (the served model's scores and "
            "the features of the bank's non-test rows, binned), what serve and score watch "
            "drift against. Nothing is sent; runs offline."
        ),
    )
    _add_model_flags(choose)
    choose.add_argument(
        "--public-encoder",
        type=Path,
        required=True,
        help="the pretrained checkpoint (with source_head.npz), e.g. RUN/pretrained",
    )
    choose.add_argument("--data", type=Path, required=True, help="the bank's data-path")
    choose.add_argument(
        "--test-fraction",
        type=_number("--test-fraction", 0.0, 1.0),
        default=0.25,
        help="the bank's node config test-fraction (the split it trained with)",
    )
    choose.add_argument(
        "--validation-fraction",
        type=_number("--validation-fraction", 0.0, 1.0),
        default=0.2,
        help="the bank's node config validation-fraction",
    )
    choose.set_defaults(run=run_choose_model)

    score = commands.add_parser(
        "score",
        help="score applications with the model this bank serves (see choose-model)",
        description=(
            "Print the model card (which model this bank serves for --encoder, public or "
            "federated, why, its calibration and model version), validate a CSV/Parquet of "
            "applications against the encoder's schema and write it back with a "
            f"'{PROBABILITY_COLUMN}' column (and '{DECISION_COLUMN}' with --threshold), "
            "'reason_codes' (the features pushing each score towards default most, e.g. "
            "int_rate_high), 'imputed' (features missing in the row, imputed as in training) "
            "and 'unseen_categories' (values the model never saw, scored as unknown) to --out, "
            "as CSV or Parquet by its suffix. An id and any other column are kept as they are. "
            "If --data has the label column, also print a reliability table and write "
            "<out>-reliability.png. With the bank's drift reference (choose-model), print the "
            "PSI of the table's features and scores against its training rows and write "
            "<out>-drift.json. Runs offline."
        ),
    )
    _add_model_flags(score)
    score.add_argument("--data", type=Path, required=True, help="applications (CSV/Parquet)")
    score.add_argument("--out", type=Path, required=True, help="output .csv or .parquet file")
    score.add_argument(
        "--threshold",
        type=_number("--threshold", 0.0, 1.0),
        help="add a decision column: 'decline' at or above this default probability",
    )
    score.add_argument(
        "--reasons",
        type=_integer("--reasons", 0),
        default=4,
        help="reason codes per application (0: no reason_codes column, faster)",
    )
    score.set_defaults(run=run_score)

    explain = commands.add_parser(
        "explain",
        help="why applications score as they do: top reasons, charts, global importance",
        description=(
            "Integrated gradients through the served model (see choose-model), in log-odds of "
            "default, from a reference applicant (public medians, unknown categories). For "
            "each --rows application: a table of the top reasons its score is high and a PNG "
            "chart; for the model: mean |attribution| over a seeded sample of --data, as CSV "
            "and PNG. Writes to --out; runs offline."
        ),
    )
    _add_model_flags(explain)
    explain.add_argument("--data", type=Path, required=True, help="applications (CSV/Parquet)")
    explain.add_argument("--out", type=Path, required=True, help="directory for tables and PNGs")
    explain.add_argument(
        "--rows",
        type=_integer("--rows", 0),
        nargs="+",
        default=[0],
        help="row positions in --data to explain, 0-based (default: 0)",
    )
    explain.add_argument(
        "--top", type=_integer("--top", 1), default=5, help="reasons to list per application"
    )
    explain.add_argument(
        "--sample",
        type=_integer("--sample", 1),
        default=500,
        help="rows of --data for the global importance (seeded sample)",
    )
    explain.add_argument(
        "--seed", type=_integer("--seed", 0), default=0, help="seed of the global sample"
    )
    explain.add_argument(
        "--steps",
        type=_integer("--steps", 2),
        help="integrated-gradients steps (Gauss-Legendre; default 32, |delta| about 1e-8)",
    )
    explain.set_defaults(run=run_explain)

    serve = commands.add_parser(
        "serve",
        help="HTTP service inside the bank: POST /score, POST /explain, GET /health, GET /drift",
        description=(
            "Load the model once and serve it over HTTP (FastAPI on uvicorn). The body of "
            "/score is one application as a JSON object of feature: value, or a list of up to "
            "--max-batch of them; /explain takes one. The column rules are `fedfin score`'s: "
            "every feature present (null or empty is imputed), an 'id' and other fields kept "
            "out of the model. Each answer carries the request id, the model version, reason "
            "codes, imputed features and unseen categories; bad input gets a 422 naming the "
            "field. One JSON line per request goes to --request-log. GET /drift gives the PSI "
            "per feature and of the scores of every application scored since start against "
            "the bank's training reference (drift-reference.json, written by choose-model), "
            "with verdicts (PSI < 0.1 ok, < 0.25 watch, else act) from 200 rows on; a "
            "threshold crossed is logged once. Binds to 127.0.0.1 unless --host says otherwise."
        ),
    )
    _add_model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port to listen on")
    serve.add_argument(
        "--threshold",
        type=_number("--threshold", 0.0, 1.0),
        help="add a decision to /score: 'decline' at or above this default probability",
    )
    serve.add_argument(
        "--no-explain", action="store_true", help="leave out /explain and reason codes (faster)"
    )
    serve.add_argument(
        "--max-batch",
        type=_integer("--max-batch", 1),
        default=1000,
        help="most applications in one POST /score",
    )
    serve.add_argument(
        "--request-log",
        type=Path,
        help="append one JSON line per request to this file (default: stderr); it holds no "
        "applicant data beyond the 'id' a caller sends",
    )
    serve.set_defaults(run=run_serve)

    check = commands.add_parser(
        "check-data",
        help="bank: how far its data is from the public data, before any budget is spent",
        description=(
            "Inside the bank, before training: per feature the missing rate, the share out of "
            "the public range (outside the public rows' 0.5%-99.5% quantiles), the share of "
            "unseen categories and the PSI against the public profile saved beside the "
            "pretrained encoder (decile bins, empty bins floored at 1e-4); the label rate if "
            "the label column is there. Verdicts: PSI < 0.1 ok, < 0.25 watch, else act, raised "
            "to watch (act) when 5% (25%) of a feature's values are out of range or unseen; "
            "overall the worst. Prints a table (or JSON with --json) and writes data-check.json "
            "and data-check.png to --out. Nothing is sent, nothing is charged; exit 0 whatever "
            "the verdict, 2 for bad data or flags, 3 for a checkpoint without a public profile."
        ),
    )
    check.add_argument(
        "--encoder",
        type=Path,
        required=True,
        help="the pretrained encoder checkpoint (with public_profile.json), e.g. RUN/pretrained",
    )
    check.add_argument(
        "--data",
        type=Path,
        required=True,
        help="the bank's data: a CSV/Parquet file or a data directory (train.* and test.*)",
    )
    check.add_argument(
        "--label",
        help="label column, for its default rate (default: the encoder schema's label, if "
        "present in --data)",
    )
    check.add_argument(
        "--out",
        type=Path,
        default=Path("data-check"),
        help="directory for data-check.json and data-check.png",
    )
    check.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    check.set_defaults(run=run_check_data)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _check_table_path(flag: str, path: Path) -> None:
    from fedfin.common.tables import TABLE_SUFFIXES

    if path.suffix.lower() not in TABLE_SUFFIXES:  # outputs: plain CSV or Parquet
        raise ConfigError(f"{flag} {path}: use a .csv or .parquet file name")


def write_table(path: Path, frame: "pd.DataFrame") -> None:
    """CSV or Parquet by suffix, written atomically."""
    from fedfin.common.atomic import write_atomically

    if path.suffix.lower() == ".csv":
        write_atomically(path, lambda tmp: frame.to_csv(tmp, index=False))
    else:
        write_atomically(path, lambda tmp: frame.to_parquet(tmp, index=False))


def run_choose_model(args: argparse.Namespace) -> int:
    from fedfin.client.bank_settings import BankSettings
    from fedfin.client.model_choice import choose_served_model, model_card_text, served_model
    from fedfin.common.config import PrivacyPolicy

    _set_threads(args.threads)
    settings = BankSettings(
        name=args.state_dir.name,
        data_path=args.data,
        state_dir=args.state_dir,
        policy=PrivacyPolicy(),  # not used: choosing releases nothing and spends nothing
        test_fraction=args.test_fraction,
        validation_fraction=args.validation_fraction,
    )
    choose_served_model(settings, args.public_encoder, args.encoder)
    print(model_card_text(served_model(args.state_dir, args.encoder).card))
    print(
        f"recorded in {args.state_dir} (serving.json, reliability.png, evaluations.jsonl, "
        "drift-reference.json)"
    )
    return 0


def run_score(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from fedfin.client.drift import drift_summary, table_drift
    from fedfin.client.model_choice import model_card_text, reliability_text, write_reliability_plot
    from fedfin.client.scoring import (
        IMPUTED_COLUMN,
        REASONS_COLUMN,
        UNSEEN_COLUMN,
        Scorer,
        check_application_columns,
    )
    from fedfin.common.atomic import write_atomically
    from fedfin.common.metrics import reliability_table
    from fedfin.common.tables import read_table

    _check_table_path("--out", args.out)
    if args.out.resolve() == args.data.resolve():
        raise ConfigError(f"--out {args.out}: is --data; write the scores to another file")
    _set_threads(args.threads)
    scorer = Scorer.load(args.state_dir, args.encoder)
    frame = read_table(args.data)
    source = str(args.data)
    check_application_columns(frame.columns, scorer.schema, source)
    encoded = scorer.encode_frame(frame, source)
    label = scorer.schema.label
    observed = scorer.schema.encode_label(frame[label], source) if label in frame else None
    probability = 1.0 / (1.0 + np.exp(-scorer.logits_encoded(encoded)))
    notes = scorer.notes_frame(frame)
    scored = frame.copy()
    scored[PROBABILITY_COLUMN] = probability
    summary = f"mean default probability {probability.mean():.4f}"
    if args.threshold is not None:
        declined = probability >= args.threshold
        scored[DECISION_COLUMN] = np.where(declined, "decline", "approve")
        summary += f"; {int(declined.sum())} at or above {args.threshold:g} (decline)"
    if args.reasons:
        from fedfin.client.explain import Explainer

        codes = Explainer(scorer).reason_codes(encoded.numeric, encoded.categorical, args.reasons)
        scored[REASONS_COLUMN] = [";".join(row) for row in codes]
    scored[IMPUTED_COLUMN] = [";".join(n.imputed) for n in notes]
    scored[UNSEEN_COLUMN] = [";".join(f"{k}={v}" for k, v in n.unseen_categories) for n in notes]
    drift, reference_note = table_drift(args.state_dir, scorer, frame, probability, source)
    drift_path = args.out.with_name(f"{args.out.stem}-drift.json")
    write_table(args.out, scored)
    if drift is not None:
        text = json.dumps(drift, indent=2) + "\n"
        write_atomically(drift_path, lambda tmp: tmp.write_text(text))
    print(model_card_text(scorer.card))
    for line in notes_summary(notes, source):
        print(line)
    print(f"scored {len(frame)} applications ({summary}) -> {args.out}")
    if drift is None:
        print(f"drift: not watched: {reference_note}")
    else:
        for line in drift_summary(drift):
            print(line)
        print(f"drift summary -> {drift_path}")
    if observed is not None:  # outcomes known (a back-test): how well calibrated on these rows
        bins = reliability_table(observed, probability)
        plot = args.out.with_name(f"{args.out.stem}-reliability.png")
        write_reliability_plot(plot, bins, args.data.name)
        print(
            f"'{label}' is in the data: observed default rate {observed.mean():.4f} against a "
            f"mean predicted probability of {probability.mean():.4f}; reliability:"
        )
        print(reliability_text(bins, indent="  "))
        print(f"reliability plot -> {plot}")
    return 0


def notes_summary(notes: "list[RowNotes]", source: str) -> list[str]:
    """Warnings for people: which values were imputed and which categories were never seen."""
    lines = []
    missing: dict[str, list[int]] = {}
    unseen: dict[tuple[str, str], list[int]] = {}
    for row, note in enumerate(notes):
        for name in note.imputed:
            missing.setdefault(name, []).append(row)
        for pair in note.unseen_categories:
            unseen.setdefault(pair, []).append(row)
    for name, rows in missing.items():
        lines.append(
            f"warning: {source}: '{name}' is missing in {_rows_text(rows, len(notes))}; "
            "imputed as in training (public median or unknown category); see the 'imputed' column"
        )
    for (name, value), rows in unseen.items():
        lines.append(
            f"warning: {source}: '{name}' value '{value}' in {_rows_text(rows, len(notes))} "
            "was never seen by the model; scored as an unknown category; see 'unseen_categories'"
        )
    return lines


def _rows_text(rows: list[int], total: int) -> str:
    if total == 1:
        return "the application"
    shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    return f"{len(rows)} of {total} rows (row {shown}, 0-based)"


def run_explain(args: argparse.Namespace) -> int:
    from fedfin.client.explain import (
        Explainer,
        explanation_frame,
        importance_frame,
        importance_table,
        reasons_table,
        write_explanation_chart,
        write_importance_chart,
    )
    from fedfin.client.scoring import Scorer
    from fedfin.common.tables import read_table

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: exists and is not a directory")
    _set_threads(args.threads)
    scorer = Scorer.load(args.state_dir, args.encoder)
    frame = read_table(args.data)
    for row in args.rows:
        if row >= len(frame):
            raise ConfigError(f"--rows {row}: {args.data} has only {len(frame)} rows")
    explainer = Explainer(scorer) if args.steps is None else Explainer(scorer, args.steps)
    explanations = explainer.explain_rows(frame, args.rows, str(args.data))
    args.out.mkdir(parents=True, exist_ok=True)
    for row, explanation in zip(args.rows, explanations, strict=True):
        print(f"\napplication at row {row} of {args.data}:")
        print(reasons_table(explanation, args.top))
        write_table(args.out / f"reasons-row-{row}.csv", explanation_frame(explanation))
        write_explanation_chart(args.out / f"reasons-row-{row}.png", explanation)
    importance = explainer.global_importance(frame, args.sample, args.seed, str(args.data))
    print("\nwhat drives this bank's model (global importance):")
    print(importance_table(importance))
    write_table(args.out / "global-importance.csv", importance_frame(importance))
    write_importance_chart(args.out / "global-importance.png", importance)
    print(f"\ntables and charts: {args.out}")
    return 0


def run_check_data(args: argparse.Namespace) -> int:
    import json

    from fedfin.client.data_check import (
        CHECK_JSON,
        CHECK_PLOT,
        check_bank_data,
        check_table,
        write_check_plot,
    )
    from fedfin.common.atomic import write_atomically

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: exists and is not a directory")
    outputs = [args.out / CHECK_JSON, args.out / CHECK_PLOT]
    if args.data.resolve() in {p.resolve() for p in outputs}:
        raise ConfigError(f"--out {args.out}: would overwrite --data {args.data}")
    check = check_bank_data(args.encoder, args.data, args.label)  # every error before writing
    text = json.dumps(check.as_dict(), indent=2) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomically(outputs[0], lambda tmp: tmp.write_text(text))
    write_check_plot(outputs[1], check)
    if args.json:
        print(text, end="")
    else:
        print(check_table(check))
        print(f"json: {outputs[0]}; plot: {outputs[1]} (nothing was sent)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fedfin.client.drift import DriftMonitor, load_drift_reference
    from fedfin.client.explain import Explainer
    from fedfin.client.model_choice import model_card_text
    from fedfin.client.scoring import Scorer
    from fedfin.client.serve import RequestLog, create_app

    _set_threads(args.threads)
    scorer = Scorer.load(args.state_dir, args.encoder)
    print(model_card_text(scorer.card))
    explainer = None if args.no_explain else Explainer(scorer)
    reference, note = load_drift_reference(args.state_dir, str(scorer.card.get("model_version")))
    monitor = None if reference is None else DriftMonitor(reference)
    print(f"drift: {'watched against ' if monitor else 'not watched: '}{note}")
    log = RequestLog(args.request_log)
    app = create_app(
        scorer,
        explainer,
        args.threshold,
        max_batch=args.max_batch,
        request_log=log,
        drift=monitor,
        drift_note=note,
    )
    endpoints = "/score, /health, /drift" + ("" if args.no_explain else ", /explain")
    where = args.request_log or "stderr"
    print(
        f"serving {endpoints} on http://{args.host}:{args.port}; request log: {where} "
        "(Ctrl-C to stop)",
        flush=True,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        log.close()
    return 0
