"""gRPC server credentials from the ``server.tls_*`` settings (plaintext when none are set)."""

from __future__ import annotations

import grpc

from quantix.config import ServerConfig


class TLSConfigError(Exception):
    """A certificate file cannot be read; the message names it."""


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise TLSConfigError(f"server.{key} {path}: {exc.strerror}") from None


def server_credentials(server: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials, requiring client certificates when a client CA is configured."""
    if not server.tls_cert:
        return None
    cert = _read(server.tls_cert, "tls_cert")
    key = _read(server.tls_key or "", "tls_key")
    ca = _read(server.tls_client_ca, "tls_client_ca") if server.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )
