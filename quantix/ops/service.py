"""The operations box of a node: metrics endpoint, access log, systemd notifications, drain.

Add it as the node's *first* child so it starts before gRPC and stops last (metrics and the
access log see the whole drain). The node passes its handler table through :meth:`gate`, calls
:meth:`ready` once every child has started, :meth:`stopping` before it stops them, and
:meth:`drain_calls` just before the gRPC server stops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, TypeVar

import grpc
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import ILogObserver

from quantix.config import Config
from quantix.ops import access, heap, logs, shutdown
from quantix.ops.drain import Drain
from quantix.ops.notify import Notifier
from quantix.rpc import status
from quantix.rpc.server import SERVICE, GrpcServer
from quantix.util.reactor import INodeReactor

if TYPE_CHECKING:
    from quantix.ops.metrics import MetricsService, NodeCollector


T = TypeVar("T")


class Operations(MultiService):
    """Serves the node's gRPC endpoint ``grpc`` (drain, health, READY=1) and exposes
    ``collector``'s gauges beside the RPC counters. Reactor thread."""

    def __init__(
        self,
        reactor: INodeReactor,
        config: Config,
        grpc: GrpcServer,
        collector: Callable[[], NodeCollector],
        environ: dict[str, str] | None = None,
        rpc_observers: status.RpcObservers | None = None,
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.config = config
        self.grpc = grpc
        #: Where the gRPC server reports finished calls; metrics and the access log listen here.
        self.rpc_observers = rpc_observers if rpc_observers is not None else status.RpcObservers()
        self.notifier = Notifier(reactor, environ)
        #: The Prometheus endpoint, ``collector()``'s gauges beside the RPC counters; None when
        #: ``server.metrics_listen`` is off (prometheus_client and twisted.web are then never
        #: imported: idle memory).
        self.metrics: MetricsService | None = None
        if config.server.metrics_listen:
            from quantix.ops.metrics import MetricsService

            self.metrics = MetricsService(
                reactor, config.server.metrics_listen, collector(), observers=self.rpc_observers
            )
            self.metrics.setServiceParent(self)
        #: Set by :meth:`configure_twistd`; handed to twistd when the node joins its application.
        self.log_observer: ILogObserver | None = None
        #: In front of every RPC handler (see :meth:`gate`); refuses new calls once stopping.
        self.drain = Drain()
        #: Set under twistd: :meth:`ready` freezes the start-up heap (see :mod:`quantix.ops.heap`).
        self.freeze_heap_when_ready = False

    def gate(self, table: Mapping[str, status.Handler]) -> dict[str, status.Handler]:
        """Put the drain gate in front of the handler table the gRPC server is built from."""
        streaming = {m.name for m in SERVICE.methods if m.server_streaming}
        return self.drain.wrap(table, streaming)

    def drain_calls(self) -> defer.Deferred[None]:
        """Just before gRPC stops: wait for the calls in flight (until ``grace_seconds`` after
        the stop began) and leave the server what remains of the grace period."""
        grace = self.config.server.grace_seconds
        grpc = self.grpc

        def left(remaining: float) -> None:
            grpc.grace = remaining

        return self.drain.wait_idle_in_thread(grace).addCallback(left)

    def configure_twistd(self, twistd_options: Mapping[str, object] | None) -> None:
        """Running under twistd (its options, the parent of ours): log in ``logging.format``
        and exit 0 on SIGTERM. Without twistd's options (a caller of its own) nothing changes."""
        if twistd_options is None:
            return
        self.log_observer = logs.twistd_observer(self.config.logging, twistd_options)
        self.reactor.callWhenRunning(shutdown.exit_zero_on_sigterm, self.reactor)
        self.freeze_heap_when_ready = True  # the process is the daemon's alone

    def attach_logging(self, parent: object) -> None:
        """Called when the node joins twistd's application, before twistd starts logging."""
        logs.attach(parent, self.log_observer)

    def startService(self) -> None:
        self.drain.reset()
        self.rpc_observers.add_with_request(self._access)
        super().startService()

    def ready(self) -> None:
        if self.freeze_heap_when_ready:
            heap.freeze_startup_heap()
        self.notifier.ready(f"serving gRPC on port {self.grpc.port}")

    def stopping(self) -> None:
        """First step of a stop: STOPPING=1, health NOT_SERVING, new calls refused."""
        self.notifier.stopping("draining")
        self.grpc.health.enter_graceful_shutdown()
        self.drain.start()

    def stopService(self) -> defer.Deferred[None]:
        self.rpc_observers.remove_with_request(self._access)
        d = super().stopService()
        d.addBoth(self._closed)
        return d

    def _closed(self, result: T) -> T:
        self.notifier.close()
        return result

    def _access(self, method: str, code: grpc.StatusCode, seconds: float, peer: str, request: object) -> None:
        access.log_rpc(method, code, seconds, peer, request)
