"""A twisted.web listener as a service of the node: on at start, off at stop, ``None`` = off.

It tracks open connections, so a stop does not leave keep-alive clients attached to a site
that is gone.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLContextFactory,
    IProtocolNegotiationFactory,
    IReactorSSL,
)
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import IResource
from zope.interface import implementer

from quantix import bridge
from quantix.config import ListenError, parse_address
from quantix.util.reactor import INodeReactor
from quantix.web.allow import ClientAllowList, resolve_host
from quantix.web.request import MAX_BODY, JsonSite

log = Logger(namespace="quantix.web")


@implementer(IProtocolNegotiationFactory)
class _TrackingFactory(WrappingFactory, ServerFactory):
    """Tracks connections and, over TLS, answers ALPN itself: a plain ``WrappingFactory`` hides
    the site's ALPN support, and then a client offering ALPN (curl does) gets an "internal error"
    alert instead of a handshake. HTTP/1.1 only: the request limits are written for it.

    ``ServerFactory`` adds nothing at run time; it says what this factory is for (Twisted's
    ``WrappingFactory`` derives from ``ClientFactory``, and ``listenTCP`` takes server factories)."""

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


class WebListener(Service):
    """Serve ``resource`` on ``listen`` (``host:port``; ``None`` disables).

    ``allow`` is the client policy; when it is a restricting :class:`ClientAllowList` and
    ``control_plane_url`` is given, the control plane's addresses are resolved (in a thread)
    at start and added. ``tls`` is an ``IOpenSSLServerConnectionCreator``/context factory for
    HTTPS; without it the listener is plain HTTP.
    """

    name: str  # never None here: it names the listener in logs and errors

    def __init__(
        self,
        reactor: INodeReactor,
        listen: str | None,
        resource: IResource,
        *,
        name: str = "http",
        allow: Callable[[str], bool] | None = None,
        control_plane_url: str | None = None,
        tls: IOpenSSLContextFactory | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.reactor = reactor
        self.listen = listen or None
        self.name = name
        self.tls = tls
        self.control_plane_url = control_plane_url
        self.site = JsonSite(resource, reactor=reactor, max_body=max_body, allow=allow)
        # Tracks open connections, so a stop can close keep-alive clients too.
        self._factory = _TrackingFactory(self.site)
        self._factory.noisy = False  # no "Starting factory <..._TrackingFactory object at 0x...>"
        self.port: int | None = None
        self._listening: IListeningPort | None = None

    def startService(self) -> None:
        if self.listen is None:
            log.info("{name} listener off", name=self.name)
            super().startService()
            return
        try:
            host, port = parse_address(self.listen)
        except ValueError as exc:
            reason = f"invalid address: {exc}"
            raise ListenError.of(self.name, repr(self.listen), reason, self._hint()) from None
        try:
            if self.tls is not None:
                tls_reactor = IReactorSSL(self.reactor)  # the running reactor provides it
                self._listening = tls_reactor.listenSSL(port, self._factory, self.tls, interface=host)
            else:
                self._listening = self.reactor.listenTCP(port, self._factory, interface=host)
        except CannotListenError as exc:
            reason = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
            raise ListenError.of(self.name, self.listen, reason.lower(), self._hint()) from None
        address = self._listening.getHost()
        self.port = address.port if isinstance(address, IPv4Address | IPv6Address) else None
        self._resolve_control_plane()
        scheme = "https" if self.tls is not None else "http"
        log.info(
            "{name} on {scheme}://{listen} (port {port})",
            name=self.name,
            scheme=scheme,
            listen=self.listen,
            port=self.port,
        )
        super().startService()

    def _hint(self) -> str:
        """How to move this listener (a second daemon on the same host meets its port too)."""
        return f"choose another with {self.name}.listen in the configuration; null turns it off"

    def _resolve_control_plane(self) -> None:
        policy = self.site.allow
        if not isinstance(policy, ClientAllowList) or policy.networks is None or not self.control_plane_url:
            return

        def resolved(addresses: list[str]) -> None:
            if self.site.allow is policy:
                self.site.allow = policy.with_addresses(addresses)

        bridge.run_in_worker(resolve_host, self.control_plane_url, reactor=self.reactor).addCallback(resolved)

    @defer.inlineCallbacks
    def stopService(self) -> Generator[defer.Deferred[None], None, None]:
        super().stopService()
        listening, self._listening = self._listening, None
        stopped = listening.stopListening() if listening is not None else None
        if stopped is not None:
            yield stopped
        for connection in list(self._factory.protocols):
            connection.loseConnection()
