"""Every use of Flower internals by the bank runner, in one place.

The bank runner takes the tasks of a SuperNode started with `--isolation process` over the
SuperNode's local runtime API, the way Flower's own executor does (`flower-superexec` claims
a task with `AcquireTask`, then `flwr-clientapp --token` pulls its input and pushes the
reply; see flwr/supercore/superexec/run_superexec.py and
flwr/supernode/runtime/run_clientapp.py in flwr 1.42.0). Unlike `flwr-clientapp`, nothing
here installs or imports the app bundle (FAB): its bytes are only hashed and its
pyproject.toml read as data.

These calls are not Flower's public API, so flwr is pinned (constraints.txt) and
tests/test_bank_runner.py fails loudly when any name or signature used here changes.
"""

import hashlib
import io
import logging
import threading
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import flwr
import httpx
from flwr.app import Context, Message
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.proto.task_pb2 import Task
from flwr.supercore.auth import load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedfin.common.errors import ConfigError, FedfinError

log = logging.getLogger("fedfin.runner")

TESTED_FLWR_VERSION = "1.42.0"
CLIENT_APP_TASK = str(TaskType.CLIENT_APP)  # "flwr-clientapp"
ACQUIRE_TASK_METHOD = "/flwr.proto.Runtime/AcquireTask"  # what SuperExec auth signs
# A claimed task whose token sees no heartbeat for 2 x 30 s is expired by the SuperNode
# (flwr/supercore/corestate/in_memory_corestate.py); beat well inside that.
HEARTBEAT_SECONDS = 10.0
# The SuperNode creates a task before it has pulled the message's objects from the SuperLink,
# so a prompt runner often asks for an object that is not there yet. Flower waits 1 s, then
# up to 10 s (PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP in flwr/supercore/constant.py); on
# loopback the object is there within milliseconds.
PULL_BACKOFF_SECONDS = 0.02
PULL_BACKOFF_CAP_SECONDS = 0.5


class RuntimeApiError(FedfinError):
    """The SuperNode's runtime API is unreachable, refuses us, or speaks another Flower."""

    exit_code = 6


def check_flower_version() -> None:
    """Refuse to run against a Flower other than the one these internals were tested with."""
    if flwr.__version__ != TESTED_FLWR_VERSION:
        raise RuntimeApiError(
            f"the bank runner is tested with flwr {TESTED_FLWR_VERSION}, found "
            f"{flwr.__version__}; install fedfin with its constraints.txt"
        )


@dataclass(frozen=True)
class AppIdentity:
    """What a bank's allow-list names: publisher/app name, version, sha256 of the FAB bytes."""

    app: str
    version: str
    fab_sha256: str


def fab_identity(fab: bytes) -> AppIdentity:
    """Read a FAB's name and version from its own pyproject.toml and hash its bytes.

    The same function serves `fedfin app-hash` and the runner's check, so the two agree.
    Nothing in the bundle is executed; a bundle that cannot be read gets empty fields,
    which no allow-list entry matches.
    """
    digest = hashlib.sha256(fab).hexdigest()
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            config = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
        app = f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}"
        version = str(config["project"]["version"])
    except (zipfile.BadZipFile, KeyError, TypeError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return AppIdentity("", "", digest)
    return AppIdentity(app, version, digest)


def fab_bytes(path: Path) -> bytes:
    """A .fab file's bytes, or the FAB Flower builds from a project directory.

    For a directory this is exactly what `flwr run DIR` ships (flwr/cli/run/run.py builds
    it with `build_fab_from_disk`), so its hash is the one the runner will see.
    """
    if path.is_dir():
        try:
            return build_fab_from_disk(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"{path}: cannot build a FAB from this directory ({exc})") from None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the FAB ({exc.strerror})") from None


@dataclass(frozen=True)
class TaskInput:
    """One claimed task's input: the message, the run's context and the FAB's bytes."""

    task_id: int
    run_id: int
    message: Message
    context: Context
    fab: bytes


def read_secret(path: Path) -> bytes:
    """The SuperExec auth secret shared with `flower-supernode --superexec-auth-secret-file`."""
    try:
        secret = load_superexec_auth_secret(str(path))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    assert secret is not None  # a path was given
    return secret


class RuntimeApi:
    """The executor side of the SuperNode's runtime API: claims ClientApp tasks.

    No retry invoker: Flower's (flwr/supercore/retry/http_retry.py) sends the process
    SIGINT on a 401, which would end a long-running runner; the runner retries itself.
    """

    def __init__(
        self, address: str, secret: bytes | None = None, root_certificates: Path | None = None
    ) -> None:
        self.address = address
        self.root_certificates = str(root_certificates) if root_certificates else None
        interceptors: list[ProtobufClientInterceptor] = [
            RuntimeVersionHttpInterceptor(component_name="SuperExec")
        ]
        if secret is not None:
            interceptors.append(
                SuperExecAuthHttpInterceptor(
                    master_secret=secret, protected_methods=[ACQUIRE_TASK_METHOD]
                )
            )
        self._client = self._http_client(interceptors)

    def _http_client(self, interceptors: list[ProtobufClientInterceptor]) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=interceptors,
            retry_invoker=None,
        )

    def acquire(self) -> "ClaimedTask | None":
        """Claim the oldest pending ClientApp task, or None when there is none."""
        try:
            response = self._client.AcquireTask(
                AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK])
            )
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            raise RuntimeApiError(
                f"the SuperNode's runtime API at {self.address} refused AcquireTask "
                f"(HTTP {code}{': check superexec-auth-secret-file' if code == 401 else ''})"
            ) from None
        except httpx.HTTPError as exc:
            raise RuntimeApiError(
                f"the SuperNode's runtime API at {self.address} is unreachable ({exc})"
            ) from None
        if not response.HasField("task") or not response.token:
            return None
        return ClaimedTask(self, response.task, response.token)

    def close(self) -> None:
        self._client.close()


