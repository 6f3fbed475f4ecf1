"""Prometheus metrics on ``server.metrics_listen``, served from the reactor.

RPC counts and latency come from the RPC observer hook. Everything else is read from the live
node at scrape time by :class:`NodeCollector`, through ``getattr``, so the endpoint works
whichever boxes a build has; a box that is absent simply has no series. The attributes read:

- ``node.hypervisor.connected``, ``.reconnects``: libvirt connection state and reconnect count
- ``node.bus.subscriber_count``: StreamEvents subscribers
- ``node.bus.queue_depths``: events queued per subscriber (ints, or a mapping subscriber → int)
- ``node.bus.lag_seconds``: age of the oldest event not yet delivered
- ``node.bus.last_id``, ``.published``, ``.dropped_subscribers``: last event id, events
  published, subscribers cut off as too slow
- ``node.agents.connected_count``: open guest-agent channels
- ``node.cplink.registered``: registered with the control plane

Each may be a plain attribute or a no-argument method. The page is rendered on the reactor
thread (not in a WSGI thread pool) because the boxes' state belongs to the reactor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

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
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from quantix import __version__
from quantix.config import parse_address
from quantix.rpc import status
from quantix.rpc.server import ListenError

log = Logger(namespace="quantix.ops.metrics")

#: Unary RPCs are milliseconds to a minute (StopVM waits); streams report their whole life.
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

_MISSING = object()


def read(obj: Any, name: str) -> Any:
    """``obj.name``, called when it is a method; ``_MISSING`` when absent or when it fails."""
    if obj is None:
        return _MISSING
    try:
        value = getattr(obj, name, _MISSING)
        return value() if callable(value) else value
    except Exception:  # a box mid-restart must not break the whole scrape
        return _MISSING


def _number(value: Any) -> float | None:
    if value is _MISSING or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
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

    def observe(self, method: str, code: grpc.StatusCode, seconds: float, peer: str) -> None:
        self.requests.labels(method, code.name).inc()
        self.duration.labels(method, code.name).observe(seconds)


class NodeCollector:
    """Gauges read from the node at scrape time (see the module docstring for the names)."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        info = GaugeMetricFamily(
            "quantix_node_info", "Daemon version and node id", labels=["version", "node_id"]
        )
        info.add_metric([__version__, str(getattr(node, "node_id", "") or "")], 1)
        yield info
        started = _number(getattr(node, "started_at", None))
        if started is not None:
            yield GaugeMetricFamily(
                "quantix_node_uptime_seconds",
                "Seconds since the daemon started",
                value=time.monotonic() - started,
            )

        hv = getattr(node, "hypervisor", None)
        connected = read(hv, "connected")
        if connected is not _MISSING:
            yield GaugeMetricFamily(
                "quantix_libvirt_connected",
                "1 while the libvirt connection is up",
                value=1 if connected else 0,
            )
        reconnects = _number(read(hv, "reconnects"))
        if reconnects is not None:
            yield CounterMetricFamily(
                "quantix_libvirt_reconnects", "libvirt connections re-established", value=reconnects
            )

        yield from self._events(getattr(node, "bus", None))

        agents = _number(read(getattr(node, "agents", None), "connected_count"))
        if agents is not None:
            yield GaugeMetricFamily("quantix_agent_connections", "Guest agents connected", value=agents)

        registered = read(getattr(node, "cplink", None), "registered")
        if registered is not _MISSING:
            yield GaugeMetricFamily(
                "quantix_controlplane_registered",
                "1 while registered with the control plane",
                value=1 if registered else 0,
            )

    def _events(self, bus: Any) -> Iterator[Metric]:
        subscribers = _number(read(bus, "subscriber_count"))
        if subscribers is not None:
            yield GaugeMetricFamily(
                "quantix_events_subscribers", "StreamEvents subscribers", value=subscribers
            )
        depths = read(bus, "queue_depths")
        if depths is not _MISSING and depths is not None:
            values = [float(v) for v in (depths.values() if hasattr(depths, "values") else depths)]
            yield GaugeMetricFamily(
                "quantix_events_queued", "Events queued for all subscribers", value=sum(values)
            )
            yield GaugeMetricFamily(
                "quantix_events_queue_depth_max",
                "Events queued for the most backlogged subscriber",
                value=max(values, default=0.0),
            )
        lag = _number(read(bus, "lag_seconds"))
        if lag is not None:
            yield GaugeMetricFamily(
                "quantix_events_lag_seconds", "Age of the oldest event not yet delivered", value=lag
            )
        for attr, name, doc in (
            ("published", "quantix_events_published", "Events published on the bus"),
            ("dropped_subscribers", "quantix_events_dropped_subscribers", "Subscribers cut off as too slow"),
        ):
            value = _number(read(bus, attr))
            if value is not None:
                yield CounterMetricFamily(name, doc, value=value)
        last_id = _number(read(bus, "last_id"))
        if last_id is not None:
            yield GaugeMetricFamily("quantix_events_last_id", "Id of the last published event", value=last_id)


class MetricsPage(Resource):
    """``GET /metrics`` rendered synchronously on the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        request.setHeader(b"content-type", content_type.encode())
        return encoder(self.registry)


def build_registry(node: Any) -> tuple[CollectorRegistry, RpcMetrics]:
    """A private registry (not the global one), so several nodes in one process never clash."""
    disable_created_metrics()  # process-wide: no ``*_created`` series beside every counter
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(NodeCollector(node))
    return registry, RpcMetrics(registry)


class MetricsService(Service):
    """Listen on ``listen`` (``host:port``; ``None`` disables) and count RPCs while running."""

    def __init__(
        self, reactor: Any, listen: str | None, node: Any, observers: status.RpcObservers | None = None
    ) -> None:
        self.reactor = reactor
        self.observers = observers if observers is not None else status.RpcObservers()
        self.listen = listen or None
        self.registry, self.rpc = build_registry(node)
        self.port: int | None = None
        self._listening: Any = None

    def startService(self) -> None:
        if self.listen is None:
            super().startService()
            return
        try:
            host, port = parse_address(self.listen)
        except ValueError as exc:
            raise ListenError(f"invalid metrics address {self.listen!r}: {exc}") from None
        root = Resource()
        root.putChild(b"metrics", MetricsPage(self.registry))
        site = Site(root)
        site.noisy = False
        try:
            self._listening = self.reactor.listenTCP(port, site, interface=host)
        except CannotListenError as exc:
            reason = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
            raise ListenError(f"cannot listen on {self.listen} (metrics): {reason.lower()}") from None
        self.port = self._listening.getHost().port
        self.observers.add(self.rpc.observe)
        log.info("metrics on http://{listen}/metrics (port {port})", listen=self.listen, port=self.port)
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        self.observers.remove(self.rpc.observe)
        listening, self._listening = self._listening, None
        return listening.stopListening() if listening is not None else None
