"""The bank runner's own config file: where the SuperNode is, which apps it may serve, and
the bank's private settings.

The bank's settings (data path, state directory, privacy policy) live here and not in the
SuperNode's --node-config, so the SuperNode's OS user never learns where the data is.
The file is the runner user's alone (mode 600): whoever can edit it can widen the
allow-list or the budget. Every problem is one `ConfigError` naming the file and the key.

    [runner]
    runtime-api = "127.0.0.1:9094"            # flower-supernode --isolation process --port
    superexec-auth-secret-file = "exec.secret" # optional: flower-supernode's same flag
    public-encoder = "/srv/bank/pretrained"   # optional: the pretrained checkpoint the bank
                                              # checked; its data is checked against it at start
    [[runner.allow]]                          # one entry per app the bank accepts
    app = "fedfin/fedfin"
    version = "0.1.0"
    fab-sha256 = "<64 hex digits from `fedfin app-hash`>"
    [bank]                                    # the node-config keys of client/bank_settings.py
    bank-name = "bank-00"
    data-path = "/srv/bank/data"
    state-dir = "/srv/bank/state"
    epsilon-budget = 1.0
"""

import os
import re
import stat
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedfin.client.bank_settings import BankSettings, settings_from_node_config
from fedfin.client.clientappio import AppIdentity
from fedfin.common.config import PrivacyPolicy
from fedfin.common.errors import ConfigError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_RUNNER_KEYS = frozenset(
    {
        "runtime-api",
        "superexec-auth-secret-file",
        "runtime-root-certificates",
        "poll-interval",
        "torch-threads",
        "public-encoder",
        "allow",
    }
)
_ALLOW_KEYS = frozenset({"app", "version", "fab-sha256"})
_BANK_PATH_KEYS = ("data-path", "state-dir")
_BANK_KEYS = frozenset(
    {"bank-name", "test-fraction", "validation-fraction", "seed", *_BANK_PATH_KEYS}
    | {f.name.replace("_", "-") for f in fields(PrivacyPolicy)}
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
DEFAULT_POLL_SECONDS = 0.2


@dataclass(frozen=True)
class RunnerConfig:
    """The runner's settings; `bank` is exactly what the ClientApp gets for every message."""

    path: Path
    runtime_api: str
    allow: tuple[AppIdentity, ...]
    bank: BankSettings
    secret_file: Path | None = None
    root_certificates: Path | None = None
    poll_seconds: float = DEFAULT_POLL_SECONDS
    torch_threads: int | None = None
    public_encoder: Path | None = None  # `fedfin check-data` against it when the runner starts

    def allows(self, app: AppIdentity) -> bool:
        """An app runs only if name, version and the hash of its bytes all match one entry."""
        return app.fab_sha256 != "" and app in self.allow


def load_runner_config(path: Path) -> RunnerConfig:
    """Read and check the runner's config file; relative paths are relative to the file."""
    path = path.expanduser().absolute()
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the runner config ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    _only(path, "", document, {"runner", "bank"})
    runner = _table(path, document, "runner")
    _only(path, "runner", runner, _RUNNER_KEYS)
    runtime_api = _string(path, "runner", runner, "runtime-api")
    root_certificates = _optional_path(path, runner, "runtime-root-certificates")
    _check_address(path, runtime_api, tls=root_certificates is not None)
    poll = runner.get("poll-interval", DEFAULT_POLL_SECONDS)
    if isinstance(poll, bool) or not isinstance(poll, int | float) or not 0.01 <= poll <= 60:
        raise ConfigError(f"{path}: [runner] 'poll-interval' must be 0.01-60 seconds, got {poll!r}")
    threads = runner.get("torch-threads")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ConfigError(f"{path}: [runner] 'torch-threads' must be a positive integer")
    return RunnerConfig(
        path=path,
        runtime_api=runtime_api,
        allow=_allow_list(path, runner.get("allow")),
        bank=_bank_settings(path, _table(path, document, "bank")),
        secret_file=_optional_path(path, runner, "superexec-auth-secret-file"),
        root_certificates=root_certificates,
        poll_seconds=float(poll),
        torch_threads=threads,
        public_encoder=_optional_path(path, runner, "public-encoder"),
    )


def check_private(path: Path, what: str) -> None:
    """Refuse a file or directory that the group or others can read, write or enter."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot check the {what} ({exc.strerror})") from None
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{path}: the {what} must belong to the runner's user (uid {os.geteuid()})"
        )
    if info.st_mode & 0o077:
        wanted = "700" if stat.S_ISDIR(info.st_mode) else "600"
        raise ConfigError(
            f"{path}: the {what} is open to group or others (mode "
            f"{stat.S_IMODE(info.st_mode):03o}); chmod {wanted} it"
        )


def check_runner_files(config: RunnerConfig) -> None:
    """The config, the secret and the state directory are the runner user's alone.

    A missing state directory is created, private; the data may be shared with the bank's
    data team, so only its existence is checked.
    """
    check_private(config.path, "runner config")
    if config.secret_file is not None:
        check_private(config.secret_file, "SuperExec secret")
    state_dir = config.bank.state_dir
    if not state_dir.exists():
        try:
            state_dir.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ConfigError(
                f"{state_dir}: cannot create the state dir ({exc.strerror})"
            ) from None
    check_private(state_dir, "state dir")
    if not config.bank.data_path.exists():
        raise ConfigError(
            f"{config.path}: [bank] 'data-path' {config.bank.data_path} does not exist"
        )


def _allow_list(path: Path, entries: Any) -> tuple[AppIdentity, ...]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{path}: [[runner.allow]] needs at least one entry (app, version, fab-sha256; "
            "see `fedfin app-hash`)"
        )
    allowed = []
    for number, entry in enumerate(entries, start=1):
        where = f"runner.allow #{number}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: [{where}] must be a table")
        _only(path, where, entry, _ALLOW_KEYS)
        app = _string(path, where, entry, "app")
        if app.count("/") != 1 or app.startswith("/") or app.endswith("/"):
            raise ConfigError(f"{path}: [{where}] 'app' must be publisher/name, got '{app}'")
        digest = _string(path, where, entry, "fab-sha256").lower()
        if not _SHA256.fullmatch(digest):
            raise ConfigError(f"{path}: [{where}] 'fab-sha256' must be 64 hex digits")
        allowed.append(AppIdentity(app, _string(path, where, entry, "version"), digest))
    return tuple(allowed)


def _bank_settings(path: Path, bank: dict[str, Any]) -> BankSettings:
    _only(path, "bank", bank, _BANK_KEYS)
    values = dict(bank)
    for key in _BANK_PATH_KEYS:
        values[key] = str(path.parent / Path(_string(path, "bank", bank, key)).expanduser())
    for key, value in values.items():
        if isinstance(value, dict | list):
            raise ConfigError(f"{path}: [bank] '{key}' must be a single value")
    try:
        return settings_from_node_config(values)
    except ConfigError as exc:
        message = str(exc).removeprefix("node config ")
        raise ConfigError(f"{path}: [bank] {message}") from None


def _table(path: Path, document: dict[str, Any], name: str) -> dict[str, Any]:
    table = document.get(name)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{name}] section is required")
    return table


def _only(path: Path, where: str, table: dict[str, Any], known: frozenset[str] | set[str]) -> None:
    """An unknown key is an error: a misspelt policy key must not fall back to a default."""
    for key in table:
        if key not in known:
            place = f"[{where}] " if where else ""
            raise ConfigError(f"{path}: {place}unknown key '{key}'")


def _string(path: Path, where: str, table: dict[str, Any], key: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{path}: [{where}] '{key}' is required (a non-empty string)")
    return value.strip()


def _optional_path(path: Path, runner: dict[str, Any], key: str) -> Path | None:
    if key not in runner:
        return None
    return path.parent / Path(_string(path, "runner", runner, key)).expanduser()


def _check_address(path: Path, address: str, tls: bool) -> None:
    """host:port; without TLS the runtime API must be on loopback (it carries the tasks)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{path}: [runner] 'runtime-api' must be host:port, got '{address}'")
    if not tls and host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"{path}: [runner] 'runtime-api' {address} is not loopback; a remote runtime API "
            "needs 'runtime-root-certificates' (TLS)"
        )
