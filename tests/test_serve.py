"""`fedfin serve` over real HTTP on loopback: the in-process answers, and 422s that name the field.

The server is the real command in its own process (uvicorn), stopped by PID whatever happens.
"""

import http.client
import json
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from client.scoring import Scorer
from tests.conftest import Pretrained
from tests.harness.processes import started
from tests.test_scoring import TrainedBank, trained_bank

ROOT = Path(__file__).resolve().parents[1]
THRESHOLD = 0.1
# `fedfin serve` before it is wired into simulations/cli.py: the same parser and run function.
LAUNCH = (
    "import argparse, sys\n"
    "from simulations.cli_bank import add_bank_commands\n"
    "parser = argparse.ArgumentParser(prog='fedfin')\n"
    "add_bank_commands(parser.add_subparsers(dest='command', required=True))\n"
    "args = parser.parse_args()\n"
    "sys.exit(args.run(args))\n"
)


class Server(NamedTuple):
    port: int
    bank: TrainedBank
    scorer: Scorer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def request(port: int, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """One HTTP request with the standard library's client; returns (status, parsed JSON)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        connection.request(method, path, body=None if body is None else payload, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def wait_until_healthy(port: int, process: Any, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"fedfin serve exited early:\n{log.read_text()}")
        try:
            if request(port, "GET", "/health")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"fedfin serve not healthy after {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    bank = trained_bank(pretrained, tmp_path_factory)
    port = free_port()
    command = [
        sys.executable,
        "-c",
        LAUNCH,
        "serve",
        "--state-dir",
        str(bank.state_dir),
        "--encoder",
        str(bank.encoder_dir),
        "--port",
        str(port),
        "--threshold",
        str(THRESHOLD),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with started(command, env, log, cwd=ROOT) as process:
        wait_until_healthy(port, process, log)
        yield Server(port, bank, Scorer.load(bank.state_dir, bank.encoder_dir))


def _application(server: Server, row: int = 0) -> dict[str, Any]:
    """A row of the bank's data as a client would send it: its features only, JSON types."""
    record = json.loads(server.bank.applications.iloc[[row]].to_json(orient="records"))[0]
    return {name: record[name] for name in server.scorer.feature_names}


def test_health_says_which_model_is_served(server: Server) -> None:
    status, body = request(server.port, "GET", "/health")

    assert status == 200
    assert body["status"] == "ok"
    assert body["features"] == list(server.scorer.feature_names)
    assert body["schema_fingerprint"] == server.scorer.schema.fingerprint
    assert body["explain"] is True


def test_score_over_http_is_the_in_process_score_with_a_decision(server: Server) -> None:
    for row in range(0, 40, 4):
        application = _application(server, row)

        status, body = request(server.port, "POST", "/score", application)

        expected = server.scorer.score_one(application)
        assert status == 200
        assert body["default_probability"] == pytest.approx(expected, abs=1e-12)
        assert body["decision"] == ("decline" if expected >= THRESHOLD else "approve")


def test_null_means_missing_and_is_imputed_as_in_training(server: Server) -> None:
    application = {**_application(server), "annual_inc": None, "emp_length": None}

    status, body = request(server.port, "POST", "/score", application)

    assert status == 200
    assert body["default_probability"] == pytest.approx(
        server.scorer.score_one(application), abs=1e-12
    )


def test_explain_over_http_gives_attributions_that_add_up(server: Server) -> None:
    application = _application(server, 3)

    status, body = request(server.port, "POST", "/explain", application)

    assert status == 200
    assert body["space"] == "log-odds of default"
    assert {a["feature"] for a in body["attributions"]} == set(server.scorer.feature_names)
    logit = math.log(body["default_probability"] / (1 - body["default_probability"]))
    reference = math.log(body["reference_probability"] / (1 - body["reference_probability"]))
    total = sum(a["attribution"] for a in body["attributions"])
    assert total == pytest.approx(logit - reference, abs=1e-5)
    assert abs(body["convergence_delta"]) < 1e-6
    positive = [a["feature"] for a in body["attributions"] if a["attribution"] > 0]
    assert body["top_reasons"] == positive[:5]


@pytest.mark.parametrize(
    "change, field, message",
    [
        ({"branch_code": "X1"}, "branch_code", "unknown field"),
        ({"int_rate": "high"}, "int_rate", "valid number"),
        ({"funded_amnt": [1, 2]}, "funded_amnt", "valid number"),
        ({"term": {"months": 36}}, "term", "valid string"),
        ({"annual_inc": "__inf__"}, "annual_inc", "finite number"),
    ],
)
def test_bad_fields_are_a_422_naming_the_field(
    server: Server, change: dict[str, object], field: str, message: str
) -> None:
    application = {**_application(server), **change}
    raw = json.dumps(application).replace('"__inf__"', "Infinity").encode()
    for path in ("/score", "/explain"):
        status, body = request(server.port, "POST", path, raw)

        assert status == 422
        assert f"field '{field}'" in body["detail"] and message in body["detail"]


def test_a_missing_field_is_a_422_naming_it(server: Server) -> None:
    application = _application(server)
    del application["sub_grade"]

    status, body = request(server.port, "POST", "/score", application)

    assert status == 422
    assert body["detail"] == "field 'sub_grade': Field required"


def test_a_body_that_is_not_one_json_object_is_a_422(server: Server) -> None:
    for raw in (b"[1, 2]", b"{not json", b"null"):
        status, body = request(server.port, "POST", "/score", raw)

        assert status == 422
        assert body["detail"]


def test_no_page_loads_scripts_from_outside_the_bank(server: Server) -> None:
    """FastAPI's interactive docs fetch JavaScript from a CDN; the service does not offer them."""
    assert request(server.port, "GET", "/docs")[0] == 404
    assert request(server.port, "GET", "/redoc")[0] == 404
