"""The bank runner serves only allow-listed apps, with the bank's own code, and never runs
what the coordinator ships.

First the runner's config, allow-list and file-mode rules, then a real deployment on
loopback: a SuperLink, one bank SuperNode in `--isolation process`, and `fedfin
bank-runner`. The real fedfin app (its hash on the allow-list) completes a round through
the runner; an "evil" app with fedfin's name and version, whose ClientApp would read the
bank's data, state and SuperNode key, is declined without being executed.
"""

import hashlib
import inspect
import json
import os
import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedfin.client.clientappio import (
    ACQUIRE_TASK_METHOD,
    CLIENT_APP_TASK,
    TESTED_FLWR_VERSION,
    AppIdentity,
    RuntimeApi,
    RuntimeApiError,
    fab_bytes,
    fab_identity,
)
from fedfin.client.node_keys import create_node_keys
from fedfin.client.runner_config import check_runner_files, load_runner_config
from fedfin.common.errors import ConfigError
from fedfin.common.ledger import PrivacyLedger
from fedfin.common.protocol import (
    REASON_KEY,
    REASON_NOT_ALLOWED,
    STATUS,
    STATUS_DECLINED,
    STATUS_KEY,
)
from tests.conftest import Pretrained, write_bank_data
from tests.harness.bank_runner_deployment import (
    FEDFIN,
    ROOT,
    app_hash,
    deployment_env,
    free_port_block,
    online_nodes,
    run_log,
    runner_config_text,
    snapshot_fedfin_app,
    start_run,
    superlink_command,
    supernode_command,
    wait_for,
    wait_for_run,
    write_connection,
    write_evil_app,
    write_private,
)
from tests.harness.processes import started, stop

DIGEST = "ab" * 32
FEDFIN_APP = ("fedfin/fedfin", "0.1.0", DIGEST)


def _bank(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "data").mkdir(exist_ok=True)
    return {
        "bank-name": "bank-00",
        "data-path": "data",
        "state-dir": "state",
        "epsilon-budget": 0.5,
    }


def _config(tmp_path: Path, text: str | None = None) -> Path:
    if text is None:
        text = runner_config_text(9094, None, [FEDFIN_APP], _bank(tmp_path))
    return write_private(tmp_path / "runner.toml", text)


# --- the config file -----------------------------------------------------------------


