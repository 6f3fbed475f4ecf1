"""Prometheus metrics on ``server.metrics_listen``, served from the reactor.

RPC counts and latency come from the RPC observer hook. Everything else is read from the boxes
at scrape time by :class:`NodeCollector`, through the small protocols below; the node passes
the boxes it has, and a box that is absent (None) or fails mid-scrape simply has no series:

- :class:`LibvirtStats` (the hypervisor box): connection state and reconnect count
- :class:`EventStats` (the event bus): subscribers, queue depths and lag, last id, events
  published, subscribers cut off as too slow
- :class:`AgentStats` (the agent manager): open guest-agent channels
- :class:`~quantix.facades.ControlPlaneStatus` (the control-plane link): registered

The page is rendered on the reactor thread (not in a WSGI thread pool) because the boxes'
state belongs to the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site

from quantix import __version__
from quantix.config import ListenError, parse_address
from quantix.facades import ControlPlaneStatus
from quantix.hypervisor.hostinfo import HostBox
from quantix.rpc import status

log = Logger(namespace="quantix.ops.metrics")

#: Unary RPCs are milliseconds to a minute (StopVM waits); streams report their whole life.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class LibvirtStats(Protocol):
    @property
    def connected(self) -> bool: ...

    reconnects: int


#: How to move the metrics endpoint when its port is taken (a second daemon on the same host).
CHANGE_HINT = "choose another with --metrics-listen HOST:PORT or server.metrics_listen; 'off' disables it"
#: Values of ``--metrics-listen``/``server.metrics_listen`` that turn the endpoint off.
OFF = ("", "off")


class EventStats(Protocol):
    @property
    def subscriber_count(self) -> int: ...

    @property
    def last_id(self) -> int: ...

    published: int
    dropped_subscribers: int

    def queue_depths(self) -> Iterable[int]: ...

    def lag_seconds(self) -> float: ...


class AgentStats(Protocol):
    def connected_count(self) -> int: ...


T = TypeVar("T")


def read(box: T | None, get: Callable[[T], float | None]) -> float | None:
    """``get(box)`` as a number; None when the box is absent or the read fails."""
    if box is None:
        return None
    try:
        value = get(box)
        return None if value is None else float(value)
    except Exception:  # a box mid-restart must not break the whole scrape
        return None


class RpcMetrics:
    """Counters fed through the node's :class:`~quantix.rpc.status.RpcObservers`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "quantix_rpc_requests",
            "gRPC calls handled, by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "quantix_rpc_duration_seconds",
            "gRPC call duration (a stream's whole life), by method and status code",
            ["method", "code"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.duration.labels(method, code.name).observe(seconds)


class NodeCollector:
    """Gauges read from the boxes at scrape time (see the module docstring for the names)."""

    def __init__(
        self,
        host: HostBox | None = None,
        hypervisor: LibvirtStats | None = None,
        events: EventStats | None = None,
        agents: AgentStats | None = None,
        controlplane: ControlPlaneStatus | None = None,
    ) -> None:
        self.host = host
        self.hypervisor = hypervisor
        self.events = events
        self.agents = agents
        self.controlplane = controlplane

    def collect(self) -> Iterator[Metric]:
        host = self.host
        info = GaugeMetricFamily(
            "quantix_node_info", "Daemon version and node id", labels=["version", "node_id"]
        )
        info.add_metric([__version__, host.node_id if host is not None else ""], 1)
        yield info
        if host is not None:
            yield GaugeMetricFamily(
                "quantix_node_uptime_seconds", "Seconds since the daemon started", value=host.uptime()
            )

        connected = read(self.hypervisor, lambda hv: hv.connected)
        if connected is not None:
            yield GaugeMetricFamily(
                "quantix_libvirt_connected",
                "1 while the libvirt connection is up",
                value=1 if connected else 0,
            )
        reconnects = read(self.hypervisor, lambda hv: hv.reconnects)
        if reconnects is not None:
            yield CounterMetricFamily(
                "quantix_libvirt_reconnects", "libvirt connections re-established", value=reconnects
            )

        yield from self._events(self.events)

        agents = read(self.agents, lambda a: a.connected_count())
        if agents is not None:
            yield GaugeMetricFamily("quantix_agent_connections", "Guest agents connected", value=agents)

        registered = read(self.controlplane, lambda cp: cp.registered)
        if registered is not None:
            yield GaugeMetricFamily(
                "quantix_controlplane_registered",
                "1 while registered with the control plane",
                value=1 if registered else 0,
            )

    def _events(self, bus: EventStats | None) -> Iterator[Metric]:
        subscribers = read(bus, lambda b: b.subscriber_count)
        if subscribers is not None:
            yield GaugeMetricFamily(
                "quantix_events_subscribers", "StreamEvents subscribers", value=subscribers
            )
        depths: list[float] | None = None
        if bus is not None:
            try:
                depths = [float(v) for v in bus.queue_depths()]
            except Exception:  # as in read(): no series rather than a broken scrape
                depths = None
        if depths is not None:
            values = depths
            yield GaugeMetricFamily(
                "quantix_events_queued", "Events queued for all subscribers", value=sum(values)
            )
            yield GaugeMetricFamily(
                "quantix_events_queue_depth_max",
                "Events queued for the most backlogged subscriber",
                value=max(values, default=0.0),
            )
        lag = read(bus, lambda b: b.lag_seconds())
        if lag is not None:
            yield GaugeMetricFamily(
                "quantix_events_lag_seconds", "Age of the oldest event not yet delivered", value=lag
            )
        for value, name, doc in (
            (read(bus, lambda b: b.published), "quantix_events_published", "Events published on the bus"),
            (
                read(bus, lambda b: b.dropped_subscribers),
                "quantix_events_dropped_subscribers",
                "Subscribers cut off as too slow",
            ),
        ):
            if value is not None:
                yield CounterMetricFamily(name, doc, value=value)
        last_id = read(bus, lambda b: b.last_id)
        if last_id is not None:
            yield GaugeMetricFamily("quantix_events_last_id", "Id of the last published event", value=last_id)


class MetricsPage(Resource):
    """``GET /metrics`` rendered synchronously on the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: IRequest) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode())
        return encoder(self.registry)


def build_registry(collector: NodeCollector) -> tuple[CollectorRegistry, RpcMetrics]:
    """A private registry (not the global one), so several nodes in one process never clash."""
    disable_created_metrics()  # process-wide: no ``*_created`` series beside every counter
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(collector)
    return registry, RpcMetrics(registry)


class MetricsService(Service):
    """Listen on ``listen`` (``host:port``; ``None``, empty or ``off`` disables) and count RPCs
    while running."""

    def __init__(
        self,
        reactor: IReactorTCP,
        listen: str | None,
        collector: NodeCollector | None = None,
        observers: status.RpcObservers | None = None,
    ) -> None:
        self.reactor = reactor
        self.observers = observers if observers is not None else status.RpcObservers()
        self.listen = None if listen is None or listen.strip().lower() in OFF else listen
        self.registry, self.rpc = build_registry(collector or NodeCollector())
        self.port: int | None = None
        self._listening: IListeningPort | None = None

    def startService(self) -> None:
        if self.listen is None:
            super().startService()
            return
        try:
            host, port = parse_address(self.listen)
        except ValueError as exc:
            reason = f"invalid address: {exc}"
            raise ListenError.of("metrics", repr(self.listen), reason, CHANGE_HINT) from None
        root = Resource()
        root.putChild(b"metrics", MetricsPage(self.registry))
        site = Site(root)
        site.noisy = False
        try:
            # Twisted types listenTCP's factory as ServerFactory of its default protocol type, which
            # Site (a factory of HTTP channels) is not to an invariant generic; it is one at runtime.
            self._listening = self.reactor.listenTCP(port, site, interface=host)  # type: ignore[arg-type]
        except CannotListenError as exc:
            reason = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
            raise ListenError.of("metrics", self.listen, reason.lower(), CHANGE_HINT) from None
        address = self._listening.getHost()
        self.port = address.port if isinstance(address, (IPv4Address, IPv6Address)) else None
        self.observers.add(self.rpc.observe)
        log.info("metrics on http://{listen}/metrics (port {port})", listen=self.listen, port=self.port)
        super().startService()

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        self.observers.remove(self.rpc.observe)
        listening, self._listening = self._listening, None
        return listening.stopListening() if listening is not None else None
