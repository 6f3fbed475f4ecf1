"""StreamEvents and StreamMetrics: endless server streams, each held by one gRPC thread.

Neither stream ends normally (the control plane marks a node disconnected when one does): they
run until the client goes away, end with ``RESOURCE_EXHAUSTED`` when an event subscriber falls
behind, and with ``UNAVAILABLE`` at shutdown.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import libvirt
from google.protobuf import empty_pb2

from quantix import errors
from quantix.events.bus import RESUME_HEADER
from quantix.events.metrics import Sampler
from quantix.facades import EventFeed, VmHost
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc

MIN_INTERVAL = 1.0
POLL = 0.5


def resume_after(context: grpc.ServicerContext) -> int | None:
    for key, value in context.invocation_metadata() or ():
        if key == RESUME_HEADER:
            try:
                return int(value)
            except ValueError:
                raise errors.Invalid(f"{RESUME_HEADER} must be an event id, got {value!r}") from None
    return None


class EventRpcs:
    """Streams over the event feed and the hypervisor box; each holds one gRPC worker thread."""

    def __init__(self, events: EventFeed, hypervisor: VmHost) -> None:
        self.events = events
        self.hypervisor = hypervisor

    @rpc("StreamEvents")
    def stream_events(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.NodeEvent]:
        sub = self.events.subscribe(resume_after(context))
        yield from sub.events(context.is_active, POLL)

    @rpc("StreamMetrics")
    def stream_metrics(
        self, request: node_pb2.StreamMetricsRequest, context: grpc.ServicerContext
    ) -> Iterator[node_pb2.NodeMetrics]:
        interval = max(MIN_INTERVAL, float(request.interval_seconds or 0))
        hv = self.hypervisor
        flags = 0 if hv.uri.startswith("test:") else libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
        sampler = Sampler(hv.conn, flags)
        closed = self.events.closed
        due = time.monotonic()
        while True:
            if closed.is_set():
                raise errors.Unavailable("node daemon is shutting down")
            yield sampler.sample()
            due += interval
            # Sleep in short slices so a cancelled client or a shutdown is noticed promptly.
            while (left := due - time.monotonic()) > 0:
                if closed.wait(min(left, POLL)):
                    raise errors.Unavailable("node daemon is shutting down")
                if not context.is_active():
                    return
            if not context.is_active():
                return
            due = max(due, time.monotonic() - interval)  # after a stall, do not burst
