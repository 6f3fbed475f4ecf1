"""StreamEvents and StreamMetrics: endless server streams, each held by one gRPC thread.

Neither stream ends normally (the control plane marks a node disconnected when one does): they
run until the client goes away, end with ``RESOURCE_EXHAUSTED`` when an event subscriber falls
behind, and with ``UNAVAILABLE`` at shutdown.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf import empty_pb2

from quantix import errors
from quantix.events.bus import RESUME_HEADER
from quantix.events.metrics import MetricsHub
from quantix.facades import EventFeed
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc
from quantix.rpc.streams import on_cancel

MIN_INTERVAL = 1.0
#: A backstop only: a cancelled stream is woken by grpc's RPC-done callback at once.
POLL = 5.0


def resume_after(context: grpc.ServicerContext) -> int | None:
    for key, value in context.invocation_metadata() or ():
        if key == RESUME_HEADER:
            try:
                return int(value)
            except ValueError:
                raise errors.Invalid(f"{RESUME_HEADER} must be an event id, got {value!r}") from None
    return None


class EventRpcs:
    """Streams over the event feed and the metrics hub; each holds one gRPC worker thread."""

    def __init__(self, events: EventFeed, metrics: MetricsHub) -> None:
        self.events = events
        self.metrics = metrics

    @rpc("StreamEvents")
    def stream_events(self, request: empty_pb2.Empty, context: grpc.ServicerContext) -> Iterator[bytes]:
        """Each event's wire form, made once and shared by every stream (see ``Published``)."""
        sub = self.events.subscribe(resume_after(context))
        on_cancel(context, sub.cancel)
        for item in sub.events(context.is_active, POLL):
            yield item.wire

    @rpc("StreamMetrics")
    def stream_metrics(
        self, request: node_pb2.StreamMetricsRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Yields ``NodeMetrics`` serialized once for all subscribers (sent as they are)."""
        interval = max(MIN_INTERVAL, float(request.interval_seconds or 0))
        sub = self.metrics.subscribe(interval)
        on_cancel(context, sub.cancel)
        yield from sub.samples()
