"""The bank runner: the bank's own ClientApp serving its SuperNode's tasks, torch kept warm.

The bank's SuperNode runs with `--isolation process`, so it executes nothing itself; this
long-running process (the bank's installed fedfin) claims each task over the SuperNode's
local runtime API and answers it with `client.client_app.build_client_app()`, called the
way Flower calls a ClientApp, so the release guard, budget and ledger behave exactly as in
simulation. The app bundle the coordinator shipped is never installed or imported: its
bytes are hashed and its name and version read, and a run whose app is not on the bank's
allow-list gets a declined reply without the bank's data or state being touched.
"""

import logging
import threading
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedfin.client.clientappio import (
    AppIdentity,
    ClaimedTask,
    RuntimeApi,
    RuntimeApiError,
    fab_identity,
)
from fedfin.client.runner_config import RunnerConfig
from fedfin.common.protocol import (
    REASON_DECLINED,
    REASON_KEY,
    REASON_NOT_ALLOWED,
    STATUS,
    STATUS_DECLINED,
    STATUS_KEY,
)

log = logging.getLogger("fedfin.runner")
MAX_RECONNECT_SECONDS = 5.0


@dataclass(frozen=True)
class TaskOutcome:
    """What the bank's log says about one task."""

    run_id: int
    task_id: int
    app: AppIdentity
    accepted: bool
    message_type: str
    status: str  # the reply's status: "ok", "declined", or "error" (no reply could be made)
    seconds: float  # claim to finish
    pull_seconds: float = 0.0  # the task's input over the runtime API
    app_seconds: float = 0.0  # inside the bank's ClientApp


def declined_reply(message: Message, reason: str) -> Message:
    """The reply of a bank that will not serve a message: a fixed reason and nothing else.

    Same shape as the ClientApp's declined reply (client/client_app.py), so the server
    handles both alike.
    """
    status = ConfigRecord({STATUS_KEY: STATUS_DECLINED, REASON_KEY: reason})
    return Message(RecordDict({STATUS: status}), reply_to=message)


def reply_status(reply: Message) -> str:
    if reply.has_error():
        return "error"
    status = reply.content.config_records.get(STATUS)
    return str(status.get(STATUS_KEY, "")) if status is not None else ""


class BankRunner:
    """Claims the SuperNode's ClientApp tasks one at a time and answers each one."""

    def __init__(self, config: RunnerConfig, app: ClientApp, api: RuntimeApi) -> None:
        self.config = config
        self.app = app
        self.api = api

    def serve_forever(self, stop: threading.Event) -> None:
        """Poll for tasks until `stop` is set; survive failed tasks and SuperNode restarts.

        A task in progress is always finished before `stop` is honoured: its ledger entry
        and its reply belong together.
        """
        wait = self.config.poll_seconds
        reachable: bool | None = None
        while not stop.is_set():
            try:
                task = self.api.acquire()
            except RuntimeApiError as exc:
                if reachable is not False:
                    log.warning("%s; retrying", exc)
                reachable = False
                stop.wait(wait)
                wait = min(wait * 2, MAX_RECONNECT_SECONDS)
                continue
            if not reachable:
                log.info("connected to the SuperNode's runtime API at %s", self.api.address)
            reachable, wait = True, self.config.poll_seconds
            if task is None:
                stop.wait(self.config.poll_seconds)
                continue
            try:
                self.serve(task)
            except Exception:  # a bug in one task must not end the bank's service
                log.exception("run %s task %s failed", task.run_id, task.task_id)

    def serve(self, task: ClaimedTask) -> TaskOutcome | None:
        """Answer one claimed task; None if its input or reply could not be exchanged."""
        started = time.monotonic()
        try:
            with task:
                work = task.pull()
                pull_seconds = time.monotonic() - started
                app = fab_identity(work.fab)
                accepted = self.config.allows(app)
                app_started = time.monotonic()
                if accepted:
                    reply = self._answer(work.message, work.context)
                    app_seconds = time.monotonic() - app_started
                else:
                    app_seconds = 0.0
                    reply = declined_reply(work.message, REASON_NOT_ALLOWED)
                task.reply(reply, keep_context=accepted)
        except RuntimeApiError as exc:
            log.error("run %s task %s: %s", task.run_id, task.task_id, exc)
            return None
        outcome = TaskOutcome(
            run_id=work.run_id,
            task_id=task.task_id,
            app=app,
            accepted=accepted,
            message_type=work.message.metadata.message_type,
            status=reply_status(reply),
            seconds=time.monotonic() - started,
            pull_seconds=pull_seconds,
            app_seconds=app_seconds,
        )
        _log_outcome(outcome)
        return outcome

    def _answer(self, message: Message, context: Context) -> Message:
        """The bank's own ClientApp, called as Flower calls it; a crash becomes a decline
        whose reason is fixed (the traceback stays in this log: it may depend on the data)."""
        try:
            return self.app(message=message, context=context)
        except Exception:
            log.exception(
                "run %s: the ClientApp failed on a %s message",
                message.metadata.run_id,
                message.metadata.message_type,
            )
            return declined_reply(message, REASON_DECLINED)


def _log_outcome(outcome: TaskOutcome) -> None:
    app = outcome.app
    name = f"{app.app or '?'} {app.version or '?'} (fab sha256 {app.fab_sha256[:12]})"
    if outcome.accepted:
        log.info(
            "run %s task %s: app %s accepted; %s -> %s in %.2f s (%.2f s in the ClientApp, "
            "%.2f s pulling the input)",
            outcome.run_id,
            outcome.task_id,
            name,
            outcome.message_type,
            outcome.status,
            outcome.seconds,
            outcome.app_seconds,
            outcome.pull_seconds,
        )
    else:
        log.warning(
            "run %s task %s: app %s REFUSED: not on this bank's allow-list; %s declined in %.2f s",
            outcome.run_id,
            outcome.task_id,
            name,
            outcome.message_type,
            outcome.seconds,
        )
