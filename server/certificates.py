"""TLS material for a coordinator: a private CA and a SuperLink certificate it signs.

Banks receive only `ca.crt`, to check they talk to the real SuperLink. The server
certificate carries every DNS name and IP address banks will use to reach it (SANs):
a certificate without the right SAN is refused by the bank's TLS check.
"""

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfin.common.atomic import write_atomically
from fedfin.common.errors import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


@dataclass(frozen=True)
class CertificatePaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, private: bool) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        if private:
            os.chmod(tmp, 0o600)

    write_atomically(path, write)


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host):
                raise ConfigError(f"--host '{host}' is not a DNS name or IP address") from None
            names.append(x509.DNSName(host))
    return names


def create_certificates(out: Path, hosts: list[str], days: int = 365) -> CertificatePaths:
    """Write ca.crt/ca.key and server.pem/server.key (ECDSA P-384) to `out`."""
    if not hosts:
        raise ConfigError("--host: give at least one DNS name or IP address of the SuperLink")
    if days <= 0:
        raise ConfigError(f"--days must be positive, got {days}")
    paths = CertificatePaths(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    existing = [p for p in (paths.ca_cert, paths.server_cert) if p.exists()]
    if existing:
        raise ConfigError(f"{existing[0]} already exists; choose a new --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedfin federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths.ca_key, _key_pem(ca_key), private=True)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths.server_key, _key_pem(server_key), private=True)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths
