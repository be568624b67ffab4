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

from fedfin.client.scoring import Scorer
from tests.conftest import Pretrained, TrainedBank, trained_bank
from tests.harness.processes import started

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


MAX_BATCH = 50


class Server(NamedTuple):
    port: int
    bank: TrainedBank
    scorer: Scorer
    request_log: Path


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
        "--max-batch",
        str(MAX_BATCH),
        "--request-log",
        str(request_log := tmp_path_factory.mktemp("serve-requests") / "requests.jsonl"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with started(command, env, log, cwd=ROOT) as process:
        wait_until_healthy(port, process, log)
        yield Server(port, bank, Scorer.load(bank.state_dir, bank.encoder_dir), request_log)


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


def test_drift_without_a_reference_says_why_and_scoring_goes_on(server: Server) -> None:
    """The real command on a bank that never ran choose-model: nothing to watch against."""
    status, body = request(server.port, "GET", "/drift")

    assert status == 200
    assert body["watching"] is False and "fedfin choose-model" in body["note"]


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
        ({"default_probability": 0.5}, "default_probability", "rename it"),
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
    assert body["detail"] == (
        "field 'sub_grade': required feature is missing (send null if unknown: it is imputed)"
    )


def test_a_body_that_is_not_one_json_object_is_a_422(server: Server) -> None:
    for raw in (b"[1, 2]", b"{not json", b"null"):
        status, body = request(server.port, "POST", "/score", raw)

        assert status == 422
        assert body["detail"]


def test_no_page_loads_scripts_from_outside_the_bank(server: Server) -> None:
    """FastAPI's interactive docs fetch JavaScript from a CDN; the service does not offer them."""
    assert request(server.port, "GET", "/docs")[0] == 404
    assert request(server.port, "GET", "/redoc")[0] == 404


# --- issue 15: the same column rules as `fedfin score`, batches, versions, a request log ----


def test_an_id_and_extra_fields_are_kept_out_of_the_model_and_the_id_comes_back(
    server: Server,
) -> None:
    application = _application(server, 5)
    extended = {**application, "id": "loan-0005", "branch_code": "X1", "Class": "bad"}

    status, body = request(server.port, "POST", "/score", extended)

    assert status == 200 and body["id"] == "loan-0005"
    assert body["default_probability"] == pytest.approx(
        server.scorer.score_one(application), abs=1e-12
    )
    assert body["model_version"] == server.scorer.card["model_version"]
    assert body["request_id"] and body["imputed"] == [] and body["unseen_categories"] == {}


def test_a_batch_is_scored_in_order_with_reason_codes_and_one_model_version(
    server: Server,
) -> None:
    applications = [{**_application(server, row), "id": row} for row in range(12)]

    status, body = request(server.port, "POST", "/score", applications)

    assert status == 200 and body["model_version"] == server.scorer.card["model_version"]
    assert [r["id"] for r in body["results"]] == list(range(12))
    for application, result in zip(applications, body["results"], strict=True):
        assert result["default_probability"] == pytest.approx(
            server.scorer.score_one(application), abs=1e-12
        )
        assert all(code.split("_")[0] for code in result["reason_codes"])
        assert len(result["reason_codes"]) <= 4
    single = request(server.port, "POST", "/score", applications[3])[1]
    assert single["reason_codes"] == body["results"][3]["reason_codes"]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda apps: [], "an empty list"),
        (lambda apps: apps * (MAX_BATCH // len(apps) + 1), f"at most {MAX_BATCH} a request"),
        (
            lambda apps: [apps[0], {**apps[1], "int_rate": "high"}],
            "application 1: field 'int_rate'",
        ),
        (lambda apps: [apps[0], "loan"], "application 1: expected a JSON object"),
        (lambda apps: [{**apps[0], "id": [1]}], "application 0: field 'id'"),
        (lambda apps: [{k: v for k, v in apps[0].items() if k != "term"}], "field 'term'"),
    ],
)
def test_a_bad_batch_is_one_422_naming_the_application_and_field(
    server: Server, make: Any, words: str
) -> None:
    applications = [_application(server, row) for row in range(3)]

    status, body = request(server.port, "POST", "/score", make(applications))

    assert status == 422 and words in body["detail"], body
    assert body["model_version"] == server.scorer.card["model_version"]


def test_an_empty_value_is_imputed_and_an_unseen_category_is_flagged(server: Server) -> None:
    application = {**_application(server), "annual_inc": "", "sub_grade": "Z9"}

    status, body = request(server.port, "POST", "/score", application)

    assert status == 200
    assert body["imputed"] == ["annual_inc"]
    assert body["unseen_categories"] == {"sub_grade": "Z9"}
    expected = server.scorer.score_one({**application, "annual_inc": None, "sub_grade": None})
    assert body["default_probability"] == pytest.approx(expected, abs=1e-12)


def test_every_request_is_one_log_line_without_applicant_data(server: Server) -> None:
    applications = [{**_application(server, row), "id": f"app-{row}"} for row in range(3)]
    headers_id = "req-issue-15"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(
            "POST",
            "/score",
            body=json.dumps(applications).encode(),
            headers={"Content-Type": "application/json", "X-Request-ID": headers_id},
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.getheader("X-Request-ID") == headers_id == answer["request_id"]
    finally:
        connection.close()

    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not lines:
        text = server.request_log.read_text()
        lines = [json.loads(line) for line in text.splitlines() if headers_id in line]
    [record] = lines
    assert record["rows"] == 3 and record["status"] == 200 and record["path"] == "/score"
    assert record["ids"] == ["app-0", "app-1", "app-2"]
    assert record["model_version"] == server.scorer.card["model_version"]
    assert record["latency_ms"] > 0 and record["time"].endswith("+00:00")
    assert set(record) == {
        "time",
        "request_id",
        "method",
        "path",
        "status",
        "rows",
        "ids",
        "model_version",
        "latency_ms",
    }
    for feature in server.scorer.feature_names:
        assert feature not in text  # no applicant data, not even a field name
