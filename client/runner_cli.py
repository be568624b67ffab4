"""Bank commands for the runner: `fedfin bank-runner` and `fedfin app-hash`.

They live with the bank role; `fedfin` only dispatches (see simulations/cli.py). Heavy
imports (torch, opacus, Flower's runtime client) wait until a command runs.
"""

import argparse
import importlib
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from fedfin.common.errors import ConfigError
from fedfin.common.logs import log_like_flower

if TYPE_CHECKING:
    from fedfin.client.runner_config import RunnerConfig

log = logging.getLogger("fedfin.runner")


def _warm_up() -> None:
    """Import what every task needs once, at start, not per message (the point of a runner)."""
    for module in ("torch", "opacus", "fedfin.client.client_app", "fedfin.client.bank_worker"):
        importlib.import_module(module)


def _run_bank_runner(args: argparse.Namespace) -> int:
    from fedfin.client.clientappio import RuntimeApi, check_flower_version, read_secret
    from fedfin.client.runner_config import check_runner_files, load_runner_config

    config = load_runner_config(args.config)
    check_runner_files(config)
    check_flower_version()
    secret = read_secret(config.secret_file) if config.secret_file else None
    # One log, Flower's format, every line stamped: the runner is a long-lived service.
    log_like_flower(logging.DEBUG if args.verbose else logging.INFO, timestamps=True)

    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received: stopping after the current task", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    _warm_up()
    from fedfin.client.bank_runner import BankRunner
    from fedfin.client.client_app import build_client_app

    bank = config.bank
    app = build_client_app(
        resolve_settings=lambda _context: bank, torch_threads=config.torch_threads
    )
    api = RuntimeApi(config.runtime_api, secret, config.root_certificates)
    allowed = ", ".join(f"{a.app} {a.version} ({a.fab_sha256[:12]})" for a in config.allow)
    log.info(
        "bank runner for %s: runtime API %s%s; allow-list: %s",
        bank.name,
        config.runtime_api,
        " (SuperExec auth)" if secret else "",
        allowed,
    )
    _log_data_check(config)
    try:
        BankRunner(config, app, api).serve_forever(stop)
    finally:
        api.close()
    log.info("bank runner for %s stopped", bank.name)
    return 0


def _log_data_check(config: "RunnerConfig") -> None:
    """`fedfin check-data`'s one-line summary of the bank's data against the public profile,
    before any task: logged here only, never sent. Needs [runner] public-encoder."""
    from fedfin.client.data_check import check_bank_data
    from fedfin.common.errors import FedfinError

    bank = config.bank
    if config.public_encoder is None:
        log.info(
            "data check skipped: no [runner] public-encoder in %s (run `fedfin check-data`)",
            config.path,
        )
        return
    try:
        check = check_bank_data(config.public_encoder, bank.data_path)
    except FedfinError as exc:
        log.warning("data check of %s failed: %s", bank.name, exc)
        return
    level = logging.INFO if check.verdict == "ok" else logging.WARNING
    log.log(level, "%s: %s", bank.name, check.summary_line())


def _run_app_hash(args: argparse.Namespace) -> int:
    from fedfin.client.clientappio import fab_bytes, fab_identity

    identity = fab_identity(fab_bytes(args.fab))
    if not identity.app:
        raise ConfigError(
            f"{args.fab}: not a FAB (no pyproject.toml with [tool.flwr.app] publisher and "
            "[project] name and version)"
        )
    print("[[runner.allow]]")
    print(f'app = "{identity.app}"')
    print(f'version = "{identity.version}"')
    print(f'fab-sha256 = "{identity.fab_sha256}"')
    return 0


def add_runner_commands(commands: "argparse._SubParsersAction[Any]") -> None:
    """Add `bank-runner` and `app-hash` to the `fedfin` command line."""
    runner = commands.add_parser(
        "bank-runner",
        help="bank: serve the SuperNode's tasks with the bank's own ClientApp (allow-listed apps)",
        description=(
            "Long-running. Claims the tasks of a SuperNode started with `--isolation process` "
            "over its local runtime API and answers them with this installation's fedfin "
            "ClientApp (torch kept warm). Runs whose app bundle is not on the config's "
            "allow-list get a declined reply; the bundle's code is never run. Stops on SIGTERM."
        ),
    )
    runner.add_argument(
        "--config", type=Path, required=True, help="the runner's TOML config (mode 600)"
    )
    runner.add_argument(
        "--verbose", action="store_true", help="also log where each task's time goes"
    )
    runner.set_defaults(run=_run_bank_runner)

    app_hash = commands.add_parser(
        "app-hash",
        help="bank: the allow-list entry (app, version, sha256) of a Flower app bundle",
        description=(
            "Print the [[runner.allow]] entry for a .fab file (`flwr build`) or for a project "
            "directory (the FAB `flwr run DIR` would ship), computed as the bank runner "
            "checks it."
        ),
    )
    app_hash.add_argument("fab", type=Path, help="a .fab file or a Flower project directory")
    app_hash.set_defaults(run=_run_app_hash)
