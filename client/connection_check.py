"""Check a bank's connection to the SuperLink before starting its SuperNode.

Flower reports every TLS problem as "Connection to the SuperLink is unavailable"; this
check says which one it is: nothing listening, a certificate not signed by the given CA,
or a certificate that does not name the address used.
"""

import socket
import ssl
from pathlib import Path

from fedfin.common.errors import ConfigError


def check_superlink_connection(address: str, root_certificates: Path, timeout: float = 5.0) -> str:
    """Return a one-line success message, or raise `ConfigError` saying what to fix."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"--superlink '{address}' must be HOST:PORT")
    if not root_certificates.is_file():
        raise ConfigError(f"--root-certificates {root_certificates}: file not found")
    try:
        context = ssl.create_default_context(cafile=str(root_certificates))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"--root-certificates {root_certificates}: not a PEM CA certificate ({exc.reason})"
        ) from None
    try:
        with (
            socket.create_connection((host, int(port_text)), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        if "match" in str(exc.verify_message) or "hostname" in str(exc).lower():
            raise ConfigError(
                f"{address}: the SuperLink's certificate does not name '{host}'; ask the "
                "coordinator for a certificate with this name (fedfin certs --host)"
            ) from None
        raise ConfigError(
            f"{address}: the SuperLink's certificate is not signed by {root_certificates} "
            f"({exc.verify_message}); check --root-certificates"
        ) from None
    except ssl.SSLError as exc:
        raise ConfigError(f"{address}: TLS handshake failed ({exc.reason}); is it TLS?") from None
    except OSError as exc:  # refused, unreachable, timed out
        raise ConfigError(
            f"{address}: cannot connect ({exc.__class__.__name__}); is the SuperLink running "
            "and reachable from this machine?"
        ) from None
    return f"{address}: TLS ({version}) verified with {root_certificates}"
