"""The event bus: numbered events, a ring buffer for resume, one bounded queue per subscriber.

Publishers run on the reactor (libvirt callbacks) or, through :meth:`EventBus.publish_from_thread`,
on gRPC threads; subscribers are ``StreamEvents`` handlers blocking in gRPC threads. A publish
never waits: a subscriber whose queue is full is cut off with ``RESOURCE_EXHAUSTED`` and may
resume from the last id it saw, so one slow client never holds back the others or the reactor.

Ids start at the boot time in microseconds and grow by one per event, so they keep increasing
across daemon restarts and a client resuming with an id from an earlier run is told of the gap.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator

from google.protobuf.timestamp_pb2 import Timestamp
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger

from quantix import bridge, errors
from quantix.proto import node_pb2

log = Logger(namespace="quantix.events")

RESUME_HEADER = "x-quantix-resume-after"


def make_event(
    event_id: int, event_type: int, vm_id: str, message: str, metadata: dict | None
) -> node_pb2.NodeEvent:
    ts = Timestamp()
    # Not GetCurrentTime(): it goes through datetime, a large share of a publish.
    ts.FromNanoseconds(time.time_ns())
    return node_pb2.NodeEvent(
        id=str(event_id),
        timestamp=ts,
        type=node_pb2.EventType.ValueType(event_type),
        vm_id=vm_id or "",
        message=message,
        metadata={str(k): str(v) for k, v in (metadata or {}).items()},
    )


class Published:
    """A published event and its wire form. The bytes are made once, by the first stream that
    sends the event (off the reactor), and shared by every other subscriber: grpc would otherwise
    serialize the message again for each stream. Reads like the ``NodeEvent`` it carries."""

    __slots__ = ("_wire", "event")

    def __init__(self, event: node_pb2.NodeEvent) -> None:
        self.event = event
        self._wire: bytes | None = None

    @property
    def wire(self) -> bytes:
        if self._wire is None:
            self._wire = self.event.SerializeToString()  # a benign race: same bytes either way
        return self._wire

    def __getattr__(self, name: str) -> object:
        return getattr(self.event, name)


class Subscription:
    """One subscriber: the backlog it resumed with, then live events through a bounded queue.

    The queue is a plain deque guarded by a condition: the publisher appends under the bus lock
    and wakes the reader only when the queue was empty; the reader takes everything queued per
    wakeup, so a burst costs one wakeup rather than one per event.
    """

    def __init__(self, bus: EventBus, backlog: list[Published], maxsize: int) -> None:
        self._bus = bus
        self.backlog = backlog
        self.maxsize = maxsize
        self.queue: collections.deque = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self.error: Exception | None = None
        self.cancelled = False

    def offer(self, event: Published) -> bool:
        """Called under the bus lock; False when the subscriber overflowed and must go."""
        with self._ready:
            if len(self.queue) >= self.maxsize:
                self.error = errors.ResourceExhausted(
                    "event subscriber too slow: queue overflowed; reconnect with "
                    f"{RESUME_HEADER} set to the last event id received"
                )
                self._ready.notify()
                return False
            self.queue.append(event)
            if len(self.queue) == 1:
                self._ready.notify()
        return True

    def cancel(self) -> None:
        """From any thread (grpc's RPC-done callback): the client is gone, end :meth:`events`."""
        with self._ready:
            self.cancelled = True
            self._ready.notify()

    def end(self, error: Exception) -> None:
        with self._ready:
            self.error = error
            self._ready.notify()

    def _take(self, poll: float) -> list[Published]:
        """Everything queued (waiting up to ``poll`` seconds for something); [] on timeout.
        Queued events go out before an error ends the stream, except an overflow, which ends
        it at once (the client resumes from the last id it got)."""
        with self._ready:
            if not self.queue and self.error is None and not self.cancelled:
                self._ready.wait(poll)
            if self.queue and not isinstance(self.error, errors.ResourceExhausted):
                items = list(self.queue)
                self.queue.clear()
                return items
            if self.error is not None:
                raise self.error
            return []

    def events(self, is_active: Callable[[], bool] = lambda: True, poll: float = 0.5) -> Iterator[Published]:
        """Blocking iterator (gRPC thread): returns when ``is_active()`` turns false, raises
        the subscriber's error when it is cut off or the bus stops."""
        try:
            yield from self.backlog
            self.backlog = []
            while True:
                items = self._take(poll)
                if not items and (self.cancelled or not is_active()):
                    return
                yield from items
        finally:
            self.close()

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus(Service):
    """Numbers, buffers and fans out :class:`NodeEvent` messages."""

    def __init__(
        self,
        reactor: IReactorFromThreads,
        buffer_size: int = 10_000,
        subscriber_queue: int = 1_000,
        first_id: int | None = None,
    ) -> None:
        self.reactor = reactor
        self.subscriber_queue = subscriber_queue
        self.buffer: collections.deque = collections.deque(maxlen=buffer_size)
        self._next_id = first_id if first_id is not None else time.time_ns() // 1000
        self._subscribers: set[Subscription] = set()
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self.published = 0
        self.dropped_subscribers = 0

    # -- publishing ---------------------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """Id of the last event published (one less than the first id while none was)."""
        return self._next_id - 1

    def publish(
        self, event_type: int, vm_id: str, message: str, metadata: dict | None = None
    ) -> node_pb2.NodeEvent:
        """Number, buffer and fan out one event; never blocks. Returns the ``NodeEvent``."""
        with self._lock:
            event = make_event(self._next_id, event_type, vm_id, message, metadata)
            item = Published(event)
            self._next_id += 1
            self.published += 1
            self.buffer.append(item)
            slow = [sub for sub in self._subscribers if not sub.offer(item)]
            for sub in slow:
                self._subscribers.discard(sub)
        for _ in slow:
            self.dropped_subscribers += 1
            log.warn("event subscriber cut off: queue of {n} overflowed", n=self.subscriber_queue)
        return event

    def publish_from_thread(
        self, event_type: int, vm_id: str, message: str, metadata: dict | None = None
    ) -> None:
        """From a non-reactor thread: publish on the reactor, in order with libvirt events."""
        bridge.post_to_reactor(self.reactor, self.publish, event_type, vm_id, message, metadata)

    # -- subscribing --------------------------------------------------------------------------

    def subscribe(self, resume_after: int | None = None) -> Subscription:
        """A new subscriber; with ``resume_after``, every buffered event after that id first,
        preceded by a ``gap`` event when some of them have already left the buffer."""
        with self._lock:
            if self.closed.is_set():
                raise errors.Unavailable("node daemon is shutting down")
            backlog = [] if resume_after is None else self._backlog(resume_after)
            sub = Subscription(self, backlog, self.subscriber_queue)
            self._subscribers.add(sub)
        return sub

    def _backlog(self, after: int) -> list[Published]:
        last = self._next_id - 1
        first = int(self.buffer[0].id) if self.buffer else self._next_id
        if after == last:
            return []
        if first - 1 <= after < last:
            return [e for e in self.buffer if int(e.id) > after]
        # The id is older than the buffer, or from a later run than ours: events were lost.
        gap = make_event(
            first - 1,
            node_pb2.EventType.Value("EVENT_TYPE_UNKNOWN"),
            "",
            f"events after {after} are no longer available; resync the node's state",
            {"gap": "true", "resume_after": str(after), "first_available": str(first)},
        )
        return [Published(gap), *self.buffer]

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def queue_depths(self) -> list[int]:
        """Events waiting per subscriber (for metrics)."""
        with self._lock:
            return [len(sub.queue) for sub in self._subscribers]

    def lag_seconds(self) -> float:
        """Age of the oldest event queued but not yet taken by its stream (0 when none)."""
        with self._lock:
            heads = [sub.queue[0] for sub in self._subscribers if sub.queue]
        if not heads:
            return 0.0
        oldest = min(event.timestamp.ToNanoseconds() for event in heads)
        return max(0.0, (time.time_ns() - oldest) / 1e9)

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.closed.clear()

    def stopService(self) -> None:
        """End every stream with UNAVAILABLE: the daemon is going away, not the events."""
        super().stopService()
        with self._lock:
            self.closed.set()
            subs, self._subscribers = self._subscribers, set()
        for sub in subs:
            sub.end(errors.Unavailable("node daemon is shutting down"))
