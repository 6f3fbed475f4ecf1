"""``/api/v1/updates/*`` and ``/api/v1/registration/*`` on 8443: update dashboard and Add Host.

Updates answer from :mod:`quantix.ops.updates` (no update source: nothing available, ``idle``,
``apply`` refused). Registration is the control plane's pull flow: ``ping`` is open;
``token`` and ``discovery`` need the one-hour token an operator minted on the host
(``quantix-nodectl registration-token``) as ``Authorization: Bearer``. The token file and host
facts are read in a worker thread.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import libvirt
from twisted.internet import defer

import quantix
from quantix.config import Config
from quantix.hypervisor import discovery, hostinfo
from quantix.ops import regtoken, updates
from quantix.util.jsontypes import JsonObject
from quantix.web.access import Kind
from quantix.web.errors import HttpError
from quantix.web.router import Call
from quantix.web.routes import Routes

API = "/api/v1"


def identity(host: hostinfo.HostBox) -> tuple[str, str]:
    """Worker: ``(hostname, management IP)``, the values registration and GetConsole use."""
    return host.hostname or socket.gethostname(), host.management_ip()


class HostRoutes:
    """``host`` is the host-facts box; ``conn()`` the live libvirt connection."""

    def __init__(
        self,
        config: Config,
        conn: Callable[[], libvirt.virConnect],
        host: hostinfo.HostBox,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.conn = conn
        self.host = host
        self.now = now

    def register(self, routes: Routes) -> None:
        routes.add("GET", f"{API}/updates/version", Kind.READ, self.update_version)
        routes.add(
            "GET", f"{API}/updates/check", Kind.READ, lambda c: updates.check(self.config.updates.channel)
        )
        routes.add("GET", f"{API}/updates/status", Kind.READ, lambda c: updates.status())
        routes.add("POST", f"{API}/updates/apply", Kind.GUARDED, self.update_apply)
        routes.add("GET", f"{API}/registration/ping", Kind.OPEN, self.registration_ping)
        routes.add("GET", f"{API}/registration/token", Kind.OPEN, self.registration_token)
        routes.add("GET", f"{API}/registration/discovery", Kind.OPEN, self.registration_discovery)

    def update_version(self, call: Call) -> defer.Deferred[JsonObject]:
        def version() -> JsonObject:
            return updates.version(identity(self.host)[0], self.config.updates.channel)

        return call.in_thread(version)

    def update_apply(self, call: Call) -> None:
        exc = updates.UpdateUnsupported()
        raise HttpError(exc.status, exc.code, str(exc))

    def registration_ping(self, call: Call) -> defer.Deferred[JsonObject]:
        def ping() -> JsonObject:
            hostname, ip = identity(self.host)
            return {
                "status": "ok",
                "version": quantix.__version__,
                "message": "Quantix node daemon",
                "apiVersion": "v1",
                "hostname": hostname,
                "managementIp": ip,
                "registrationApiSupported": True,
                "timestamp": regtoken.rfc3339(self.now()),
            }

        return call.in_thread(ping)

    def _check_token(self, call: Call) -> regtoken.Token:
        """Blocking: the valid token, or the 404/401 the control plane tells apart."""
        presented = regtoken.bearer(call.request.getHeader(b"authorization"))
        try:
            return regtoken.check(self.config.state_dir, presented, self.now)
        except regtoken.TokenError as exc:
            raise HttpError(exc.status, exc.code, str(exc)) from None

    def registration_token(self, call: Call) -> defer.Deferred[JsonObject]:
        def token() -> JsonObject:
            tok = self._check_token(call)
            hostname, ip = identity(self.host)
            return {
                "token": tok.token,
                "createdAt": regtoken.rfc3339(tok.created_at),
                "expiresAt": regtoken.rfc3339(tok.expires_at),
                "expiresInSeconds": tok.expires_in(self.now()),
                "hostname": hostname,
                "managementIp": ip,
            }

        return call.in_thread(token)

    def registration_discovery(self, call: Call) -> defer.Deferred[JsonObject]:
        def discover() -> JsonObject:
            self._check_token(call)
            return discovery.discovery(self.host.facts(self.conn()))

        return call.in_thread(discover)
