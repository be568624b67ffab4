"""Outside anchors of the banks' ledgers: what the server saw of each chain, one line per reply.

A bank's ledger is hash-chained, so an edited line shows; but a bank (or whoever holds its
disk) could still cut lines off the end, or rebuild the whole chain with other numbers and
fresh hashes. Every reply carries the ledger's sequence number and head hash at the time it
was sent; the server appends them here as they arrive. A ledger that no longer has that
hash at that sequence number was truncated or rewritten after the fact, whatever its own
chain says (`fedfin audit --anchors`). A bank may keep its own external copy in this format.
"""

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedfin.common.errors import ConfigError, LedgerError

ANCHORS_FILE = "ledger-anchors.jsonl"


@dataclass(frozen=True)
class LedgerAnchor:
    """One reply's claim about its bank's ledger: entry `seq` has hash `head`."""

    bank: str
    node_id: int
    kind: str  # the reply's message type: "train" or "evaluate"
    server_round: int
    seq: int
    head: str


def append_anchors(path: Path, anchors: Iterable[LedgerAnchor]) -> None:
    """Append one JSON line per anchor, then flush and fsync: the record outlives a crash."""
    lines = "".join(json.dumps(asdict(a), sort_keys=True) + "\n" for a in anchors)
    if not lines:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(lines)
        handle.flush()
        os.fsync(handle.fileno())


def find_anchor_files(path: Path) -> list[Path]:
    """The anchors file itself, or every anchors file at or below a (server or run) directory."""
    if not path.exists():
        raise ConfigError(f"--anchors {path}: no such anchors file or directory")
    if path.is_file():
        return [path]
    found = sorted(path.rglob(ANCHORS_FILE))
    if not found:
        raise ConfigError(
            f"--anchors {path}: no {ANCHORS_FILE} here or below; is this a server's out dir?"
        )
    return found


def read_anchors(path: Path) -> list[LedgerAnchor]:
    """Every anchor in the file(s) at `path`; a malformed whole line is an error.

    A partial last line (the server crashed while appending) is skipped: that reply's
    anchor was never completely recorded, and the lines before it are intact.
    """
    anchors: list[LedgerAnchor] = []
    for file in find_anchor_files(path):
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"{file}: cannot read anchors ({exc})") from None
        whole_lines = text.split("\n")[:-1]  # after the last newline: half-written, skipped
        for number, line in enumerate(whole_lines, start=1):
            if line.strip():
                anchors.append(_parse(line, f"{file}: line {number}"))
    return anchors


def _parse(line: str, where: str) -> LedgerAnchor:
    try:
        raw: Any = json.loads(line)
        anchor = LedgerAnchor(
            bank=str(raw["bank"]),
            node_id=int(raw["node_id"]),
            kind=str(raw["kind"]),
            server_round=int(raw["server_round"]),
            seq=int(raw["seq"]),
            head=str(raw["head"]),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise LedgerError(f"{where} is not a ledger anchor ({exc!r})") from None
    if anchor.seq < 0:
        raise LedgerError(f"{where}: negative ledger sequence {anchor.seq}")
    return anchor