class ClaimedTask:
    """One claimed task: pull its input, push one reply, report it finished; heartbeats.

    Use as a context manager: leaving it reports the task completed once its reply is out;
    without a reply it lets the task expire, so the SuperNode answers in its place.
    """

    def __init__(self, api: RuntimeApi, task: Task, token: str) -> None:
        self.task_id = int(task.task_id)
        self.run_id = int(task.run_id)
        self._client = api._http_client(
            [
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ]
        )
        self._input: Context | None = None
        self._context: Context | None = None
        self._completed = False
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> "ClaimedTask":
        self._heartbeat.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._completed:
            push_task_output(self._client, self._context, SubStatus.COMPLETED, "")
        else:
            # No reply went out. A task reported finished without one would leave the
            # SuperNode waiting for that reply forever (start_client_internal.py,
            # `_push_messages`); a task whose heartbeat stops is expired within 60 s and
            # answered with Flower's own "ClientApp crashed" error, which carries nothing.
            log.error("task %s ended without a reply; the SuperNode will expire it", self.task_id)
        self._heartbeat.join(timeout=5)
        self._client.close()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
            except httpx.HTTPError as exc:  # the task's end decides; keep beating
                log.debug("heartbeat for task %s failed: %s", self.task_id, exc)

    def pull(self) -> TaskInput:
        """The message to answer, the run's context (node config, run config, state), the FAB."""
        try:
            message, context, run_id, fab = self._pull()
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            raise RuntimeApiError(f"task {self.task_id}: cannot pull its input ({exc})") from None
        self._input = context
        return TaskInput(self.task_id, run_id, message, context, fab)

    def _pull(self) -> tuple[Message, Context, int, bytes]:
        """As flwr/supernode/runtime/run_clientapp.py `pull_task_input`, with a short backoff."""
        started = time.monotonic()
        task_input = self._client.PullTaskInput(PullTaskInputRequest())
        context = context_from_proto(task_input.context)
        run = run_from_proto(task_input.run)
        fab = fab_from_proto(task_input.fab)
        pulled = self._client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("the SuperNode has no message for this task")
        node = Node(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        listed = time.monotonic()
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(self._client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(
                self._client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
            initial_backoff=PULL_BACKOFF_SECONDS,
            backoff_cap=PULL_BACKOFF_CAP_SECONDS,
        )
        # The deflated message does not carry its own id (its object id); Flower sets it so.
        message.metadata.__dict__["_message_id"] = tree.object_id
        log.debug(
            "task %s: input and message tree in %.2f s, %d objects in %.2f s",
            self.task_id,
            listed - started,
            len(list(iterate_object_tree(tree))),
            time.monotonic() - listed,
        )
        return message, context, int(run.run_id), fab.content

    def reply(self, message: Message, keep_context: bool) -> None:
        """Push the one reply. With `keep_context` the task's context (whose state the
        ClientApp may have changed) goes back to the SuperNode when the task ends; without,
        the SuperNode keeps its own copy untouched."""
        if self._input is None:
            raise RuntimeApiError(f"task {self.task_id}: a reply before its input was pulled")
        try:
            push_message(self._client, message, self._input)
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            raise RuntimeApiError(f"task {self.task_id}: cannot push its reply ({exc})") from None
        self._context = self._input if keep_context else None
        self._completed = True