def test_the_banks_settings_come_from_the_runner_config(tmp_path: Path) -> None:
    config = load_runner_config(_config(tmp_path))
    assert config.runtime_api == "127.0.0.1:9094"
    assert config.bank.name == "bank-00"
    assert config.bank.data_path == tmp_path / "data"  # relative to the config file
    assert config.bank.state_dir == tmp_path / "state"
    assert config.bank.policy.epsilon_budget == 0.5
    assert config.allow == (AppIdentity(*FEDFIN_APP),)


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ('runtime-api = "127.0.0.1:9094"', "", "'runtime-api'"),
        ('runtime-api = "127.0.0.1:9094"', 'runtime-api = "10.1.2.3:9094"', "'runtime-api'"),
        (f'fab-sha256 = "{DIGEST}"', 'fab-sha256 = "abc"', "'fab-sha256'"),
        ('app = "fedfin/fedfin"', 'app = "fedfin"', "'app'"),
        ('version = "0.1.0"', "", "'version'"),
        ("epsilon-budget = 0.5", "epsilon_budget = 0.5", "'epsilon_budget'"),  # a typo
        ("epsilon-budget = 0.5", 'epsilon-budget = "lots"', "'epsilon-budget'"),
        ("epsilon-budget = 0.5", "epsilon-budget = -1.0", "epsilon-budget"),
        ('data-path = "data"', "", "'data-path'"),
        ("[bank]", "[bank\n", "not valid TOML"),
        ("poll-interval = 0.1", "poll-interval = 0", "'poll-interval'"),
        ("epsilon-budget = 0.5", "epsilon-budget = 0.5\nnoise-seed = 7", "'noise-seed'"),
    ],
)
def test_a_bad_config_is_one_line_naming_the_file_and_the_key(
    tmp_path: Path, old: str, new: str, key: str
) -> None:
    text = runner_config_text(9094, None, [FEDFIN_APP], _bank(tmp_path))
    assert old in text
    path = _config(tmp_path, text.replace(old, new))
    with pytest.raises(ConfigError) as caught:
        load_runner_config(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and key in message and "\n" not in message


def test_a_config_without_an_allow_list_is_refused(tmp_path: Path) -> None:
    path = _config(tmp_path, runner_config_text(9094, None, [], _bank(tmp_path)))
    with pytest.raises(ConfigError, match=r"\[\[runner\.allow\]\]"):
        load_runner_config(path)


@pytest.mark.parametrize(
    "other",
    [
        ("fedfin/fedfin", "0.1.0", "cd" * 32),  # same name and version, other bytes
        ("fedfin/fedfin", "0.1.1", DIGEST),
        ("evil/fedfin", "0.1.0", DIGEST),
        ("fedfin/fedfin2", "0.1.0", DIGEST),
        ("", "", DIGEST),  # a bundle without a readable pyproject.toml
    ],
)
def test_an_app_runs_only_if_name_version_and_hash_all_match(
    tmp_path: Path, other: tuple[str, str, str]
) -> None:
    config = load_runner_config(_config(tmp_path))
    assert config.allows(AppIdentity(*FEDFIN_APP))
    assert not config.allows(AppIdentity(*other))


def test_a_config_or_state_dir_open_to_others_is_refused(tmp_path: Path) -> None:
    path = _config(tmp_path)
    config = load_runner_config(path)
    check_runner_files(config)  # creates the state dir, mode 700
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=r"runner config is open to group or others .*chmod 600"):
        check_runner_files(config)
    os.chmod(path, 0o600)
    os.chmod(tmp_path / "state", 0o750)
    with pytest.raises(ConfigError, match=r"state dir is open to group or others .*chmod 700"):
        check_runner_files(config)


