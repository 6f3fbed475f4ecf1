"""The supervised libvirt connection: opened off the reactor, watched, reopened with backoff.

Everything else asks :meth:`Hypervisor.conn` for the live connection and gets
:class:`~quantix.errors.HypervisorDown` while there is none: the daemon never falls back to a
fake backend. Listeners hear about (re)connects on the reactor thread, so event callbacks are
registered again and state is reconciled after every reconnect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import libvirt
from twisted.application.service import Service
from twisted.logger import Logger

from quantix import bridge, errors
from quantix.hypervisor import eventloop
from quantix.util.backoff import Backoff

log = Logger(namespace="quantix.hypervisor")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0


@attrs.frozen
class HypervisorIdentity:
    """Facts read once per connection, so HealthCheck never makes a libvirt round trip."""

    name: str
    version: str
    libvirt_version: str
    hostname: str


def format_version(number: int) -> str:
    """libvirt packs versions as major * 1,000,000 + minor * 1,000 + release."""
    return f"{number // 1_000_000}.{number // 1_000 % 1_000}.{number % 1_000}"


def _keepalive(conn: libvirt.virConnect, keepalive: tuple[int, int]) -> None:
    """Probe the daemon every ``interval`` s; ``count`` unanswered probes close the connection
    (and fire the close callback). In-process drivers have no peer to probe: that is fine."""
    try:
        conn.setKeepAlive(*keepalive)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_UNSUPPORTED):
            raise
        log.info("no keepalive on this connection: {err}", err=exc.get_error_message())


def _open(uri: str, keepalive: tuple[int, int]) -> tuple[libvirt.virConnect, HypervisorIdentity]:
    """Blocking: runs in a pool thread."""
    conn = libvirt.open(uri)
    try:
        if not uri.startswith("test:"):
            _keepalive(conn, keepalive)
        ident = HypervisorIdentity(
            name=conn.getType(),
            version=format_version(conn.getVersion()),
            libvirt_version=format_version(conn.getLibVersion()),
            hostname=conn.getHostname(),
        )
    except libvirt.libvirtError:
        conn.close()
        raise
    return conn, ident


class Hypervisor(Service):
    """Owns the one libvirt connection of the daemon."""

    def __init__(
        self,
        reactor: Any,
        uri: str,
        *,
        event_loop: str = "thread",
        keepalive: tuple[int, int] = (5, 3),
        backoff: Backoff | None = None,
    ):
        self.reactor = reactor
        self.uri = uri
        self.event_loop_kind = event_loop
        self.keepalive = keepalive
        self.loop: Any = None
        self.identity: HypervisorIdentity | None = None
        self.reconnects = 0
        self._conn: libvirt.virConnect | None = None
        self._backoff = backoff or Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        self._retry: Any = None
        self._opening = False
        self._listeners: list[tuple[Callable[[libvirt.virConnect], Any], Callable[[], Any] | None]] = []

    # -- public API --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def conn(self) -> libvirt.virConnect:
        """The live connection, or :class:`HypervisorDown`. Safe from any thread."""
        conn = self._conn
        if conn is None:
            raise errors.HypervisorDown()
        return conn

    def listen(
        self, on_connect: Callable[[libvirt.virConnect], Any], on_disconnect: Callable[[], Any] | None = None
    ):
        """Call ``on_connect(conn)`` on the reactor after every (re)connect, now if connected."""
        self._listeners.append((on_connect, on_disconnect))
        if self._conn is not None:
            on_connect(self._conn)

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        # libvirt needs its event implementation before the first open, once per process.
        self.loop = eventloop.install(self.event_loop_kind, self.reactor)
        # libvirt prints every error to stderr by default; ours are raised and logged instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self._connect()

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        conn, self._conn = self._conn, None
        if conn is None:
            return None
        return bridge.run_in_worker(self._close, conn)

    # -- internals ----------------------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if not self.running or self._opening:
            return
        self._opening = True
        d = bridge.run_in_worker(_open, self.uri, self.keepalive)
        d.addCallbacks(self._opened, self._open_failed)

    def _opened(self, result: tuple[libvirt.virConnect, HypervisorIdentity]) -> None:
        self._opening = False
        conn, ident = result
        if not self.running:
            bridge.run_in_worker(self._close, conn)
            return
        if self.identity is not None:
            self.reconnects += 1
        self.identity = ident
        self._backoff.reset()
        conn.registerCloseCallback(self.loop.dispatch(self._closed), None)
        self._conn = conn
        log.info(
            "connected to {uri} ({name} {version})", uri=self.uri, name=ident.name, version=ident.version
        )
        for on_connect, _ in list(self._listeners):
            try:
                on_connect(conn)
            except Exception:
                log.failure("connect listener failed")

    def _open_failed(self, failure: Any) -> None:
        self._opening = False
        delay = self._backoff.next()
        log.warn(
            "cannot connect to {uri}: {err}; retrying in {delay:.1f}s",
            uri=self.uri,
            err=failure.getErrorMessage(),
            delay=delay,
        )
        self._schedule(delay)

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        self._retry = self.reactor.callLater(delay, self._connect)

    def _closed(self, conn: libvirt.virConnect, reason: int, opaque: Any = None) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        log.warn("libvirt connection to {uri} lost (reason {reason})", uri=self.uri, reason=reason)
        for _, on_disconnect in list(self._listeners):
            if on_disconnect is not None:
                try:
                    on_disconnect()
                except Exception:
                    log.failure("disconnect listener failed")
        bridge.run_in_worker(self._close, conn)
        self._schedule(self._backoff.next())

    @staticmethod
    def _close(conn: libvirt.virConnect) -> None:
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
