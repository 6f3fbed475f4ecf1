"""StreamEvents and StreamMetrics: endless server streams, each held by one gRPC thread.

Neither stream ends normally (the control plane marks a node disconnected when one does): they
run until the client goes away, end with ``RESOURCE_EXHAUSTED`` when an event subscriber falls
behind, and with ``UNAVAILABLE`` at shutdown.
"""

from __future__ import annotations

from typing import Any

from quantix import errors
from quantix.events.bus import RESUME_HEADER
from quantix.rpc.registry import rpc
from quantix.rpc.streams import on_cancel

MIN_INTERVAL = 1.0
#: A backstop only: a cancelled stream is woken by grpc's RPC-done callback at once.
POLL = 5.0


def resume_after(context: Any) -> int | None:
    for key, value in context.invocation_metadata() or ():
        if key == RESUME_HEADER:
            try:
                return int(value)
            except ValueError:
                raise errors.Invalid(f"{RESUME_HEADER} must be an event id, got {value!r}") from None
    return None


class EventRpcs:
    def __init__(self, node: Any) -> None:
        self.node = node

    @rpc("StreamEvents")
    def stream_events(self, request: Any, context: Any) -> Any:
        sub = self.node.bus.subscribe(resume_after(context))
        on_cancel(context, sub.cancel)
        yield from sub.events(context.is_active, POLL)

    @rpc("StreamMetrics")
    def stream_metrics(self, request: Any, context: Any) -> Any:
        interval = max(MIN_INTERVAL, float(request.interval_seconds or 0))
        sub = self.node.metrics_hub.subscribe(interval)
        on_cancel(context, sub.cancel)
        yield from sub.samples()
