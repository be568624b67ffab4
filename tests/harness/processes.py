"""Start processes for tests in their own session and stop all of them by PID, always."""

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live process whose parent chain leads to `pid` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def stop(process: subprocess.Popen[bytes], known: Sequence[int] = ()) -> None:
    """Stop the process, its process group and every descendant, by PID."""
    pids = {process.pid, *known, *descendants(process.pid)}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
    process.wait(timeout=5)


@contextmanager
def started(
    command: Sequence[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` in a new session with output to `log`; stop everything on exit."""
    handle = open(log, "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        list(command),
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=cwd,
    )
    seen: set[int] = set()
    try:
        yield process
    finally:
        seen.update(descendants(process.pid))
        stop(process, sorted(seen))
        handle.close()


def run_to_end(command: Sequence[str], env: dict[str, str], log: Path, timeout: float) -> int:
    """Run to completion (or timeout), then make sure nothing it started is left."""
    with started(command, env, log) as process:
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a Flower process: its own FLWR_HOME, the repo on the path."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env
