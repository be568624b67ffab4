"""The `fedfin` command line: one subcommand per job, one clear line per error.

Any `FedfinError` becomes `fedfin <command>: error: <message>` on stderr and its exit code.
"""

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from fedfin.client.runner_cli import add_runner_commands
from fedfin.common.config import FINE_TUNE_MODES, STRATEGY_NAMES
from fedfin.common.errors import ConfigError, FedfinError
from fedfin.common.logs import log_like_flower
from fedfin.server.coordinator_cli import add_coordinator_commands
from fedfin.server.plan_cli import add_plan_command
from fedfin.simulations.cli_bank import add_bank_commands

if TYPE_CHECKING:
    from fedfin.common.sources import DataSource


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless it has none or already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" in text
            or "(default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line, not the usage block; defaults in the help."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def installed_version() -> str:
    """fedfin's version from the installed distribution's metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedfin")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _number(
    flag: str, kind: Callable[[str], float], valid: Callable[[float], bool], wanted: str
) -> Callable[[str], Any]:
    """An argparse type: parse with `kind`, then refuse values `valid` rejects, naming the flag."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be {wanted}, got '{text}'") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"{flag} must be {wanted}, got {text}")
        return value

    return parse


def _positive_int(flag: str) -> Callable[[str], int]:
    return _number(flag, int, lambda v: v > 0, "a positive integer")


def _non_negative_int(flag: str) -> Callable[[str], int]:
    return _number(flag, int, lambda v: v >= 0, "an integer, 0 or more")


def _positive_float(flag: str) -> Callable[[str], float]:
    return _number(flag, float, lambda v: 0 < v < float("inf"), "a positive number")


def _probability(flag: str) -> Callable[[str], float]:
    return _number(flag, float, lambda v: 0 < v < 1, "a number in (0, 1)")


def _int_in(flag: str, low: int, high: int, why: str = "") -> Callable[[str], int]:
    """An integer flag in [low, high]; `why` explains the upper bound."""
    wanted = f"an integer from {low} to {high}" + (f" ({why})" if why else "")
    return _number(flag, int, lambda v: low <= v <= high, wanted)


def _float_in(flag: str, high: float, why: str = "") -> Callable[[str], float]:
    """A number in (0, high]."""
    wanted = f"a number in (0, {high:g}]" + (f" ({why})" if why else "")
    return _number(flag, float, lambda v: 0 < v <= high, wanted)


# Bounds on run flags: each names its reason in the error. The privacy ones follow the
# banks' PrivacyPolicy (common/config.py), so a flag can never ask what every bank refuses.
MAX_SEED = 2**32 - 1
MAX_SYNTHETIC_ROWS = 10_000_000
MAX_BANKS = 1000
MAX_ROUNDS = 100  # PrivacyPolicy.max_planned_rounds: past it every bank's budget is spent
MAX_EPSILON = 1000.0
MAX_DELTA = 0.01  # PrivacyPolicy: δ is the chance ε fails; keep it far below 1/rows
MAX_NOISE = 20.0  # PrivacyPolicy.max_noise_multiplier


def _delta(flag: str) -> Callable[[str], float]:
    return _number(
        flag,
        float,
        lambda v: 0 < v < MAX_DELTA,
        f"a number in (0, {MAX_DELTA:g}) (δ is the chance the ε guarantee fails; "
        "keep it far below 1/rows, e.g. 1e-5)",
    )


def _source_from(args: argparse.Namespace) -> "DataSource":
    """The data source the --data flags describe."""
    from fedfin.common.sources import load_source

    return load_source(
        args.data,
        args.label,
        args.partition_by,
        args.positive_label,
        synthetic_rows=args.rows,
        synthetic_banks=args.banks,
        seed=args.seed,
    )


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        default="lending-club",
        help="'lending-club' (built-in real loans, offline), 'synthetic', or a CSV/Parquet path",
    )
    parser.add_argument("--label", help="label column (required with a file): 1/bad = default")
    parser.add_argument(
        "--positive-label", help="label value meaning default, when it is not 1/True"
    )
    parser.add_argument(
        "--partition-by", help="column whose groups become banks (e.g. a region); else random"
    )
    parser.add_argument(
        "--rows",
        type=_int_in("--rows", 1, MAX_SYNTHETIC_ROWS),
        default=20_000,
        help="synthetic data: rows",
    )
    parser.add_argument(
        "--seed",
        type=_int_in("--seed", 0, MAX_SEED),
        default=0,
        help="seed for splits and training",
    )


