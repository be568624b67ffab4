"""The bank's privacy ledger: one JSON line per release, each carrying the hash of the one before.

It is append-only and tamper-evident: altering, deleting or reordering a line breaks the
chain. Each entry is written, flushed and fsync'ed before the reply leaves the bank, so
the ledger never shows less than what was sent. A crash mid-append leaves a partial last
line; readers ignore it and the next append removes it (that release was never sent).

The ledger is also the bank's accountant state: the DP events of all entries are the
history from which cumulative ε is computed, across rounds, runs and restarts.
"""

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedfin.common.accounting import DpEvent
from fedfin.common.errors import LedgerError

LEDGER_FILE = "ledger.jsonl"
LOCK_FILE = "ledger.lock"  # held from approving a round to recording its charge
GENESIS_HASH = "0" * 64
UNIT_OF_PRIVACY = "one record (one loan) of this bank"
NEIGHBOURING_RELATION = "add/remove one record (Poisson subsampling)"


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry's canonical JSON without its own `hash` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)


def events_of(entry: dict[str, Any]) -> list[DpEvent]:
    return [DpEvent(**event) for event in entry.get("dp_events", [])]


class _NonFinite(ValueError):
    """NaN or Infinity in a ledger line: JSON allows neither, and `canonical_json` refuses them."""


def _refuse_non_finite(constant: str) -> float:
    raise _NonFinite(constant)


@dataclass(frozen=True)
class ChainCheck:
    """The result of verifying a ledger's hash chain."""

    entries: list[dict[str, Any]]
    problems: list[str] = field(default_factory=list)
    partial_tail: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_lines(raw: bytes, source: str) -> ChainCheck:
    """Parse and verify every whole line; report each break with its line number."""
    text = raw.decode("utf-8", errors="replace")
    partial_tail = bool(text) and not text.endswith("\n")
    lines = text.split("\n")[:-1]  # drop the partial tail (or the empty string after "\n")
    entries: list[dict[str, Any]] = []
    problems: list[str] = []
    previous = GENESIS_HASH
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line, parse_constant=_refuse_non_finite)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except _NonFinite as exc:
            problems.append(
                f"{source}: line {number} holds {exc}, which a ledger never records "
                "(the line was altered)"
            )
            previous = ""
            continue
        except ValueError:
            problems.append(f"{source}: line {number} is not a JSON object")
            previous = ""
            continue
        if entry.get("prev_hash") != previous:
            problems.append(
                f"{source}: line {number} does not follow line {number - 1} (chain broken)"
            )
        if entry.get("hash") != entry_hash(entry):
            problems.append(f"{source}: line {number} was altered (hash mismatch)")
        if entry.get("seq") != number:
            problems.append(
                f"{source}: line {number} has sequence {entry.get('seq')} (reordered or deleted)"
            )
        previous = str(entry.get("hash", ""))
        entries.append(entry)
    return ChainCheck(entries=entries, problems=problems, partial_tail=partial_tail)


class PrivacyLedger:
    """Append-only, hash-chained JSON-lines ledger in a bank's state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LEDGER_FILE

    def check(self) -> ChainCheck:
        if not self.path.exists():
            return ChainCheck(entries=[])
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"{self.path}: cannot read ledger ({exc.strerror})") from None
        return verify_lines(raw, str(self.path))

    def entries(self) -> list[dict[str, Any]]:
        """All whole entries, after verifying the chain; a broken chain is an error."""
        result = self.check()
        if not result.ok:
            raise LedgerError(result.problems[0])
        return result.entries

    @contextmanager
    def reserved(self) -> Iterator[None]:
        """Exclusive access from reading the past to recording a charge.

        Two processes on one state directory must not both approve against the same past:
        each would stay within the budget alone, together they would exceed it. The lock
        is on a separate file, so `append` (which locks the ledger file) works inside it.
        """
        lock_path = self.path.parent / LOCK_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock_path, "a")  # noqa: SIM115 - closed below, after unlocking
        except OSError as exc:
            raise LedgerError(f"{lock_path}: cannot open ledger lock ({exc.strerror})") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    def head(self) -> tuple[int, str]:
        """(sequence number, hash) of the last whole entry: what a reply anchors."""
        entries = self.entries()
        if not entries:
            return 0, GENESIS_HASH
        return int(entries[-1]["seq"]), str(entries[-1]["hash"])

    def dp_events(self) -> list[DpEvent]:
        """Every DP event ever released by this bank: the accountant's history."""
        return [event for entry in self.entries() for event in events_of(entry)]

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain `record` to the last entry, write it, flush and fsync; return the entry."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked() as handle:
            previous, count = _repair_and_read_tail(handle, str(self.path))
            entry = {**record, "seq": count + 1, "prev_hash": previous}
            entry["hash"] = entry_hash(entry)
            handle.seek(0, os.SEEK_END)
            handle.write((canonical_json(entry) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())
        return entry

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        try:
            handle = open(self.path, "a+b")  # noqa: SIM115 - closed below, after unlocking
        except OSError as exc:
            raise LedgerError(
                f"{self.path}: cannot open ledger for writing ({exc.strerror})"
            ) from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            handle.seek(0)
            yield handle
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()


def _repair_and_read_tail(handle: Any, source: str) -> tuple[str, int]:
    """Drop a partial last line (never sent), then return the last entry's hash and seq.

    Only the tail is read, so an append costs the same on a ledger of any length; the
    whole chain is verified whenever the ledger is read for accounting or audit, which
    the bank does before every round.
    """
    size = handle.seek(0, os.SEEK_END)
    chunk = 4096
    while True:
        start = max(0, size - chunk)
        handle.seek(start)
        tail = handle.read(size - start)
        end = tail.rfind(b"\n")  # end of the last whole line
        begin = tail.rfind(b"\n", 0, end) + 1 if end >= 0 else 0
        if start == 0 or begin > 0:
            break
        chunk *= 4
    if end + 1 < len(tail):  # a partial entry: its release was never sent
        handle.truncate(start + end + 1)
    if end < 0:
        return GENESIS_HASH, 0
    try:
        entry = json.loads(tail[begin:end])
        if entry.get("hash") != entry_hash(entry):
            raise ValueError("hash mismatch")
        return str(entry["hash"]), int(entry["seq"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LedgerError(f"{source}: last entry is corrupt; refusing to append") from None
