"""A real Flower deployment on loopback, run exactly as docs/deployment.md says.

One deployment serves the whole module: scripts/deployment_demo.sh --hold starts a SuperLink
on 127.0.0.1 (TLS, SuperNode auth, process isolation), an authenticated ServerApp executor,
the nginx door, and three banks (a SuperNode that executes nothing plus the bank's own
runner), runs a federation and keeps it all running. The tests then check what a
coordinator and the banks would check, and what an outsider who holds only `ca.crt` and
the door's address can and cannot do. Each docs/deployment.md claim names its test here.
"""

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedfin.common.checkpoint import load_encoder_checkpoint
from fedfin.common.errors import ConfigError
from fedfin.common.ledger import PrivacyLedger
from fedfin.server.certificates import create_certificates
from fedfin.server.proxy_config import FLEET_PATHS, proxy_config_for, render_nginx_config
from tests.harness.bank_runner_deployment import free_port_block
from tests.harness.processes import descendants, flower_env, started, stop
from tests.harness.sockets import listening_addresses

ROOT = Path(__file__).resolve().parents[1]
BANKS = ("bank-00", "bank-01", "bank-02")
EPSILON_BUDGET = 1.0  # the demo's epsilon-budget for every bank
FEDFIN = [sys.executable, "-m", "fedfin.simulations.cli"]
READY_TIMEOUT_S = 480


