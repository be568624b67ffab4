"""The coordinator's one door: an nginx config that forwards only Fleet API calls.

Flower 1.42's SuperLink serves every API over HTTPS on one port, told apart only by path:
`/v1/fleet/*` (SuperNodes), `/v1/control/*` (`flwr run/ls/stop`, `flwr supernode
register`: no account authentication without Flower's OIDC add-on) and `/v1/runtime/*`
(the ServerApp's executor). So the SuperLink listens on 127.0.0.1 and nginx, on the public
address, forwards exactly the Fleet calls an authenticated SuperNode makes, each to its
fixed upstream path; everything else gets 404 from nginx and never reaches Flower.
"""

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedfin.common.errors import ConfigError

# The Fleet calls a SuperNode with a registered key makes (flwr/supernode/fleet_http_client.py).
# Self-registration (/v1/fleet/register-node, /v1/fleet/unregister-node) is left out: with
# --enable-supernode-auth the SuperLink refuses it anyway, and the door need not carry it.
FLEET_PATHS: tuple[str, ...] = (
    "/v1/fleet/activate-node",
    "/v1/fleet/deactivate-node",
    "/v1/fleet/send-node-heartbeat",
    "/v1/fleet/pull-messages",
    "/v1/fleet/push-messages",
    "/v1/fleet/get-run",
    "/v1/fleet/get-fab",
    "/v1/fleet/push-object",
    "/v1/fleet/pull-object",
    "/v1/fleet/confirm-message-received",
)


@dataclass(frozen=True)
class ProxyConfig:
    """Everything the door needs: where it listens, its TLS identity, where the SuperLink is.

    `prefix` is nginx's own directory (pid file, logs, temporary files), so the door runs
    as an ordinary process with no system-wide state.
    """

    listen_host: str
    listen_port: int
    superlink_port: int
    server_cert: Path
    server_key: Path
    ca_cert: Path
    prefix: Path
    superlink_tls_name: str
    max_body_size_mib: int = 64
    read_timeout_s: int = 120


def _check_port(flag: str, port: int) -> None:
    if not 0 < port < 65536:
        raise ConfigError(f"{flag} must be a port in 1-65535, got {port}")


def certificate_dns_names(server_cert: Path) -> list[str]:
    """The DNS names in the certificate's SAN: the names nginx can verify the SuperLink by.

    nginx checks the upstream certificate by DNS name only, so an IP-only certificate
    cannot be verified on the loopback hop.
    """
    try:
        cert = x509.load_pem_x509_certificate(server_cert.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{server_cert}: cannot read the server certificate ({exc})") from None
    except ValueError:
        raise ConfigError(f"{server_cert}: not a PEM certificate") from None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.DNSName))


def proxy_config_for(
    certs: Path,
    listen: str,
    superlink_port: int,
    prefix: Path,
    max_body_size_mib: int = 64,
) -> ProxyConfig:
    """The door's config from a `fedfin certs` directory and `HOST:PORT` to listen on."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"--listen '{listen}' must be HOST:PORT, e.g. 0.0.0.0:9092")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"--listen '{listen}': HOST must be an IP address to bind") from None
    _check_port("--listen", int(port_text))
    _check_port("--superlink-port", superlink_port)
    if int(port_text) == superlink_port and host in ("127.0.0.1", "0.0.0.0", "::", "::1"):
        raise ConfigError("--listen and --superlink-port must differ: the door is not the link")
    if max_body_size_mib <= 0:
        raise ConfigError(f"--max-body-mib must be positive, got {max_body_size_mib}")
    paths = {name: certs / name for name in ("server.pem", "server.key", "ca.crt")}
    for path in paths.values():
        if not path.is_file():
            raise ConfigError(f"{path}: not found (create it with `fedfin certs --out {certs}`)")
    names = certificate_dns_names(paths["server.pem"])
    if not names:
        raise ConfigError(
            f"{paths['server.pem']} names no DNS host; nginx verifies the SuperLink by DNS "
            "name: recreate it with `fedfin certs --host <dns name> ...`"
        )
    return ProxyConfig(
        listen_host=host,
        listen_port=int(port_text),
        superlink_port=superlink_port,
        server_cert=paths["server.pem"].resolve(),
        server_key=paths["server.key"].resolve(),
        ca_cert=paths["ca.crt"].resolve(),
        prefix=prefix.resolve(),
        superlink_tls_name=names[0],
        max_body_size_mib=max_body_size_mib,
    )


def _listen_address(config: ProxyConfig) -> str:
    if ":" in config.listen_host:
        return f"[{config.listen_host}]:{config.listen_port}"
    return f"{config.listen_host}:{config.listen_port}"


def _fleet_location(path: str) -> str:
    # An exact-match location that always sends the canonical path upstream: whatever
    # spelling of the URI nginx normalised to `path`, the SuperLink sees only `path`.
    return f"""
        location = {path} {{
            limit_except POST {{ deny all; }}
            proxy_pass https://superlink{path};
        }}"""


def render_nginx_config(config: ProxyConfig) -> str:
    """The full nginx.conf text: one TLS server, Fleet paths forwarded, all else 404."""
    prefix = config.prefix
    locations = "".join(_fleet_location(path) for path in FLEET_PATHS)
    return f"""# Generated by `fedfin proxy-config`: the coordinator's only public door.
# Forwards the Fleet API calls of authenticated SuperNodes to the SuperLink on loopback;
# Control (/v1/control) and Runtime (/v1/runtime) APIs are not reachable through it.
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} warn;

events {{
    worker_connections 512;
}}

http {{
    access_log {prefix / "logs" / "access.log"};
    client_body_temp_path {prefix / "tmp" / "client_body"};
    proxy_temp_path {prefix / "tmp" / "proxy"};
    fastcgi_temp_path {prefix / "tmp" / "fastcgi"};
    uwsgi_temp_path {prefix / "tmp" / "uwsgi"};
    scgi_temp_path {prefix / "tmp" / "scgi"};
    server_tokens off;

    upstream superlink {{
        server 127.0.0.1:{config.superlink_port};
        keepalive 16;
    }}

    server {{
        listen {_listen_address(config)} ssl;
        ssl_certificate {config.server_cert};
        ssl_certificate_key {config.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {config.max_body_size_mib}m;

        # The loopback hop is TLS too, verified against the federation's own CA.
        proxy_ssl_verify on;
        proxy_ssl_trusted_certificate {config.ca_cert};
        proxy_ssl_name {config.superlink_tls_name};
        proxy_ssl_server_name on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        # Stream both ways: no request or response ever lands in nginx's temp files.
        proxy_request_buffering off;
        proxy_buffering off;
        proxy_read_timeout {config.read_timeout_s}s;
        proxy_send_timeout {config.read_timeout_s}s;
{locations}

        location / {{
            return 404;
        }}
    }}
}}
"""


def write_nginx_config(config: ProxyConfig, out: Path) -> Path:
    """Write the config to `out` and create the prefix directories nginx writes into."""
    for sub in ("logs", "tmp"):
        (config.prefix / sub).mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_nginx_config(config))
    return out
