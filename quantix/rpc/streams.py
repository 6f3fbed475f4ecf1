"""The stream budget: long-lived server streams get threads of their own, and only so many.

grpcio's sync server runs a server-streaming handler in one worker thread for as long as the
stream is open. Were streams and unary calls to share one pool, enough open streams (one client
connection may open ``server.max_streams_per_connection`` of them) would leave no worker for
``HealthCheck`` or ``ListVMs``. So every streaming handler runs in a pool of its own (grpcio's
``experimental_thread_pool`` hook on the behaviour), sized to the budget plus a few threads that
do nothing but refuse: a stream over the budget is answered ``RESOURCE_EXHAUSTED`` at once,
naming the limit, and the unary pool is never touched by streams.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from quantix import errors

if TYPE_CHECKING:
    import grpc

    from quantix.rpc.status import StreamHandler

#: A gRPC behaviour (any callable grpc runs for a call).
B = TypeVar("B", bound=Callable[..., object])

#: Threads beyond the budget: they only answer refusals, so a burst of streams over the budget
#: is refused promptly instead of queueing behind the open ones.
REFUSERS = 4


class StreamBudget:
    """Counts open streams against ``limit``; thread-safe. The pool is created on first use
    (after twistd has forked)."""

    def __init__(self, limit: int, setting: str = "server.max_streams") -> None:
        self.limit = limit
        self._setting = setting
        self._open = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def open(self) -> int:
        """Streams currently open (for metrics and tests)."""
        return self._open

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.limit + REFUSERS, thread_name_prefix="grpc-stream")
        return self._pool

    def shutdown(self) -> None:
        """Let the pool's idle threads go (streams have ended by the time the server stopped)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)

    def _enter(self) -> None:
        with self._lock:
            if self._open >= self.limit:
                raise errors.ResourceExhausted(
                    f"too many open streams: this node serves at most {self.limit} at once "
                    f"({self._setting}); close one or retry later"
                )
            self._open += 1

    def _leave(self) -> None:
        with self._lock:
            self._open -= 1

    def guard(self, behavior: StreamHandler) -> StreamHandler:
        """``behavior`` counted against the budget: refused when it is spent, the slot given
        back as soon as the handler returns (handlers wake up on cancellation, see
        :func:`on_cancel`)."""

        def call(request: object, context: grpc.ServicerContext) -> Iterator[object]:
            self._enter()
            try:
                yield from behavior(request, context)
            finally:
                self._leave()

        return call

    def place(self, behavior: B) -> B:
        """Mark a (wrapped, plain-function) behaviour to run in the stream pool."""
        behavior.experimental_thread_pool = self.pool  # type: ignore[attr-defined]
        return behavior


def on_cancel(context: grpc.ServicerContext | None, wake: Callable[[], None]) -> None:
    """Call ``wake`` when the RPC ends (client gone, deadline, server stop) so a handler blocked
    waiting for data returns at once rather than at its next poll; at once if it already ended."""
    if context is not None and not context.add_callback(wake):
        wake()