@dataclass(frozen=True)
class Deployment:
    """The live demo: its directory, ports, the coordinator's environment, its PIDs."""

    work: Path
    base_port: int
    env: dict[str, str]  # the coordinator's: FLWR_HOME with the loopback Control API
    ready: bool
    log: Path

    @property
    def link(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    @property
    def door(self) -> str:
        return f"127.0.0.1:{self.base_port + 1}"

    @property
    def ca(self) -> Path:
        return self.work / "certs" / "ca.crt"

    def node_dir(self, bank: str) -> Path:
        """The bank's SuperNode directory: its private key and its copy of the exec secret."""
        return self.work / "banks" / bank / "node"

    def pid(self, name: str) -> int:
        """The PID the demo recorded for the process it named `name` (its log's stem)."""
        for line in (self.work / "pids").read_text().splitlines():
            pid, _, recorded = line.partition(" ")
            if recorded == name:
                return int(pid)
        raise KeyError(name)

    def require_ready(self) -> None:
        assert self.ready, self.log.read_text()[-6000:]


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("deployment")
    work = base / "demo"
    env = flower_env(base / "flwr-home")
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"
    env["ROUNDS"] = "1"  # one round shows every property; a second only costs CI minutes
    port = free_port_block(8)
    log = base / "demo.log"
    command = ["bash", str(ROOT / "scripts" / "deployment_demo.sh"), str(work), str(port), "--hold"]
    with started(command, env, log) as demo:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (work / "ready").exists() and demo.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        coordinator = dict(env, FLWR_HOME=str(work / "flwr-home"))
        yield Deployment(work, port, coordinator, (work / "ready").exists(), log)


@pytest.fixture(scope="module")
def outsider(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An outsider's Flower CLI: it holds ca.crt and the door's address, nothing else."""
    home = tmp_path_factory.mktemp("outsider-home")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "door"\n\n[superlink.door]\naddress = "{deployment.door}"\n'
        f'root-certificates = "{deployment.ca}"\n'
    )
    return dict(deployment.env, FLWR_HOME=str(home))


def _flwr(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["flwr", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _flwr_at_once(
    env: dict[str, str], attempts: dict[str, list[str]], timeout: float = 120
) -> dict[str, tuple[int | None, str]]:
    """Run several `flwr` commands at the same time: name -> (exit code, output)."""
    processes = {
        name: subprocess.Popen(
            ["flwr", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name, args in attempts.items()
    }
    results: dict[str, tuple[int | None, str]] = {}
    try:
        for name, process in processes.items():
            try:
                output, _ = process.communicate(timeout=timeout)
                results[name] = (process.returncode, output.decode(errors="replace"))
            except subprocess.TimeoutExpired:
                results[name] = (None, "timed out")
    finally:
        for process in processes.values():
            if process.poll() is None:
                stop(process)
    return results


def _flwr_json(env: dict[str, str], *args: str) -> dict[str, Any]:
    result = _flwr(env, *args, "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    payload: dict[str, Any] = json.loads(result.stdout)
    return payload


def _nodes(deployment: Deployment) -> dict[str, str]:
    """node ID -> status, from the coordinator's own `flwr supernode list`."""
    listed = _flwr_json(deployment.env, "supernode", "list", "fedfin")
    return {str(node["node-id"]): node["status"] for node in listed["nodes"]}


def _runs(deployment: Deployment) -> dict[str, str]:
    """run ID -> status, from the coordinator's own `flwr ls`."""
    listed = _flwr_json(deployment.env, "ls", "fedfin")
    return {str(run["run-id"]): run["status"] for run in listed["runs"]}


def _wait_until(predicate: Any, timeout: float, every: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def _run_to_exit(command: list[str], env: dict[str, str], log: Path, timeout: float) -> int | None:
    """Exit code of a process that should end by itself; None (and stopped) if it does not."""
    with started(command, env, log) as process:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def _supernode(
    deployment: Deployment, key: Path, port: int, with_ca: bool = True, retries: bool = True
) -> list[str]:
    """A SuperNode through the door; without `with_ca` it checks against the system's CAs."""
    command = [
        "flower-supernode",
        "--superlink",
        deployment.door,
        "--auth-supernode-private-key",
        str(key),
        "--port",
        str(port),
        "--isolation",
        "process",  # nothing here may execute a ClientApp
    ]
    if retries:
        command += ["--max-retries", "2", "--max-wait-time", "20"]
    if with_ca:
        command += ["--root-certificates", str(deployment.ca)]
    return command


def _tiny_app(dest: Path) -> Path:
    """A Flower app that calls itself fedfin/fedfin 0.1.0: bundled in a second, never run."""
    dest.mkdir(parents=True)
    (dest / "pyproject.toml").write_text(
        '[project]\nname = "fedfin"\nversion = "0.1.0"\ndependencies = []\n\n'
        '[tool.flwr.app]\npublisher = "fedfin"\n\n'
        '[tool.flwr.app.components]\nserverapp = "tiny:server"\nclientapp = "tiny:client"\n\n'
        "[tool.flwr.app.config]\n"
    )
    (dest / "tiny.py").write_text("server = None\nclient = None\n")
    return dest


# --- The door's config, without a deployment ---------------------------------------------


def test_the_door_forwards_only_the_fleet_calls_of_a_registered_supernode() -> None:
    """If Flower adds, renames or moves a Fleet call, this fails before a deployment does."""
    from flwr.superlink.routers.fleet.router import router

    flower_fleet = {route.path for route in router.routes}  # type: ignore[attr-defined]
    self_registration = {"/v1/fleet/register-node", "/v1/fleet/unregister-node"}
    assert set(FLEET_PATHS) == flower_fleet - self_registration
    assert all(path.startswith("/v1/fleet/") for path in FLEET_PATHS)


def test_the_door_config_refuses_a_certificate_nginx_cannot_check(tmp_path: Path) -> None:
    """nginx verifies the SuperLink by DNS name: an IP-only certificate is refused up front."""
    create_certificates(tmp_path / "ip-only", ["127.0.0.1"])
    with pytest.raises(ConfigError, match="names no DNS host"):
        proxy_config_for(tmp_path / "ip-only", "0.0.0.0:9092", 9093, tmp_path / "door")
    create_certificates(tmp_path / "named", ["superlink.example.org", "10.0.0.5"])
    with pytest.raises(ConfigError, match="must differ"):
        proxy_config_for(tmp_path / "named", "0.0.0.0:9092", 9092, tmp_path / "door")
    config = proxy_config_for(tmp_path / "named", "0.0.0.0:9092", 9093, tmp_path / "door")
    text = render_nginx_config(config)
    assert "proxy_ssl_name superlink.example.org;" in text and "proxy_ssl_verify on;" in text
    directives = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    forwarded = [line.split()[-1] for line in directives if "proxy_pass" in line]
    assert forwarded == [f"https://superlink{path};" for path in FLEET_PATHS]


def test_proxy_config_and_exec_secret_from_the_command_line(tmp_path: Path) -> None:
    """A missing certs dir is one line and exit 2; a secret is 32 bytes, mode 600, never reused."""

    def fedfin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FEDFIN, *args], cwd=ROOT, capture_output=True, text=True)

    door = ["--listen", "0.0.0.0:9092", "--superlink-port", "9093", "--prefix", str(tmp_path)]
    missing = fedfin("proxy-config", "--certs", str(tmp_path / "none"), *door, "--out", "x")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "fedfin certs" in missing.stderr

    secret = tmp_path / "exec.secret"
    assert fedfin("exec-secret", "--out", str(secret)).returncode == 0
    assert len(secret.read_bytes()) == 32 and secret.stat().st_mode & 0o777 == 0o600
    first = secret.read_bytes()
    again = fedfin("exec-secret", "--out", str(secret))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert secret.read_bytes() == first


# --- What the coordinator and the banks check ---------------------------------------------


def test_the_run_completes_according_to_flwr_ls(deployment: Deployment) -> None:
    deployment.require_ready()
    runs = json.loads((deployment.work / "runs.json").read_text())
    assert runs["success"] and runs["runs"][0]["status"] == "finished:completed"


def test_each_bank_keeps_its_ledger_and_head_in_its_state_dir(deployment: Deployment) -> None:
    """At least one DP training release, ε within budget, and `fedfin audit` passed (exit 0)."""
    deployment.require_ready()  # ready is written only after every bank's audit exited 0
    for bank in BANKS:
        state = deployment.work / "state" / bank
        assert (state / "head.npz").exists()
        entries = PrivacyLedger(state).entries()
        assert any(entry["kind"] == "train" for entry in entries)
        assert all(entry["bank"] == bank for entry in entries)
        assert max(e["epsilon_cumulative"] for e in entries) <= EPSILON_BUDGET
        audit = json.loads((deployment.work / f"audit-{bank}.json").read_text())
        assert audit["ok"]


def test_the_global_encoder_changed(deployment: Deployment) -> None:
    deployment.require_ready()
    start = load_encoder_checkpoint(deployment.work / "encoder").arrays
    final = load_encoder_checkpoint(deployment.work / "server" / "final").arrays
    assert any(not np.array_equal(start[k], final[k]) for k in start)


def test_only_the_door_listens_for_banks_everything_else_on_loopback(
    deployment: Deployment,
) -> None:
    """SuperLink (Fleet, Control, Runtime APIs), executor and SuperNodes bind 127.0.0.1 only."""
    deployment.require_ready()

    def listening(name: str) -> set[tuple[str, int]]:
        pid = deployment.pid(name)
        return listening_addresses([pid, *descendants(pid)])

    assert listening("superlink") == {("127.0.0.1", deployment.base_port)}
    assert listening("superexec") == set()
    assert listening("door") == {("127.0.0.1", deployment.base_port + 1)}
    for offset, bank in enumerate(BANKS, start=2):
        assert listening(f"supernode-{bank}") == {("127.0.0.1", deployment.base_port + offset)}
        assert listening(f"runner-{bank}") == set()


def test_each_banks_keys_secrets_and_runner_config_are_private(deployment: Deployment) -> None:
    """The SuperNode's key and secret, the runner's config and secret: mode 600 in 700 dirs."""
    deployment.require_ready()
    for bank in BANKS:
        node, runner = deployment.node_dir(bank), deployment.work / "banks" / bank / "runner"
        for directory in (node, runner):
            assert directory.stat().st_mode & 0o777 == 0o700, directory
        for private in (node / bank, node / "exec.secret", runner / "exec.secret"):
            assert private.stat().st_mode & 0o777 == 0o600, private
        assert (runner / "runner.toml").stat().st_mode & 0o777 == 0o600


# --- What an outsider with ca.crt and the door's address cannot do -------------------------


def test_the_public_door_refuses_the_control_api(
    deployment: Deployment, outsider: dict[str, str], tmp_path: Path
) -> None:
    """register, run, ls, stop and log fail through the door; the coordinator's own work."""
    deployment.require_ready()
    subprocess.run(
        [*FEDFIN, "keys", "--out", str(tmp_path), "--name", "intruder"],
        check=True,
        cwd=ROOT,
        env=outsider,
        capture_output=True,
    )
    run_id = json.loads((deployment.work / "runs.json").read_text())["runs"][0]["run-id"]
    attempts = {
        "register": ["supernode", "register", str(tmp_path / "intruder.pub"), "door"],
        "ls": ["ls", "door"],
        "stop": ["stop", run_id, "door"],
        "log": ["log", run_id, "door", "--show"],
        "supernode list": ["supernode", "list", "door"],
        "run": ["run", str(_tiny_app(tmp_path / "app")), "door"],
    }
    for name, (code, output) in _flwr_at_once(outsider, attempts).items():
        assert code not in (None, 0), f"flwr {name} through the door: {output}"
        assert "404 Not Found" in output, f"flwr {name}: {output}"

    assert list(_nodes(deployment).values()) == ["online"] * len(BANKS)  # no intruder key
    assert _runs(deployment) == {run_id: "finished:completed"}  # and nothing was started


def _door_status(deployment: Deployment, method: str, path: str) -> int:
    host, port = deployment.door.split(":")
    context = ssl.create_default_context(cafile=str(deployment.ca))
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=15)
    try:
        connection.request(method, path, body=b"", headers={"content-type": "application/protobuf"})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_the_door_passes_no_other_path_however_it_is_spelled(deployment: Deployment) -> None:
    """Control, Runtime, health, docs, self-registration, dot segments: none reach Flower."""
    deployment.require_ready()
    probe = uuid.uuid4().hex
    refused = [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/runtime/acquire-task"),
        ("POST", "/v1/fleet/register-node"),
        ("POST", "/v1/fleet/unregister-node"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("POST", "/v1/fleet/pull-messages/../../control/list-runs"),
        ("POST", "//v1/control/list-runs"),
        ("GET", "/health"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/v1/fleet/pull-messages"),
    ]
    for method, path in refused:
        status = _door_status(deployment, method, f"{path}?probe={probe}")
        assert status in (403, 404), f"{method} {path}: {status}"

    # A Fleet call does reach the SuperLink, which refuses it without a node's signature.
    assert _door_status(deployment, "POST", f"/v1/fleet/pull-messages?probe={probe}") == 401
    seen = [
        line
        for line in (deployment.work / "superlink.log").read_text().splitlines()
        if probe in line
    ]
    assert seen and all("/v1/fleet/pull-messages" in line for line in seen), seen


def test_strangers_are_kept_out(deployment: Deployment, tmp_path: Path) -> None:
    """Through the door: an unregistered key (Flower's 305), no CA, no TLS; wrong CA named."""
    deployment.require_ready()
    subprocess.run(
        [*FEDFIN, "keys", "--out", str(tmp_path), "--name", "stranger"],
        check=True,
        cwd=ROOT,
        env=deployment.env,
        capture_output=True,
    )
    stranger_log, no_ca_log = tmp_path / "stranger.log", tmp_path / "no-ca.log"
    with (
        started(
            _supernode(deployment, tmp_path / "stranger", deployment.base_port + 5),
            deployment.env,
            stranger_log,
        ) as stranger,
        started(
            _supernode(
                deployment,
                deployment.node_dir("bank-00") / "bank-00",
                deployment.base_port + 6,
                with_ca=False,
            ),
            deployment.env,
            no_ca_log,
        ) as no_ca,
    ):
        for process, log in ((stranger, stranger_log), (no_ca, no_ca_log)):
            try:
                code: int | None = process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                code = None
            assert code not in (None, 0), log.read_text()[-2000:]
    assert "exit-codes/305" in stranger_log.read_text()  # "node not registered"
    assert len(_nodes(deployment)) == len(BANKS)

    # Without TLS the door answers 400 itself (Flower's SuperNode will not even try: with a
    # key it requires TLS, exit code 303); nothing reaches the SuperLink.
    probe = uuid.uuid4().hex
    host, port = deployment.door.split(":")
    plain = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        plain.request("POST", f"/v1/fleet/pull-messages?probe={probe}", body=b"")
        assert plain.getresponse().status == 400
    finally:
        plain.close()
    assert probe not in (deployment.work / "superlink.log").read_text()

    subprocess.run(
        [*FEDFIN, "certs", "--out", str(tmp_path / "other"), "--host", "localhost"],
        check=True,
        cwd=ROOT,
        env=deployment.env,
        capture_output=True,
    )
    wrong_ca = subprocess.run(
        [
            *FEDFIN,
            "check-connection",
            "--superlink",
            deployment.door,
            "--root-certificates",
            str(tmp_path / "other" / "ca.crt"),
        ],
        cwd=ROOT,
        env=deployment.env,
        capture_output=True,
        text=True,
    )
    assert wrong_ca.returncode == 2
    assert "not signed by" in wrong_ca.stderr and wrong_ca.stderr.count("\n") == 1


# --- Key rotation, revocation, and the executor's secret -----------------------------------


def test_a_rotated_key_joins_and_the_revoked_key_is_refused(
    deployment: Deployment, tmp_path: Path
) -> None:
    """bank-02 rotates: register the new key, start with it, unregister the old node."""
    deployment.require_ready()
    keys = deployment.node_dir("bank-02")
    subprocess.run(
        [*FEDFIN, "keys", "--out", str(keys), "--name", "bank-02-next"],
        check=True,
        cwd=ROOT,
        env=deployment.env,
        capture_output=True,
    )
    new_id = str(
        _flwr_json(
            deployment.env, "supernode", "register", str(keys / "bank-02-next.pub"), "fedfin"
        )["node-id"]
    )
    old_id = (deployment.work / "coordinator" / "nodes" / "bank-02").read_text().strip()
    old_supernode = deployment.pid("supernode-bank-02")
    new_supernode = _supernode(
        deployment, keys / "bank-02-next", deployment.base_port + 5, retries=False
    )
    with started(new_supernode, deployment.env, tmp_path / "rotated.log") as rotated:
        rotated_log = tmp_path / "rotated.log"
        assert _wait_until(lambda: "SuperNode ID" in rotated_log.read_text(), 60), (
            rotated_log.read_text()[-2000:]
        )
        assert _nodes(deployment)[new_id] == "online"

        revoke = _flwr(deployment.env, "supernode", "unregister", old_id, "fedfin")
        assert revoke.returncode == 0, revoke.stdout + revoke.stderr
        assert _wait_until(lambda: not _alive(old_supernode), 60)  # cut off at its next call

        code = _run_to_exit(
            _supernode(deployment, keys / "bank-02", deployment.base_port + 6),
            deployment.env,
            tmp_path / "revoked.log",
            timeout=120,
        )
        assert code not in (None, 0)
        assert "exit-codes/305" in (tmp_path / "revoked.log").read_text()
        assert rotated.poll() is None
        nodes = _nodes(deployment)
        assert nodes[old_id] == "unregistered" and nodes[new_id] == "online"


def test_only_the_executor_with_the_secret_can_claim_the_serverapp_task(
    deployment: Deployment, tmp_path: Path
) -> None:
    """With the executor stopped, a new run waits; executors without the secret cannot take it.

    Runs last: it stops the demo's executor.
    """
    deployment.require_ready()
    executor = deployment.pid("superexec")
    os.killpg(executor, signal.SIGTERM)  # our own process group (setsid in the demo)
    assert _wait_until(lambda: not _alive(executor), 30)

    launched = _flwr(deployment.env, "run", str(_tiny_app(tmp_path / "app")), "fedfin")
    assert launched.returncode == 0, launched.stdout + launched.stderr
    runs = _runs(deployment)
    pending = [run for run, status in runs.items() if status == "pending"]
    assert len(pending) == 1, runs

    (tmp_path / "wrong.secret").write_bytes(os.urandom(32))
    rogue = [
        "flower-superexec",
        "--runtime-api-address",
        deployment.link,
        "--root-certificates",
        str(deployment.ca),
    ]
    wrong_secret = ["--superexec-auth-secret-file", str(tmp_path / "wrong.secret")]
    no_secret_log, wrong_secret_log = tmp_path / "no-secret.log", tmp_path / "wrong-secret.log"
    with (
        started(rogue, deployment.env, no_secret_log) as no_secret,
        started([*rogue, *wrong_secret], deployment.env, wrong_secret_log) as with_wrong_secret,
    ):
        for process, log in ((no_secret, no_secret_log), (with_wrong_secret, wrong_secret_log)):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pytest.fail(f"a rogue executor kept polling: {log.read_text()[-2000:]}")
    assert _runs(deployment)[pending[0]] == "pending"
    refusals = (
        (deployment.work / "superlink.log").read_text().count("SuperExec authentication failed")
    )
    assert refusals >= 2

    stop = _flwr(deployment.env, "stop", pending[0], "fedfin")  # the coordinator's own CLI
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert _runs(deployment)[pending[0]] == "finished:stopped"  # no executor ever took it
