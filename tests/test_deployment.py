"""A real Flower deployment on loopback: SuperLink with TLS and SuperNode auth, 3 banks.

Runs scripts/deployment_demo.sh (the commands of docs/deployment.md), then checks what a
coordinator and the banks would check, and that strangers are kept out.
"""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.checkpoint import load_encoder_checkpoint
from common.ledger import PrivacyLedger
from tests.harness.processes import flower_env, run_to_end, started

ROOT = Path(__file__).resolve().parents[1]
BANKS = ("bank-00", "bank-01", "bank-02")
FEDFIN = [sys.executable, "-m", "simulations.cli"]


def free_port_block(size: int) -> int:
    """A base port with `size` free ports after it (checked, not guaranteed)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + size >= 65535:
            continue
        ok = True
        for port in range(base, base + size):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("deployment")
    env = flower_env(work / "flwr-home")
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"
    log = work / "demo.log"
    code = run_to_end(
        [
            "bash",
            str(ROOT / "scripts" / "deployment_demo.sh"),
            str(work / "demo"),
            str(free_port_block(8)),
        ],
        env,
        log,
        timeout=540,
    )
    return {"work": work / "demo", "code": code, "log": log.read_text(), "env": env}


def test_the_run_completes_according_to_flwr_ls(deployment: dict[str, Any]) -> None:
    assert deployment["code"] == 0, deployment["log"][-5000:]
    runs = json.loads((deployment["work"] / "runs.json").read_text())
    assert runs["success"] and runs["runs"][0]["status"] == "finished:completed"


def test_each_bank_keeps_its_ledger_and_head_in_its_state_dir(deployment: dict[str, Any]) -> None:
    for bank in BANKS:
        state = deployment["work"] / "state" / bank
        assert (state / "head.npz").exists()
        entries = PrivacyLedger(state).entries()
        assert [e["kind"] for e in entries] == ["train", "evaluate", "train", "evaluate"]
        assert entries[-1]["bank"] == bank and entries[-1]["epsilon_cumulative"] <= 1.0
        audit = json.loads((deployment["work"] / f"audit-{bank}.json").read_text())
        assert audit["ok"]


def test_the_global_encoder_changed(deployment: dict[str, Any]) -> None:
    start = load_encoder_checkpoint(deployment["work"] / "encoder").arrays
    final = load_encoder_checkpoint(deployment["work"] / "server" / "final").arrays
    assert any(not np.array_equal(start[k], final[k]) for k in start)


def _superlink(work: Path, port: int) -> list[str]:
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(work / "certs" / "ca.crt"),
        "--ssl-certfile",
        str(work / "certs" / "server.pem"),
        "--ssl-keyfile",
        str(work / "certs" / "server.key"),
        "--enable-supernode-auth",
        "--database",
        str(work / "strangers.db"),
        "--disable-runtime-dependency-installation",
        "--port",
        str(port),
    ]


def _supernode(work: Path, port: int, key: str, own_port: int, ca: bool) -> list[str]:
    command = [
        "flower-supernode",
        "--superlink",
        f"127.0.0.1:{port}",
        "--auth-supernode-private-key",
        str(work / "keys" / key),
        "--port",
        str(own_port),
        "--max-retries",
        "2",
        "--max-wait-time",
        "20",
        "--node-config",
        f"data-path='{work}' state-dir='{work / 'stranger'}'",
    ]
    if ca:
        command += ["--root-certificates", str(work / "certs" / "ca.crt")]
    return command


def _wait(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_strangers_are_kept_out(deployment: dict[str, Any], tmp_path: Path) -> None:
    """An unregistered key is refused (Flower's code 305); without the CA nothing connects."""
    work, env = deployment["work"], deployment["env"]
    subprocess.run(
        [*FEDFIN, "keys", "--out", str(work / "keys"), "--name", "stranger"],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    port = free_port_block(4)
    with started(_superlink(work, port), env, tmp_path / "superlink.log"):
        deadline = time.monotonic() + 60
        check: subprocess.CompletedProcess[str] | None = None
        while time.monotonic() < deadline:
            check = subprocess.run(
                [
                    *FEDFIN,
                    "check-connection",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--root-certificates",
                    str(work / "certs" / "ca.crt"),
                ],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            if check.returncode == 0:
                break
            time.sleep(1)
        assert check is not None and check.returncode == 0, check.stderr if check else ""

        with started(
            _supernode(work, port, "stranger", port + 1, ca=True), env, tmp_path / "stranger.log"
        ) as stranger:
            code = _wait(stranger, 90)
            log = (tmp_path / "stranger.log").read_text()
            assert code not in (None, 0), log[-2000:]
            assert "exit-codes/305" in log  # Flower's "node not registered" exit code

        with started(
            _supernode(work, port, "bank-00", port + 2, ca=False), env, tmp_path / "no-ca.log"
        ) as no_ca:
            code = _wait(no_ca, 120)
            assert code not in (None, 0), (tmp_path / "no-ca.log").read_text()[-2000:]

        wrong_ca = subprocess.run(
            [
                *FEDFIN,
                "check-connection",
                "--superlink",
                f"127.0.0.1:{port}",
                "--root-certificates",
                str(_other_ca(tmp_path, env)),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        assert wrong_ca.returncode == 2
        assert "not signed by" in wrong_ca.stderr and wrong_ca.stderr.count("\n") == 1


def _other_ca(tmp_path: Path, env: dict[str, str]) -> Path:
    subprocess.run(
        [*FEDFIN, "certs", "--out", str(tmp_path / "other"), "--host", "localhost"],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
    )
    return tmp_path / "other" / "ca.crt"
