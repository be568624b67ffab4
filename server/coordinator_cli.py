"""Coordinator commands: the nginx door's config and the ServerApp executor's secret.

They live with the server role; `fedfin` only dispatches (see simulations/cli.py). Banks
use `exec-secret` too, for the secret their SuperNode and runner share.
"""

import argparse
import os
import secrets
from pathlib import Path
from typing import Any

from fedfin.common.atomic import write_atomically
from fedfin.common.errors import ConfigError

SECRET_BYTES = 32


def _run_proxy_config(args: argparse.Namespace) -> int:
    from fedfin.server.proxy_config import proxy_config_for, write_nginx_config

    config = proxy_config_for(
        args.certs, args.listen, args.superlink_port, args.prefix, args.max_body_mib
    )
    out = write_nginx_config(config, args.out)
    print(
        f"nginx config: {out} (listens on {args.listen}, forwards Fleet calls to "
        f"127.0.0.1:{config.superlink_port}); run: nginx -c {out} -p {config.prefix} "
        "-g 'daemon off;'"
    )
    return 0


def write_exec_secret(out: Path) -> Path:
    """Write a fresh random SuperExec secret, readable by its owner only."""
    if out.exists():
        raise ConfigError(f"{out} already exists; a new secret needs a new file")

    def write(tmp: Path) -> None:
        os.chmod(tmp, 0o600)
        tmp.write_bytes(secrets.token_bytes(SECRET_BYTES))

    write_atomically(out, write)
    return out


def _run_exec_secret(args: argparse.Namespace) -> int:
    out = write_exec_secret(args.out)
    print(
        f"SuperExec secret: {out} (mode 600): give the same bytes to both ends' "
        "--superexec-auth-secret-file (SuperLink and executor, or SuperNode and runner)"
    )
    return 0


def _port(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--superlink-port must be a port, got '{text}'") from None


def add_coordinator_commands(commands: "argparse._SubParsersAction[Any]") -> None:
    """Add `proxy-config` and `exec-secret` to the `fedfin` command line."""
    proxy = commands.add_parser(
        "proxy-config",
        help="coordinator: nginx config for the one public door (Fleet API only)",
        description=(
            "Write an nginx config that terminates TLS on --listen with the coordinator's "
            "certificate (--certs from `fedfin certs`) and forwards only the Fleet API calls "
            "of authenticated SuperNodes to the SuperLink on 127.0.0.1:--superlink-port. "
            "The Control and Runtime APIs are not reachable through it."
        ),
    )
    proxy.add_argument("--certs", type=Path, required=True, help="directory from `fedfin certs`")
    proxy.add_argument(
        "--listen", required=True, help="public HOST:PORT for the door, e.g. 0.0.0.0:9092"
    )
    proxy.add_argument(
        "--superlink-port", type=_port, required=True, help="the SuperLink's --port on 127.0.0.1"
    )
    proxy.add_argument(
        "--prefix", type=Path, required=True, help="nginx's own directory: pid, logs, temp files"
    )
    proxy.add_argument("--out", type=Path, required=True, help="the nginx.conf to write")
    proxy.add_argument(
        "--max-body-mib", type=int, default=64, help="largest request body (Flower chunks 5 MiB)"
    )
    proxy.set_defaults(run=_run_proxy_config)

    secret = commands.add_parser(
        "exec-secret",
        help="a random secret that authenticates an executor (ServerApp's, or a bank's runner)",
        description=(
            "Write 32 random bytes (mode 600) for --superexec-auth-secret-file: on the "
            "coordinator, of flower-superlink --isolation process and flower-superexec; in a "
            "bank, of flower-supernode --isolation process and the runner's config. Without "
            "it, anyone who reaches the runtime API could claim the task."
        ),
    )
    secret.add_argument("--out", type=Path, required=True, help="the secret file to create")
    secret.set_defaults(run=_run_exec_secret)