def test_the_cli_refuses_a_readable_config_in_one_line(tmp_path: Path) -> None:
    path = _config(tmp_path)
    os.chmod(path, 0o640)
    done = subprocess.run(
        [*FEDFIN, "bank-runner", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=deployment_env(tmp_path / "flwr-home"),
    )
    assert done.returncode == 2
    assert done.stderr.startswith("fedfin bank-runner: error: ") and done.stderr.count("\n") == 1
    assert "chmod 600" in done.stderr


def test_app_hash_of_a_project_is_the_hash_of_what_flwr_run_ships(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    app = write_evil_app(tmp_path / "app", tmp_path / "marker", [], tmp_path / "out")
    shipped = build_fab_from_disk(app)  # what flwr/cli/run/run.py sends to the SuperLink
    identity = fab_identity(fab_bytes(app))
    assert identity == AppIdentity("fedfin/fedfin", "0.1.0", hashlib.sha256(shipped).hexdigest())
    (tmp_path / "app.fab").write_bytes(shipped)
    assert fab_identity(fab_bytes(tmp_path / "app.fab")) == identity
    assert fab_identity(b"not a zip").app == ""


def test_the_flower_internals_the_runner_uses_are_the_tested_ones() -> None:
    """Fails loudly when a Flower upgrade moves what client/clientappio.py relies on."""
    import flwr
    from flwr.proto.runtime_pb2 import (
        AcquireTaskRequest,
        AcquireTaskResponse,
        PullAppMessagesResponse,
        PullTaskInputResponse,
    )
    from flwr.supercore.inflatable import inflatable_protobuf_utils, inflatable_utils
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec import run_superexec
    from flwr.supernode.runtime import run_clientapp

    assert flwr.__version__ == TESTED_FLWR_VERSION
    assert f"flwr=={TESTED_FLWR_VERSION}\n" in (ROOT / "constraints.txt").read_text()
    assert CLIENT_APP_TASK == "flwr-clientapp"
    for rpc in (
        "AcquireTask",
        "PullTaskInput",
        "PullMessages",
        "PullObject",
        "ConfirmMessageReceived",
        "PushMessages",
        "PushObject",
        "PushTaskOutput",
        "SendTaskHeartbeat",
    ):
        assert callable(getattr(RuntimeHttpClient, rpc)), rpc
    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name
    assert {"task", "token"} <= set(AcquireTaskResponse.DESCRIPTOR.fields_by_name)
    assert frozenset({ACQUIRE_TASK_METHOD}) == run_superexec._SUPEREXEC_AUTH_METHODS
    assert {"context", "run", "fab", "task_id"} <= set(
        PullTaskInputResponse.DESCRIPTOR.fields_by_name
    )
    assert {"messages_list", "message_object_trees"} <= set(
        PullAppMessagesResponse.DESCRIPTOR.fields_by_name
    )
    pull = inspect.signature(inflatable_utils.pull_and_inflate_object_from_tree).parameters
    assert list(pull)[:3] == ["object_tree", "pull_object_fn", "confirm_object_received_fn"]
    assert {"return_type", "initial_backoff", "backoff_cap"} <= set(pull)
    for factory in (
        inflatable_protobuf_utils.make_pull_object_fn_protobuf,
        inflatable_protobuf_utils.make_confirm_message_received_fn_protobuf,
    ):
        assert len(inspect.signature(factory).parameters) == 3, factory
    assert list(inspect.signature(run_clientapp.push_message).parameters) == [
        "client",
        "message",
        "context",
    ]
    assert list(inspect.signature(run_clientapp.push_task_output).parameters) == [
        "client",
        "context",
        "sub_status",
        "details",
    ]
    assert {
        "server_address",
        "insecure",
        "root_certificates",
        "interceptors",
        "retry_invoker",
    } <= set(inspect.signature(RuntimeHttpClient.from_server_address).parameters)
    assert set(inspect.signature(SuperExecAuthHttpInterceptor).parameters) == {
        "master_secret",
        "protected_methods",
    }


def test_a_refused_run_gets_the_same_reply_as_a_bank_that_declines(
    pretrained: Pretrained,
) -> None:
    """The server sees the shape it knows from client_app.py: a status record, two keys."""
    from flwr.app import Context, RecordDict

    from fedfin.client.bank_runner import declined_reply
    from fedfin.client.client_app import build_client_app
    from fedfin.common.checkpoint import load_encoder_checkpoint
    from tests.harness.messages import server_identity, train_message

    with server_identity():
        message = train_message(load_encoder_checkpoint(pretrained.checkpoint_dir))
    no_settings = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    declined = build_client_app()(message, no_settings)
    refused = declined_reply(message, REASON_NOT_ALLOWED)
    assert list(refused.content.keys()) == list(declined.content.keys()) == [STATUS]
    assert set(refused.content.config_records[STATUS]) == {STATUS_KEY, REASON_KEY}
    assert set(declined.content.config_records[STATUS]) == {STATUS_KEY, REASON_KEY}
    assert refused.content.config_records[STATUS][STATUS_KEY] == STATUS_DECLINED
    assert refused.metadata.reply_to_message_id == message.metadata.message_id


# --- a real deployment on loopback ---------------------------------------------------


@dataclass
class Deployment:
    work: Path
    env: dict[str, str]
    superlink_port: int
    runtime_port: int
    secret: Path
    state_dir: Path
    data_dir: Path
    key_file: Path
    marker: Path
    evil_app: Path
    evil_out: Path
    supernode: subprocess.Popen[bytes]
    runner: subprocess.Popen[bytes]
    runner_log: Path
    logs: dict[str, Path]
    real_run: tuple[int, str] = (0, "")
    evil_run: tuple[int, str] = (0, "")
    state_before_evil: dict[str, str] = field(default_factory=dict)
    state_after_evil: dict[str, str] = field(default_factory=dict)
    stack: ExitStack = field(default_factory=ExitStack)


def state_files(state_dir: Path) -> dict[str, str]:
    """Every file in the bank's state dir and the sha256 of its bytes."""
    return {
        str(path.relative_to(state_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(state_dir.rglob("*"))
        if path.is_file()
    }


def runner_says(deployment: Deployment, text: str, count: int = 1) -> bool:
    return deployment.runner_log.read_text(errors="replace").count(text) >= count


@pytest.fixture(scope="module")
def deployment(
    pretrained: Pretrained, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("bank-runner")
    env = deployment_env(work / "flwr-home")
    base = free_port_block(4)
    superlink_port, runtime_port = base, base + 3
    data_dir = write_bank_data(pretrained, 0, work / "bank" / "data")
    state_dir = work / "bank" / "state"
    state_dir.mkdir(mode=0o700)
    key_file = create_node_keys(work / "keys", "bank-00").private_key
    secret = write_private(work / "bank" / "exec.secret", secrets.token_bytes(32))
    real_app = snapshot_fedfin_app(work / "fedfin-app")
    allowed = app_hash(real_app, env)
    marker, evil_out = work / "EVIL-RAN", work / "evil-replies.json"
    targets = [str(p) for p in sorted(data_dir.iterdir())] + [str(state_dir), str(key_file)]
    evil_app = write_evil_app(work / "evil-app", marker, targets, evil_out)
    bank = {
        "bank-name": "bank-00",
        "data-path": str(data_dir),
        "state-dir": str(state_dir),
        "epsilon-budget": 1.0,
        "min-noise-multiplier": 0.5,
    }
    config = write_private(
        work / "bank" / "runner.toml", runner_config_text(runtime_port, secret, [allowed], bank)
    )
    logs = {name: work / f"{name}.log" for name in ("superlink", "supernode", "runner")}
    write_connection(work / "flwr-home", superlink_port)
    with ExitStack() as stack:
        stack.enter_context(started(superlink_command(superlink_port), env, logs["superlink"]))
        supernode = stack.enter_context(
            started(supernode_command(superlink_port, runtime_port, secret), env, logs["supernode"])
        )
        runner = stack.enter_context(
            started([*FEDFIN, "bank-runner", "--config", str(config)], env, logs["runner"], ROOT)
        )
        deployment = Deployment(
            work, env, superlink_port, runtime_port, secret, state_dir, data_dir, key_file,
            marker, evil_app, evil_out, supernode, runner, logs["runner"], logs, stack=stack,
        )  # fmt: skip
        wait_for(lambda: online_nodes(env) == 1, 90, "the bank's SuperNode", interval=2)
        wait_for(lambda: runner_says(deployment, "connected to the SuperNode"), 90, "the runner")

        run_config = (
            f"encoder-dir='{pretrained.checkpoint_dir}' out-dir='{work / 'server-out'}' "
            "num-server-rounds=1 min-banks=1"
        )
        run_id = start_run(real_app, run_config, env)
        done = work / "server-out" / "final"  # written by the ServerApp after its last round
        deployment.real_run = (run_id, wait_for_run(run_id, env, 240, done))
        deployment.state_before_evil = state_files(state_dir)

        run_id = start_run(evil_app, "", env)
        deployment.evil_run = (run_id, wait_for_run(run_id, env, 120, evil_out))
        deployment.state_after_evil = state_files(state_dir)
        yield deployment


def test_the_real_fedfin_app_completes_a_round_through_the_runner(
    deployment: Deployment,
) -> None:
    run_id, status = deployment.real_run
    assert status == "finished:completed", deployment.runner_log.read_text()[-3000:]
    entries = PrivacyLedger(deployment.state_dir).entries()
    kinds = [entry["kind"] for entry in entries]
    assert "train" in kinds and "evaluate" in kinds, kinds
    assert all(entry["bank"] == "bank-00" for entry in entries if "bank" in entry)
    log = deployment.runner_log.read_text()
    assert f"run {run_id} task" in log and "accepted; train -> ok" in log
    assert "accepted; evaluate -> ok" in log


def test_the_evil_app_is_never_executed_and_gets_a_declined_reply(
    deployment: Deployment,
) -> None:
    run_id, status = deployment.evil_run
    assert status == "finished:completed", run_log(run_id, deployment.env)[-3000:]
    assert not deployment.marker.exists(), "the evil ClientApp ran inside the bank"
    replies = json.loads(deployment.evil_out.read_text())
    assert replies == [
        {STATUS: {STATUS_KEY: STATUS_DECLINED, REASON_KEY: REASON_NOT_ALLOWED},
         "arrays": [], "metrics": {}}
    ]  # fmt: skip
    log = deployment.runner_log.read_text()
    assert f"run {run_id} task" in log and "fedfin/fedfin 0.1.0" in log
    assert "REFUSED: not on this bank's allow-list" in log


def test_no_byte_of_the_banks_data_or_key_reaches_the_coordinator(
    deployment: Deployment,
) -> None:
    key = deployment.key_file.read_bytes()
    data = [path.read_bytes() for path in sorted(deployment.data_dir.iterdir())]
    secrets_ = [key[60:100], *(blob[len(blob) // 2 : len(blob) // 2 + 40] for blob in data)]
    needles = [*secrets_, *(s.hex().encode() for s in secrets_)]
    needles += [str(deployment.data_dir).encode(), str(deployment.key_file).encode()]
    needles += [name.encode() for name in deployment.state_before_evil if len(name) > 6]
    coordinator_side = [
        deployment.evil_out.read_bytes(),
        deployment.logs["superlink"].read_bytes(),
        deployment.logs["supernode"].read_bytes(),
        run_log(deployment.evil_run[0], deployment.env).encode(),
        run_log(deployment.real_run[0], deployment.env).encode(),
        *(p.read_bytes() for p in (deployment.work / "server-out").rglob("*") if p.is_file()),
    ]
    for needle in needles:
        for blob in coordinator_side:
            assert needle not in blob


def test_the_evil_run_leaves_the_banks_ledger_and_state_unchanged(
    deployment: Deployment,
) -> None:
    assert deployment.state_before_evil  # the real run left a ledger and a head
    assert deployment.state_after_evil == deployment.state_before_evil


def test_without_the_superexec_secret_no_one_else_can_claim_the_banks_tasks(
    deployment: Deployment,
) -> None:
    address = f"127.0.0.1:{deployment.runtime_port}"
    for secret in (None, secrets.token_bytes(32)):
        api = RuntimeApi(address, secret)
        try:
            with pytest.raises(RuntimeApiError, match="HTTP 401"):
                api.acquire()
        finally:
            api.close()


def test_the_runner_reconnects_when_the_supernode_restarts(deployment: Deployment) -> None:
    """The SuperNode goes away and comes back; the runner serves the next run unprompted."""
    stop(deployment.supernode)
    wait_for(lambda: runner_says(deployment, "retrying"), 60, "the runner to notice")
    command = supernode_command(
        deployment.superlink_port, deployment.runtime_port, deployment.secret
    )
    deployment.stack.enter_context(
        started(command, deployment.env, deployment.work / "supernode-2.log")
    )
    wait_for(lambda: runner_says(deployment, "connected to the SuperNode", 2), 60, "reconnect")
    refusals = deployment.runner_log.read_text().count("REFUSED")
    start_run(deployment.evil_app, "", deployment.env)  # its end waits on the old, dead node
    wait_for(lambda: runner_says(deployment, "REFUSED", refusals + 1), 90, "the next task")
    assert not deployment.marker.exists()


def test_the_runner_stops_cleanly_on_sigterm(deployment: Deployment) -> None:
    deployment.runner.send_signal(signal.SIGTERM)
    assert deployment.runner.wait(timeout=30) == 0
    log = deployment.runner_log.read_text()
    assert "SIGTERM received" in log and "bank runner for bank-00 stopped" in log
    assert "Traceback" not in log
