"""systemd's notify protocol over ``$NOTIFY_SOCKET``, with the watchdog fed from the reactor.

The protocol is one datagram of ``KEY=value`` lines on a Unix socket, so a plain socket does it
without libsystemd. Watchdog pings come from a ``LoopingCall``: when the reactor stops turning
the pings stop, and systemd restarts the service after ``WatchdogSec``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="quantix.ops.notify")


def notify_address(environ: Mapping[str, str]) -> bytes | None:
    """The socket address from ``NOTIFY_SOCKET``: a path, or ``@name`` for the abstract namespace."""
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return b"\0" + os.fsencode(value[1:])
    if value.startswith("/"):
        return os.fsencode(value)
    return None  # unset, or a transport we do not speak (vsock:)


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings: half of ``WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

    ``WATCHDOG_PID`` names the process the watchdog is meant for; any other process stays quiet.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 2 / 1_000_000


class Notifier:
    """Tell systemd when the daemon is ready and stopping, and keep its watchdog fed.

    Without ``NOTIFY_SOCKET`` (not under systemd, or ``Type=simple``) every call is a no-op.
    """

    def __init__(self, reactor: IReactorTime, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.reactor = reactor
        self.address = notify_address(env)
        self.interval = watchdog_interval(env, os.getpid()) if self.address else None
        self._sock: socket.socket | None = None
        self._watchdog: task.LoopingCall | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one notification; failures are logged once and never raised (systemd is optional)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the reactor on a full receive queue: a lost ping is better.
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warn("cannot notify systemd at {address}: {err}", address=self.address, err=exc)
            return False
        return True

    def ready(self, status: str = "") -> None:
        """READY=1 (call once every box has started and gRPC is bound), then start the watchdog."""
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={status}")
        self.send(*lines)
        if self.interval is not None and self._watchdog is None:
            self._watchdog = task.LoopingCall(self.send, "WATCHDOG=1")
            self._watchdog.clock = self.reactor
            self._watchdog.start(self.interval, now=True)
            log.info("systemd watchdog: pinging every {interval:.3g}s", interval=self.interval)

    def stopping(self, status: str = "") -> None:
        """STOPPING=1: systemd shows the unit as deactivating while we drain."""
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={status}")
        self.send(*lines)

    def close(self) -> None:
        """Stop the watchdog pings and close the socket (at the very end of shutdown)."""
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
