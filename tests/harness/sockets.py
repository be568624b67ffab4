"""Which addresses a process listens on, read from /proc: what an outsider could reach."""

import ipaddress
import socket
from pathlib import Path

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp{,6}


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _address(hex_address: str) -> tuple[str, int]:
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    if len(raw) == 4:
        host = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four little-endian 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        host = str(ipaddress.IPv6Address(words))
    return host, int(port_hex, 16)


def listening_addresses(pids: list[int]) -> set[tuple[str, int]]:
    """Every (host, port) a TCP socket held by one of `pids` is listening on."""
    inodes: set[str] = set()
    for pid in pids:
        inodes |= _socket_inodes(pid)
    found: set[tuple[str, int]] = set()
    for table in ("tcp", "tcp6"):
        for line in (Path("/proc/net") / table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == _LISTEN and fields[9] in inodes:
                found.add(_address(fields[1]))
    return found
