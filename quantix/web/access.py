"""Who may call which 8443 route: stricter than upstream, which checks nobody.

Three classes of route:

- ``GUARDED`` acts on a guest or the host (execute, agent install/update/shutdown/reboot/files,
  cdrom, updates/apply): only loopback, the addresses the control-plane URL resolves to and
  ``https.allowed_clients``;
- ``READ`` (logs, pings, agent refresh/logs, update version/check/status): the same list, or
  anyone with ``https.open_read_only``;
- ``OPEN`` (the registration routes): anyone; token and discovery check the registration token.

On top of the address list, ``https.token`` (Bearer) and ``https.client_ca`` (a client
certificate signed by it, requested during the handshake) are required on GUARDED and READ when
configured. Every refusal is logged with the client, route and reason, and answered 403 JSON.
"""

from __future__ import annotations

import enum
import hmac

import attrs
from twisted.logger import Logger
from twisted.web.http import Request

from quantix.ops import regtoken
from quantix.web.allow import ClientAllowList
from quantix.web.errors import HttpError

log = Logger(namespace="quantix.web.access")


class Kind(enum.Enum):
    OPEN = "open"
    READ = "read"
    GUARDED = "guarded"


@attrs.define
class RouteAccess:
    """The policy of one listener; ``clients`` is replaced when the control plane re-resolves."""

    clients: ClientAllowList
    open_read_only: bool = False
    token: str | None = None
    require_client_cert: bool = False

    def check(self, kind: Kind, peer: str, request: Request) -> None:
        """Raise 403 :class:`HttpError` (and log why) unless the client may use a ``kind`` route."""
        if kind is Kind.OPEN:
            return
        why = self._refusal(kind, peer, request)
        if why is None:
            return
        path = request.path.decode("latin-1", "replace")[:200]
        log.warn(
            "refused {peer}: {method} {path}: {why}",
            peer=peer,
            method=request.method.decode("latin-1"),
            path=path,
            why=why,
        )
        raise HttpError(403, "forbidden", f"client {peer} is not allowed: {why}")

    def _refusal(self, kind: Kind, peer: str, request: Request) -> str | None:
        if not (kind is Kind.READ and self.open_read_only) and not self.clients(peer):
            return "address not in the allow-list (loopback, control plane, https.allowed_clients)"
        if self.token is not None:
            presented = regtoken.bearer(request.getHeader(b"authorization"))
            if presented is None or not hmac.compare_digest(presented.encode(), self.token.encode()):
                return "missing or wrong bearer token"
        if self.require_client_cert and not _has_client_cert(request):
            return "no client certificate signed by https.client_ca"
        return None


def _has_client_cert(request: Request) -> bool:
    """The TLS layer verified any certificate sent against the CA; here: was one sent. (The
    channel's transport is the connection wrapper, which passes ``getPeerCertificate`` through
    to the TLS transport without declaring ``ISSLTransport``.)"""
    get = getattr(request.channel.transport, "getPeerCertificate", None)
    try:
        return get is not None and get() is not None
    except Exception:  # not a TLS connection, or the handshake is gone
        return False