def _add_empirical_audit_flags(audit: argparse.ArgumentParser) -> None:
    empirical = audit.add_argument_group(
        "empirical audit (--empirical)",
        "Inside a bank: train one round of the bank's real DP code on its data with white-box "
        "canaries, in a temporary state dir (nothing spent, nothing sent), and report a 95% "
        "lower bound on ε next to the claimed ε, plus noise diagnostics. Exits 4 if caught.",
    )
    empirical.add_argument("--empirical", action="store_true", help="run the canary audit")
    empirical.add_argument("--data", type=Path, help="the bank's data (dir or CSV/Parquet)")
    empirical.add_argument("--encoder", type=Path, help="encoder checkpoint directory")
    empirical.add_argument(
        "--canaries",
        type=_positive_int("--canaries"),
        default=1000,
        help="white-box canaries, half of them trained on",
    )
    empirical.add_argument(
        "--guesses",
        type=_non_negative_int("--guesses"),
        default=0,
        help="'in' guesses, and as many 'out' guesses (default: canaries / 10)",
    )
    empirical.add_argument(
        "--epsilon",
        type=_positive_float("--epsilon"),
        default=4.0,
        help="claimed ε of the audited plan (fixes σ for --steps steps at q = 1)",
    )
    empirical.add_argument(
        "--steps", type=_positive_int("--steps"), default=20, help="DP-SGD steps of the round"
    )
    empirical.add_argument(
        "--delta", type=_delta("--delta"), default=1e-5, help="δ of the claimed ε"
    )
    empirical.add_argument(
        "--max-grad-norm",
        type=_positive_float("--max-grad-norm"),
        default=1.0,
        help="DP-SGD clipping norm",
    )
    empirical.add_argument(
        "--sample-rate",
        type=_probability("--sample-rate"),
        default=0.05,
        help="the bank's Poisson rate for its data (1/k)",
    )
    empirical.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=64,
        help="expected batch size of the bank's own rows",
    )
    empirical.add_argument(
        "--seed",
        type=_non_negative_int("--seed"),
        default=0,
        help="seed of the canaries and of this audit's noise (it releases nothing)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedfin",
        description=(
            "Privacy-preserving federated transfer learning for credit risk. A shared encoder "
            "is pretrained on public data, then fine-tuned by banks with DP-SGD; each bank "
            "keeps a private head and an enforced privacy budget."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedfin {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pre = commands.add_parser(
        "pretrain",
        help="train the shared encoder on public/source data (no DP needed: the data is public)",
        description=(
            "Fit the feature schema on the public pool, train encoder + source head, and write "
            "encoder.npz, schema.json, model.json and pretrain_metrics.json to --out."
        ),
    )
    _add_data_flags(pre)
    pre.add_argument(
        "--banks",
        type=_int_in("--banks", 1, MAX_BANKS),
        default=5,
        help="banks the data is split into (the rest is the public pool)",
    )
    pre.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    pre.add_argument(
        "--epochs",
        type=_int_in("--epochs", 1, 10_000),
        default=40,
        help="passes over the public pool",
    )
    pre.add_argument("--lr", type=_float_in("--lr", 1.0), default=3e-3, help="learning rate (Adam)")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(run=_run_pretrain)

    sim = commands.add_parser(
        "simulate",
        help="simulate N banks federating with DP on Flower's simulation engine, then audit",
        description=(
            "Pretrain the shared encoder if needed, split the data into banks, and run R rounds "
            "of federated DP fine-tuning (each bank: private head, enforced ε budget, ledger). "
            "Prints progress per round and a table per bank; writes report.json to --out."
        ),
    )
    _add_data_flags(sim)
    sim.add_argument(
        "--banks", type=_int_in("--banks", 1, MAX_BANKS), default=5, help="number of banks"
    )
    sim.add_argument(
        "--rounds",
        type=_int_in(
            "--rounds",
            1,
            MAX_ROUNDS,
            "the banks plan their budget for at most 100 rounds; later rounds are declined",
        ),
        default=5,
        help="server rounds",
    )
    sim.add_argument(
        "--epsilon",
        type=_float_in("--epsilon", MAX_EPSILON),
        default=1.0,
        help="each bank's ε budget (whole life of its state dir)",
    )
    sim.add_argument("--delta", type=_delta("--delta"), default=1e-5, help="each bank's δ")
    sim.add_argument(
        "--max-grad-norm",
        type=_float_in("--max-grad-norm", 1000.0),
        default=1.0,
        help="DP-SGD clipping norm of each record's gradient",
    )
    sim.add_argument(
        "--min-noise",
        type=_float_in("--min-noise", MAX_NOISE, "the banks' max noise multiplier"),
        default=0.5,
        help="the banks' floor on the noise multiplier",
    )
    sim.add_argument(
        "--strategy", choices=STRATEGY_NAMES, default="fedavg", help="how the server aggregates"
    )
    sim.add_argument(
        "--secure-aggregation",
        action="store_true",
        help="the server learns only the banks' mean update (SecAgg+, equal weights; "
        "docs/secure-aggregation.md)",
    )
    sim.add_argument(
        "--mode",
        choices=FINE_TUNE_MODES,
        default="full",
        help="full: encoder + head each step; fedrep: head steps, then encoder steps; "
        "fedsgd: one DP SGD step on the encoder per round, head frozen",
    )
    sim.add_argument(
        "--distributed-dp",
        action="store_true",
        help="with --secure-aggregation and --mode fedsgd: each bank adds a noise share "
        "σ/√K and is charged for the K-bank sum's σ (K: a majority of the banks; "
        "docs/secure-aggregation.md)",
    )
    sim.add_argument(
        "--server-epsilon",
        type=_float_in("--server-epsilon", 1000.0),
        help="with --distributed-dp: the most ε each bank accepts if secure aggregation is "
        "broken (its distributed-dp-server-budget; at least --epsilon)",
    )
    sim.add_argument(
        "--local-epochs",
        type=_float_in("--local-epochs", 100.0),
        default=1.0,
        help="passes over a bank's training rows per round (fractions allowed)",
    )
    sim.add_argument(
        "--batch-size",
        type=_int_in("--batch-size", 1, 1_000_000),
        default=64,
        help="expected Poisson batch size (sets each bank's sample rate)",
    )
    sim.add_argument("--lr", type=_float_in("--lr", 1.0), default=2e-3, help="banks' learning rate")
    sim.add_argument("--encoder", type=Path, help="pretrained encoder dir (default: pretrain)")
    sim.add_argument("--out", type=Path, required=True, help="run directory (reuse to continue)")
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's log")
    sim.add_argument("--no-audit", action="store_true", help="skip the audit at the end")
    sim.set_defaults(run=_run_simulate)

    audit = commands.add_parser(
        "audit",
        help="verify banks' privacy ledgers and recompute ε with an independent accountant",
        description=(
            "Verify each ledger's hash chain, recompute cumulative ε from the recorded DP events "
            "with dp-accounting (PLD and RDP), and report releases, ε, δ, budget and what "
            "remains per bank. With --anchors, check each ledger still holds every (seq, hash) "
            "the server recorded from the bank's replies. The recorded ε (the bank's PRV "
            "accountant, which enforces its budget) is authoritative and PLD checks it; RDP is "
            "shown as a looser upper bound. Exits 5 if a ledger is broken (chain, anchors, "
            "partial last line, a train release without DP events, a NaN, negative or "
            "non-numeric field, the same ledger or bank twice), 4 if a recorded ε is "
            "understated or a budget is exceeded, 2 if PATH or a flag is wrong."
        ),
    )
    audit.add_argument(
        "path", type=Path, nargs="?", help="a bank's state dir, or a run dir (all banks)"
    )
    audit.add_argument(
        "--anchors",
        type=Path,
        help=(
            "the server's ledger-anchors.jsonl (or a bank's external copy), or a server or run "
            "dir holding it: flags truncated, rolled-back and rebuilt ledgers"
        ),
    )
    audit.add_argument("--json", type=Path, help="also write the audit as JSON to this file")
    audit.add_argument(
        "--plot",
        type=Path,
        help=(
            "PNG of cumulative ε per bank (default: privacy-audit.png beside --json, else in "
            "the current directory; never inside a bank's state dir); with --empirical, of the "
            "canary scores (default: ./empirical-audit.png)"
        ),
    )
    _add_empirical_audit_flags(audit)
    audit.set_defaults(run=_run_audit)

    certs = commands.add_parser(
        "certs",
        help="coordinator: create a private CA and a TLS certificate for the SuperLink",
        description=(
            "Write ca.crt/ca.key (keep ca.key offline) and server.pem/server.key for "
            "flower-superlink --ssl-*. Give every DNS name and IP banks use to reach it."
        ),
    )
    certs.add_argument("--out", type=Path, required=True, help="directory to write to")
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        help="DNS name or IP of the SuperLink (repeat for several)",
    )
    certs.add_argument(
        "--days", type=_positive_int("--days"), default=365, help="validity of the certificates"
    )
    certs.set_defaults(run=_run_certs)

    keys = commands.add_parser(
        "keys",
        help="bank: create the SuperNode's ECDSA P-384 key pair (OpenSSH format)",
        description=(
            "Write NAME (private: stays on the bank's SuperNode) and NAME.pub (give it to the "
            "coordinator to register with `flwr supernode register`)."
        ),
    )
    keys.add_argument("--out", type=Path, required=True, help="directory to write to")
    keys.add_argument("--name", required=True, help="file name, e.g. the bank's name")
    keys.set_defaults(run=_run_keys)

    check = commands.add_parser(
        "check-connection",
        help="bank: check TLS to the SuperLink with the coordinator's CA before starting",
        description=(
            "Connect to the SuperLink and verify its certificate with --root-certificates; "
            "says whether nothing listens, the CA is wrong, or the certificate lacks the name."
        ),
    )
    check.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    check.add_argument("--root-certificates", type=Path, required=True, help="the CA (ca.crt)")
    check.set_defaults(run=_run_check_connection)

    split = commands.add_parser(
        "split",
        help="write the public pool and each bank's train/test tables (demos and tests)",
        description=(
            "Split --data into a public pool and --banks banks exactly as `simulate` does and "
            "write OUT/public.parquet and OUT/<bank>/{train,test}.parquet, e.g. to give each "
            "SuperNode of a local deployment its own data-path."
        ),
    )
    _add_data_flags(split)
    split.add_argument(
        "--banks",
        type=_int_in("--banks", 1, MAX_BANKS),
        default=3,
        help="banks the data is split into (the rest is the public pool)",
    )
    split.add_argument("--out", type=Path, required=True, help="directory to write the tables to")
    split.set_defaults(run=_run_split)
    add_bank_commands(commands)
    add_runner_commands(commands)
    add_coordinator_commands(commands)
    add_plan_command(commands)
    return parser


def _run_certs(args: argparse.Namespace) -> int:
    from fedfin.server.certificates import create_certificates

    paths = create_certificates(args.out, args.host, args.days)
    print(f"CA certificate (give to banks): {paths.ca_cert}")
    print(f"CA key (keep offline):          {paths.ca_key}")
    print(f"SuperLink certificate and key:  {paths.server_cert}, {paths.server_key}")
    return 0


def _run_keys(args: argparse.Namespace) -> int:
    from fedfin.client.node_keys import create_node_keys

    paths = create_node_keys(args.out, args.name)
    print(f"private key (stays on this SuperNode): {paths.private_key}")
    print(f"public key (send to the coordinator):  {paths.public_key}")
    return 0


def _run_check_connection(args: argparse.Namespace) -> int:
    from fedfin.client.connection_check import check_superlink_connection

    print(check_superlink_connection(args.superlink, args.root_certificates))
    return 0


def _run_split(args: argparse.Namespace) -> int:
    from fedfin.common.atomic import replace_directory, write_json_atomically
    from fedfin.common.config import SplitConfig

    source = _source_from(args)
    split = source.split(SplitConfig(num_banks=args.banks, seed=args.seed))
    outputs = [args.out / "public.parquet"] + [
        args.out / bank.name / f"{part}.parquet"
        for bank in split.banks
        for part in ("train", "test")
    ]
    if source.path is not None and source.path in {p.resolve() for p in outputs}:
        raise ConfigError(f"--out {args.out}: would overwrite the --data file {source.path}")
    _check_split_out(args.out)
    print(split.summary())

    def write(directory: Path) -> None:
        write_json_atomically(directory / "placement.json", split.placement())
        split.public.to_parquet(directory / "public.parquet", index=False)
        for bank in split.banks:
            (directory / bank.name).mkdir()
            bank.train.to_parquet(directory / bank.name / "train.parquet", index=False)
            bank.test.to_parquet(directory / bank.name / "test.parquet", index=False)

    replace_directory(args.out, write)  # all of it or, on any error, nothing changed
    for bank in split.banks:
        print(
            f"{bank.name}: {len(bank.train)} train / {len(bank.test)} test rows -> "
            f"{args.out / bank.name}"
        )
    return 0


def _check_split_out(out: Path) -> None:
    """`split --out` is a new or empty directory, or an earlier split's (then replaced)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    foreign = [
        name
        for name in present
        if name not in ("placement.json", "public.parquet")
        and not ((out / name).is_dir() and {p.name for p in (out / name).iterdir()} <= _BANK_FILES)
    ]
    if foreign or "placement.json" not in present:
        foreign = foreign or present
        raise ConfigError(
            f"--out {out}: not empty (holds '{foreign[0]}'); split writes a new or empty "
            "directory, or replaces an earlier split's"
        )


_BANK_FILES = {"train.parquet", "test.parquet"}


def _run_empirical_audit(args: argparse.Namespace) -> int:
    from fedfin.client.empirical_audit import (
        EmpiricalAuditConfig,
        empirical_audit_table,
        run_empirical_audit,
        write_empirical_plot,
    )
    from fedfin.common.errors import PrivacyBudgetError

    if args.data is None or args.encoder is None:
        raise ConfigError("--empirical needs --data and --encoder")
    if args.path is not None:
        raise ConfigError("--empirical audits training, not a state dir: drop PATH")
    torch_threads()
    config = EmpiricalAuditConfig(
        canaries=args.canaries,
        guesses_per_side=args.guesses,
        epsilon=args.epsilon,
        steps=args.steps,
        delta=args.delta,
        max_grad_norm=args.max_grad_norm,
        sample_rate=args.sample_rate,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    audit = run_empirical_audit(args.data, args.encoder, config)
    print(empirical_audit_table(audit))
    if args.json:
        from fedfin.common.atomic import write_atomically

        text = json.dumps(audit.as_dict(), indent=2) + "\n"
        write_atomically(args.json, lambda tmp: tmp.write_text(text))
    plot = args.plot or Path("empirical-audit.png")
    write_empirical_plot(plot, audit)
    print(f"plot: {plot}" + (f"; json: {args.json}" if args.json else ""))
    if audit.verdict != "ok":
        raise PrivacyBudgetError(f"empirical audit: {audit.verdict}")
    return 0


def torch_threads() -> None:
    """One torch thread: on a small busy machine more threads only wait on each other."""
    import torch

    torch.set_num_threads(1)


def _run_audit(args: argparse.Namespace) -> int:
    if getattr(args, "empirical", False):
        return _run_empirical_audit(args)
    if args.path is None:
        raise ConfigError("audit needs PATH (a state or run dir), or --empirical")
    from fedfin.common.audit import audit_path, find_state_dirs, unaudited_anchored_banks
    from fedfin.common.errors import LedgerError, PrivacyBudgetError
    from fedfin.common.ledger_anchors import read_anchors
    from fedfin.simulations.audit_report import (
        audit_status,
        audit_table,
        write_audit_json,
        write_epsilon_plot,
    )

    state_dirs = find_state_dirs(args.path)
    plot, skipped = _audit_outputs(args, state_dirs)
    anchors = read_anchors(args.anchors) if getattr(args, "anchors", None) else None
    audits = audit_path(args.path, anchors)
    if args.json:  # files first: a closed pipe or a full disk leaves no half a report
        write_audit_json(args.json, audits)
    if plot is not None:
        write_epsilon_plot(plot, audits)
    print(audit_table(audits))
    if anchors is not None:
        print(f"anchors: {len(anchors)} recorded replies from {args.anchors}")
        absent = unaudited_anchored_banks(audits, anchors)
        if absent:
            print(f"anchors also name banks with no ledger here (not audited): {', '.join(absent)}")
    print((f"plot: {plot}" if plot else skipped) + (f"; json: {args.json}" if args.json else ""))
    broken = [a for a in audits if a.ledger_broken]
    if broken:
        names = ", ".join(f"{a.bank} ({audit_status(a).lower()})" for a in broken)
        raise LedgerError(f"ledger broken for {names}: {broken[0].all_problems[0]}")
    failing = [a.bank for a in audits if not a.ok]
    if failing:
        raise PrivacyBudgetError(f"ε understated or budget exceeded for {', '.join(failing)}")
    return 0


AUDIT_PLOT = "privacy-audit.png"


def _audit_outputs(args: argparse.Namespace, state_dirs: list[Path]) -> tuple[Path | None, str]:
    """Where the audit's plot goes, checked with --json before anything is read or written.

    Never into a bank's state dir: an explicit --plot or --json there is refused, and the
    default (beside --json, else ./privacy-audit.png) is skipped with a note if it would be.
    """
    guarded = [d.resolve() for d in state_dirs]

    def inside_state_dir(path: Path) -> Path | None:
        target = path.resolve()
        return next((d for d in guarded if target == d or d in target.parents), None)

    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is None:
            continue
        if path.is_dir():
            raise ConfigError(f"{flag} {path}: is a directory; give a file name")
        state_dir = inside_state_dir(path)
        if state_dir is not None:
            raise ConfigError(
                f"{flag} {path}: inside the bank state dir {state_dir}; the audit never "
                "writes there"
            )
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise ConfigError(f"--plot {args.plot}: use a .png file name")
    if (
        args.plot is not None
        and args.json is not None
        and args.plot.resolve() == args.json.resolve()
    ):
        raise ConfigError(f"--plot and --json are the same file ({args.plot})")
    if args.plot is not None:
        return args.plot, ""
    plot = (args.json.parent if args.json else Path()) / AUDIT_PLOT
    state_dir = inside_state_dir(plot)
    if state_dir is not None or (args.json is not None and plot.resolve() == args.json.resolve()):
        return None, f"plot: not written (the default {plot} is in {state_dir}; pass --plot)"
    return plot, ""


def _distributed_dp_policy(args: argparse.Namespace) -> dict[str, Any]:
    """The banks' distributed-DP policy keys for `--distributed-dp`, or none."""
    from fedfin.common.secure_aggregation import majority_threshold

    if not args.distributed_dp:
        if args.server_epsilon is not None:
            raise ConfigError("--server-epsilon is only used with --distributed-dp")
        return {}
    if not args.secure_aggregation or args.mode != "fedsgd":
        raise ConfigError(
            "--distributed-dp needs --secure-aggregation and --mode fedsgd: a noise share is "
            "only sound when the server sees a sum of one linear step per bank"
        )
    if args.server_epsilon is None:
        raise ConfigError(
            "--distributed-dp needs --server-epsilon: the most ε each bank accepts if "
            "secure aggregation is broken"
        )
    return {
        "distributed_dp": True,
        "distributed_dp_accounting": "aggregate",
        "distributed_dp_server_budget": args.server_epsilon,
        "secagg_min_banks": max(2, majority_threshold(args.banks)),
    }


def _run_simulate(args: argparse.Namespace) -> int:
    from fedfin.common.config import FederationConfig, PrivacyPolicy, SplitConfig, TrainPlanConfig
    from fedfin.simulations.report_table import bank_table
    from fedfin.simulations.simulate import SimulationRequest, simulate

    distributed = _distributed_dp_policy(args)  # before any data is read
    source = _source_from(args)
    request = SimulationRequest(
        source=source,
        split=SplitConfig(num_banks=args.banks, seed=args.seed),
        federation=FederationConfig(
            num_rounds=args.rounds,
            strategy=args.strategy,
            secure_aggregation=args.secure_aggregation,
            min_banks=min(2, args.banks),
            train=TrainPlanConfig(
                mode=args.mode,
                local_epochs=args.local_epochs,
                batch_size=args.batch_size,
                learning_rate=args.lr,
            ),
        ),
        policy=PrivacyPolicy(
            epsilon_budget=args.epsilon,
            delta=args.delta,
            max_grad_norm=args.max_grad_norm,
            min_noise_multiplier=args.min_noise,
            **distributed,
        ),
        out_dir=args.out,
        encoder_dir=args.encoder,
        verbose=args.verbose,
    )
    progress = StartupProgress(args.banks)
    try:
        report = simulate(request, echo=progress)
    finally:
        progress.stop()
    print(bank_table(report))
    print(f"report: {args.out / 'report.json'}")
    if args.no_audit:
        return 0
    from fedfin.common.ledger_anchors import ANCHORS_FILE

    anchors = args.out / ANCHORS_FILE  # the server's record of every reply's ledger head
    print("\nprivacy audit of every bank's ledger against the server's anchors (fedfin audit):")
    return _run_audit(
        argparse.Namespace(
            path=args.out / "banks",
            anchors=anchors if anchors.exists() else None,
            json=args.out / "audit.json",
            plot=args.out / "privacy-audit.png",
        )
    )


class StartupProgress:
    """simulate's lines, plus a word while nothing else would print (before round 1 ends).

    Starting Flower's engine and every bank's first DP round takes 20-60 s on 2 cores; after
    `HEARTBEAT_S` of silence it prints how long it has been waiting, until the next line.
    """

    HEARTBEAT_S = 15.0

    def __init__(self, banks: int) -> None:
        self.banks = banks
        self._lines = 0
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="fedfin-progress", daemon=True)
        self._thread.start()

    def __call__(self, message: str) -> None:
        self._last = time.monotonic()
        self._lines += 1
        print(message, flush=True)
        if message.startswith("federating "):
            print(
                f"starting Flower's simulation engine and {self.banks} bank workers; each bank "
                "checks its data and budget, then trains round 1 with DP-SGD (its line comes "
                "when every bank has replied)",
                flush=True,
            )

    def _beat(self) -> None:
        beats = 0
        last = self._last
        while not self._stopped.wait(1.0):
            if self._last != last:  # a line came: count again from it
                beats, last = 0, self._last
            waited = time.monotonic() - last
            if waited >= self.HEARTBEAT_S * (beats + 1):
                beats += 1
                print(f"  ... still working ({waited:.0f} s since the last line)", flush=True)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=5)


def _run_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from fedfin.common.config import PretrainConfig, SplitConfig
    from fedfin.server.pretrain import check_encoder_out, fit_public_schema, pretrain

    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out}: exists and is not a directory")
    source = _source_from(args)
    split_config = SplitConfig(num_banks=args.banks, seed=args.seed)
    config = PretrainConfig(epochs=args.epochs, learning_rate=args.lr, seed=args.seed)
    provenance = {
        **source.identity(),
        "label": source.label,
        "positive_label": source.positive_label,
        "partition_by": source.partition_by,
        "split": asdict(split_config),
        "epochs": config.epochs,
        "learning_rate": config.learning_rate,
    }
    check_encoder_out(args.out, provenance)
    split = source.split(split_config)
    print(split.summary())
    # The public pool's problems (a column missing in all its groups) named as the pool's.
    schema = fit_public_schema(
        split.public,
        source.label,
        source.positive_label,
        config,
        source.excluded_columns,
        split.public_source(source.name),
    )
    for note in schema.identifier_notes():
        print(note)
    result = pretrain(
        split.public,
        source.label,
        source.positive_label,
        args.out,
        config,
        exclude=source.excluded_columns,
        source=source.name,
        progress=not args.quiet,
        provenance=provenance,
    )
    holdout = result.metrics["holdout"]
    print(
        f"pretrained on {result.metrics['fit_rows']} public rows: hold-out AUC "
        f"{holdout['auc']:.4f}, KS {holdout['ks']:.4f} -> {args.out}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    stdout = sys.stdout
    sys.stdout = _ClosedPipeIsQuiet(stdout)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        verbose = bool(getattr(args, "verbose", False))
        # Verbose: Flower logs at DEBUG with the time on each line, and so does fedfin.
        log_like_flower(logging.INFO if verbose else logging.WARNING, timestamps=verbose)
        return _run(args)
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def _run(args: argparse.Namespace) -> int:
    try:
        code: int = args.run(args)
        return code
    except FedfinError as exc:
        print(f"fedfin {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # e.g. --out not writable: the system's reason, in one line
        print(f"fedfin {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fedfin {args.command}: interrupted", file=sys.stderr)
        return 130


class _ClosedPipeIsQuiet:
    """stdout that goes quiet when its reader leaves (`fedfin audit RUN | head`).

    The command still finishes, writes its files and returns its own exit code; what it
    prints after the reader left goes to /dev/null instead of ending in a BrokenPipeError.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        except (OSError, ValueError):
            pass  # not a real file (a test's capture): nothing to redirect
        finally:
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


if __name__ == "__main__":
    sys.exit(main())
