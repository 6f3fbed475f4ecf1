"""The drain gate in front of every RPC handler: at shutdown new calls get UNAVAILABLE.

grpcio's ``server.stop(grace)`` does not answer calls that reach it after shutdown has begun:
it drops them and the client sees ``CANCELLED``, so a busy client racing the stop gets an
error it cannot act on. Draining first closes that window: while the server still runs, new
calls are answered ``UNAVAILABLE`` (retry elsewhere or later), streams end with ``UNAVAILABLE``
at their next message, and the server is stopped only once the calls in flight are done (or
the grace period is over) and no call has come or gone for :data:`QUIET` seconds, so a client
whose call just finished hears the refusal for its next one instead of racing the stop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, cast

from quantix import bridge, errors

if TYPE_CHECKING:
    import grpc
    from twisted.internet import defer

    from quantix.rpc.status import Handler, StreamHandler

SHUTTING_DOWN = "node daemon is shutting down"
#: Seconds without any call starting, ending or being refused before the server may stop
#: (capped at half the grace period): longer than a busy client takes to send its next call.
QUIET = 0.1


class Drain:
    """Counts calls in flight; after :meth:`start` refuses new ones. Thread-safe."""

    def __init__(self) -> None:
        #: Set once draining begins; a streaming handler may ``wait`` on it instead of sleeping.
        self.draining = threading.Event()
        self._active = 0
        self._idle = threading.Condition()
        self._since = 0.0
        self._last = 0.0  # when a call last ended or was refused

    @property
    def active(self) -> int:
        return self._active

    def start(self) -> None:
        with self._idle:
            if not self.draining.is_set():
                # The quiet period counts from the last call that ended, not from now: with
                # nothing recent there is no client about to send its next call, and an idle
                # daemon stops at once.
                self._since = time.monotonic()
            self.draining.set()
            self._idle.notify_all()

    def reset(self) -> None:
        """Serve again (a node service started after a stop, as tests do)."""
        self.draining.clear()

    def wait_idle(self, grace: float) -> float:
        """Blocking: wait until no call is in flight and all is quiet, or until ``grace``
        seconds after :meth:`start`; returns the seconds left of ``grace``."""
        deadline = (self._since if self.draining.is_set() else time.monotonic()) + grace
        quiet = min(QUIET, grace / 2)
        with self._idle:
            while (now := time.monotonic()) < deadline:
                if self._active:
                    self._idle.wait(deadline - now)
                elif now >= self._last + quiet:
                    break
                else:
                    self._idle.wait(min(self._last + quiet, deadline) - now)
        return max(0.0, deadline - time.monotonic())

    def wait_idle_in_thread(self, grace: float) -> defer.Deferred[float]:
        """:meth:`wait_idle` off the reactor; a Deferred firing with the seconds left."""
        return bridge.run_in_worker(self.wait_idle, grace)

    def _enter(self) -> None:
        with self._idle:
            if self.draining.is_set():
                self._last = time.monotonic()
                raise errors.Unavailable(SHUTTING_DOWN)
            self._active += 1

    def _leave(self) -> None:
        with self._idle:
            self._active -= 1
            self._last = time.monotonic()
            if self._active == 0:
                self._idle.notify_all()

    def wrap(self, handlers: Mapping[str, Handler], streaming: set[str]) -> dict[str, Handler]:
        """Gate every handler; names in ``streaming`` are generator handlers."""
        return {
            name: (self._stream(cast("StreamHandler", impl)) if name in streaming else self._unary(impl))
            for name, impl in handlers.items()
        }

    def _unary(self, impl: Handler) -> Handler:
        def call(request: object, context: grpc.ServicerContext) -> object:
            self._enter()
            try:
                return impl(request, context)
            finally:
                self._leave()

        return call

    def _stream(self, impl: StreamHandler) -> StreamHandler:
        def call(request: object, context: grpc.ServicerContext) -> Iterator[object]:
            self._enter()
            try:
                for item in impl(request, context):
                    yield item
                    if self.draining.is_set():
                        raise errors.Unavailable(SHUTTING_DOWN)
            finally:
                self._leave()

        return call
