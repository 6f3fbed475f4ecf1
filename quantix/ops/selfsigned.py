"""A self-signed TLS certificate for the 8443 side API, generated once into the state dir.

The control plane dials ``https://<management ip>:8443`` and never verifies the certificate, so
a self-signed one is enough; what matters is that it exists without an operator step and stays
the same across restarts (clients that pin it keep working). It is an EC P-256 key with the
hostname and the management IP as subject alternative names, valid for a year and replaced when
it is about to expire or unreadable. Blocking (file I/O, key generation): run it in a thread or
before the reactor starts.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from quantix import state
from quantix.util.files import atomic_write

CERT_NAME = "server.crt"
KEY_NAME = "server.key"
VALIDITY = datetime.timedelta(days=365)
#: A certificate with less than this left is replaced at startup.
RENEW_BEFORE = datetime.timedelta(days=30)


@attrs.frozen
class CertPaths:
    cert: str
    key: str
    generated: bool  # False when an existing pair was reused


def _names(hostname: str, ips: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    for text in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError:
            continue
    return names


def generate(hostname: str, ips: list[str], now: datetime.datetime | None = None) -> tuple[bytes, bytes]:
    """``(cert_pem, key_pem)`` of a new self-signed EC P-256 certificate for ``hostname``/``ips``."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64] or "quantix-node")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(_names(hostname, ips)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _usable(cert_path: Path, key_path: Path, now: datetime.datetime) -> bool:
    """The pair exists, parses, belongs together and is not about to expire."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return False
    same = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return same and cert.not_valid_after_utc - now > RENEW_BEFORE


def ensure(state_dir: str, hostname: str, ips: list[str], now: datetime.datetime | None = None) -> CertPaths:
    """The pair under ``<state_dir>/https/``: reused when usable, otherwise generated (key 0600)."""
    now = now or datetime.datetime.now(datetime.UTC)
    folder = state.ensure_dir(os.path.join(state_dir, "https"))
    cert_path, key_path = folder / CERT_NAME, folder / KEY_NAME
    if _usable(cert_path, key_path, now):
        return CertPaths(str(cert_path), str(key_path), generated=False)
    cert_pem, key_pem = generate(hostname, ips, now)
    # The key first: a crash in between leaves a mismatched pair, which the next start replaces.
    atomic_write(key_path, key_pem, mode=0o600)
    atomic_write(cert_path, cert_pem, mode=0o644)
    return CertPaths(str(cert_path), str(key_path), generated=True)
