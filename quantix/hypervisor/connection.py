"""The supervised libvirt connection: opened off the reactor, watched, reopened with backoff.

Everything else asks :meth:`Hypervisor.conn` for the live connection and gets
:class:`~quantix.errors.HypervisorDown` while there is none: the daemon never falls back to a
fake backend. Listeners hear about (re)connects on the reactor thread, so event callbacks are
registered again and state is reconciled after every reconnect.

The supervisor is a named-state machine (:data:`TRANSITIONS`), modelled on Twisted's
``ClientService``: the clock, the backoff, and the blocking open and close are injected, so
every transition is tested on a ``task.Clock`` with recording dummies and no libvirt at all.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
import libvirt
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from quantix import bridge, errors
from quantix.hypervisor import eventloop
from quantix.util.backoff import Backoff
from quantix.util.reactor import INodeReactor
from quantix.util.states import StateMachine

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


class Conn(enum.Enum):
    """Where the supervisor is."""

    IDLE = "idle"  # built, not started
    CONNECTING = "connecting"  # an open runs in a worker thread
    CONNECTED = "connected"  # a live connection; conn() returns it
    WAITING = "waiting"  # the last open failed or the connection was lost; a retry is scheduled
    STOPPED = "stopped"  # stopService ran; a late open result is closed at once


class Input(enum.Enum):
    START = "start"
    OPENED = "opened"
    OPEN_FAILED = "open_failed"
    RETRY = "retry"
    LOST = "lost"
    STOP = "stop"


#: Every legal move; anything else raises :class:`~quantix.util.states.IllegalTransition`.
TRANSITIONS: dict[tuple[Conn, Input], Conn] = {
    (Conn.IDLE, Input.START): Conn.CONNECTING,
    (Conn.STOPPED, Input.START): Conn.CONNECTING,
    (Conn.CONNECTING, Input.OPENED): Conn.CONNECTED,
    (Conn.CONNECTING, Input.OPEN_FAILED): Conn.WAITING,
    (Conn.WAITING, Input.RETRY): Conn.CONNECTING,
    (Conn.CONNECTED, Input.LOST): Conn.WAITING,
    (Conn.IDLE, Input.STOP): Conn.STOPPED,
    (Conn.CONNECTING, Input.STOP): Conn.STOPPED,
    (Conn.WAITING, Input.STOP): Conn.STOPPED,
    (Conn.CONNECTED, Input.STOP): Conn.STOPPED,
    (Conn.STOPPED, Input.STOP): Conn.STOPPED,
}

Opener = Callable[[], "defer.Deferred[tuple[libvirt.virConnect, HypervisorIdentity]]"]
Closer = Callable[[libvirt.virConnect], object]


def _close(conn: libvirt.virConnect) -> None:
    """Blocking: runs in a pool thread."""
    try:
        conn.unregisterCloseCallback()
    except libvirt.libvirtError:
        pass
    try:
        conn.close()
    except libvirt.libvirtError:
        pass


def _close_in_worker(conn: libvirt.virConnect) -> defer.Deferred[None]:
    return bridge.run_in_worker(_close, conn)


class Hypervisor(Service):
    """Owns the one libvirt connection of the daemon (a thin service shell around the states).

    Reactor thread only, except :meth:`conn` and :attr:`connected` (any thread).
    """

    def __init__(
        self,
        reactor: INodeReactor,
        uri: str,
        *,
        event_loop: str = "thread",
        keepalive: tuple[int, int] = (5, 3),
        backoff: Backoff | None = None,
        opener: Opener | None = None,
        closer: Closer = _close_in_worker,
    ) -> None:
        """``opener`` (default: ``libvirt.open`` of ``uri`` in a worker thread) and ``closer``
        are the only I/O; tests pass dummies."""
        self.reactor = reactor
        self.uri = uri
        self.event_loop_kind = event_loop
        self.keepalive = keepalive
        self.loop: eventloop.EventLoop | None = None
        self.identity: HypervisorIdentity | None = None
        self.reconnects = 0
        self.states = StateMachine("libvirt connection", Conn.IDLE, TRANSITIONS)
        self._conn: libvirt.virConnect | None = None
        self._backoff = backoff or Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        self._opener = opener
        self._closer = closer
        self._retry: IDelayedCall | None = None
        #: Bumped by every open and by stop: a result for an older number is stale.
        self._attempt = 0
        self._listeners: list[tuple[Callable[[libvirt.virConnect], object], Callable[[], object] | None]] = []

    # -- public API --------------------------------------------------------------------------

    @property
    def state(self) -> Conn:
        return self.states.state

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
        self,
        on_connect: Callable[[libvirt.virConnect], object],
        on_disconnect: Callable[[], object] | None = None,
    ) -> None:
        """Call ``on_connect(conn)`` on the reactor after every (re)connect, now if connected."""
        self._listeners.append((on_connect, on_disconnect))
        if self._conn is not None:
            on_connect(self._conn)

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.loop is None:
            # libvirt needs its event implementation before the first open, once per process.
            self.loop = eventloop.install(self.event_loop_kind, self.reactor)
        # libvirt prints every error to stderr by default; ours are raised and logged instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.start()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        return self.stop()

    # -- inputs -------------------------------------------------------------------------------

    def start(self) -> None:
        """IDLE/STOPPED → CONNECTING: open in a worker thread."""
        self.states.fire(Input.START)
        self._open()

    def stop(self) -> defer.Deferred[None] | None:
        """Every state → STOPPED: cancel the retry, forget an open in flight, close the connection."""
        self.states.fire(Input.STOP)
        self._attempt += 1
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        conn, self._conn = self._conn, None
        if conn is None:
            return None
        return defer.maybeDeferred(self._closer, conn).addCallback(lambda _: None)

    def _open(self) -> None:
        self._attempt += 1
        attempt = self._attempt
        opener = self._opener or (lambda: bridge.run_in_worker(_open, self.uri, self.keepalive))
        d = defer.maybeDeferred(opener)
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(attempt,), errbackArgs=(attempt,))

    def _opened(self, result: tuple[libvirt.virConnect, HypervisorIdentity], attempt: int) -> None:
        conn, ident = result
        if attempt != self._attempt:  # stopped (and maybe restarted) while it opened
            self._closer(conn)
            return
        self.states.fire(Input.OPENED)
        if self.identity is not None:
            self.reconnects += 1
        self.identity = ident
        self._backoff.reset()
        assert self.loop is not None
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

    def _open_failed(self, failure: Failure, attempt: int) -> None:
        if attempt != self._attempt:
            return
        self.states.fire(Input.OPEN_FAILED)
        delay = self._backoff.next()
        log.warn(
            "cannot connect to {uri}: {err}; retrying in {delay:.1f}s",
            uri=self.uri,
            err=failure.getErrorMessage(),
            delay=delay,
        )
        self._retry = self.reactor.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        """WAITING → CONNECTING."""
        self._retry = None
        self.states.fire(Input.RETRY)
        self._open()

    def _closed(self, conn: libvirt.virConnect, reason: int, opaque: object = None) -> None:
        """libvirt's close callback (on the reactor): CONNECTED → WAITING, unless it is stale."""
        if self._conn is not conn:
            return
        self.states.fire(Input.LOST)
        self._conn = None
        log.warn("libvirt connection to {uri} lost (reason {reason})", uri=self.uri, reason=reason)
        for _, on_disconnect in list(self._listeners):
            if on_disconnect is not None:
                try:
                    on_disconnect()
                except Exception:
                    log.failure("disconnect listener failed")
        self._closer(conn)
        self._retry = self.reactor.callLater(self._backoff.next(), self._retry_now)
