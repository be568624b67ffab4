"""A bank's SuperNode identity: an ECDSA P-384 key pair in OpenSSH format.

The private key stays on the bank's SuperNode (`--auth-supernode-private-key`); the
public key is given to the coordinator, who registers it (`flwr supernode register`).
A SuperNode whose key is not registered is refused by the SuperLink.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedfin.common.atomic import write_atomically
from fedfin.common.errors import ConfigError


@dataclass(frozen=True)
class KeyPairPaths:
    private_key: Path
    public_key: Path


def create_node_keys(out: Path, name: str) -> KeyPairPaths:
    """Write `<name>` (private, mode 600) and `<name>.pub` to `out`; never overwrite."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"--name '{name}' must be a plain file name, e.g. bank-00")
    paths = KeyPairPaths(out / name, out / f"{name}.pub")
    for path in (paths.private_key, paths.public_key):
        if path.exists():
            raise ConfigError(f"{path} already exists; a bank's key is never overwritten")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )

    def write_private(tmp: Path) -> None:
        tmp.write_bytes(private)
        os.chmod(tmp, 0o600)

    write_atomically(paths.private_key, write_private)
    write_atomically(paths.public_key, lambda tmp: tmp.write_bytes(public + f" {name}\n".encode()))
    return paths
