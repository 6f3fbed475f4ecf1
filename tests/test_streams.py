"""The stream budget and shared metrics samples: a real daemon, real grpc clients over a port.

Streams never take the workers of unary calls: past ``server.max_streams`` a stream is refused at
once with RESOURCE_EXHAUSTED naming the limit, a cancelled stream gives its slot back without
waiting for a poll, and every StreamMetrics subscriber of one interval gets the same samples.
"""

from __future__ import annotations

import threading
import time

import grpc
import libvirt
from google.protobuf.empty_pb2 import Empty
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.events.metrics import MetricsHub
from quantix.proto import node_pb2
from quantix.rpc import event_rpcs
from tests.support import Daemon, wait_for

STREAM_TIMEOUT = 30


def first_error(streams) -> defer.Deferred:
    """In one thread: the (code, details) each stream fails with (None when it yields instead)."""

    def run():
        out = []
        for stream in streams:
            try:
                next(stream)
                out.append(None)
            except grpc.RpcError as exc:
                out.append((exc.code(), exc.details()))
        return out

    return threads.deferToThread(run)


class StreamBudgetTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, **overrides):
        self.daemon = yield Daemon(self, **overrides).start()
        self.streams = []
        self.addCleanup(lambda: [s.cancel() for s in self.streams])
        return self.daemon

    def events(self):
        stream = self.daemon.stub.StreamEvents(Empty(), timeout=STREAM_TIMEOUT)
        self.streams.append(stream)
        return stream

    def metrics(self, interval: int = 1):
        request = node_pb2.StreamMetricsRequest(interval_seconds=interval)
        stream = self.daemon.stub.StreamMetrics(request, timeout=STREAM_TIMEOUT)
        self.streams.append(stream)
        return stream

    @property
    def open_streams(self) -> int:
        return self.daemon.node.grpc.streams.open

    @defer.inlineCallbacks
    def test_stream_over_the_budget_is_refused_naming_the_limit(self):
        yield self.start(**{"server.max_streams": 3})
        self.events()
        self.events()
        self.metrics()
        yield wait_for(lambda: self.open_streams == 3)
        refused = yield first_error([self.events(), self.metrics()])
        for code, details in refused:
            self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED)
            self.assertIn("at most 3", details)
            self.assertIn("server.max_streams", details)
        self.assertEqual(self.open_streams, 3)

    @defer.inlineCallbacks
    def test_health_and_unary_calls_answer_with_more_streams_than_workers(self):
        # 32 unary workers (the test config); open more streams than that.
        yield self.start()
        for _ in range(20):
            self.events()
        metrics = [self.metrics(60) for _ in range(20)]
        yield wait_for(lambda: self.daemon.node.bus.subscriber_count == 20)
        yield threads.deferToThread(lambda: [next(s) for s in metrics])

        health = health_pb2_grpc.HealthStub(self.daemon.channel)
        answer = yield threads.deferToThread(health.Check, health_pb2.HealthCheckRequest(), timeout=10)
        self.assertEqual(answer.status, health_pb2.HealthCheckResponse.SERVING)
        node_health = yield self.daemon.call("HealthCheck", node_pb2.HealthCheckRequest(), timeout=10)
        self.assertTrue(node_health.healthy)
        vms = yield self.daemon.call("ListVMs", Empty(), timeout=10)
        self.assertEqual(len(vms.vms), 2)

    @defer.inlineCallbacks
    def test_streams_past_the_budget_leave_unary_calls_alone(self):
        yield self.start(**{"server.max_streams": 40, "server.max_workers": 4})
        for n in range(40):
            self.events() if n % 2 else self.metrics(60)
        yield wait_for(lambda: self.open_streams == 40)
        refused = yield first_error([self.events() for _ in range(10)])
        self.assertEqual({code for code, _ in refused}, {grpc.StatusCode.RESOURCE_EXHAUSTED})
        node_health = yield self.daemon.call("HealthCheck", node_pb2.HealthCheckRequest(), timeout=10)
        self.assertTrue(node_health.healthy)

    @defer.inlineCallbacks
    def test_cancelled_streams_give_their_slot_back_without_polling(self):
        # With the backstop poll an hour long, only the cancellation itself can free the slot.
        self.patch(event_rpcs, "POLL", 3600.0)
        yield self.start(**{"server.max_streams": 1})
        events = self.events()
        yield wait_for(lambda: self.daemon.node.bus.subscriber_count == 1)
        events.cancel()
        yield wait_for(lambda: self.daemon.node.bus.subscriber_count == 0)
        yield wait_for(lambda: self.open_streams == 0)

        metrics = self.metrics(3600)
        yield threads.deferToThread(next, metrics)
        self.assertEqual(self.open_streams, 1)
        metrics.cancel()
        yield wait_for(lambda: self.open_streams == 0)

        events = self.events()
        yield wait_for(lambda: self.daemon.node.bus.subscriber_count == 1)
        self.daemon.node.bus.publish(node_pb2.EventType.Value("EVENT_TYPE_UNKNOWN"), "", "after")
        event = yield threads.deferToThread(next, events)
        self.assertEqual(event.message, "after")


class SharedMetricsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_subscribers_of_one_interval_share_each_sample(self):
        daemon = yield Daemon(self).start()
        request = node_pb2.StreamMetricsRequest(interval_seconds=1)
        streams = [daemon.stub.StreamMetrics(request, timeout=STREAM_TIMEOUT) for _ in range(10)]
        self.addCleanup(lambda: [s.cancel() for s in streams])
        samples = yield threads.deferToThread(lambda: [[next(s) for _ in range(3)] for s in streams])
        stamps = [[m.timestamp.ToNanoseconds() for m in per_stream] for per_stream in samples]
        for per_stream in stamps:
            self.assertEqual(per_stream, sorted(set(per_stream)))
        # Per-subscriber sampling would give 30 distinct samples; shared, a new subscriber gets
        # the latest one and then the same ones as everybody else.
        self.assertLessEqual(len({t for per_stream in stamps for t in per_stream}), 5)
        self.assertTrue(all(len(m.vms) == 2 for per_stream in samples for m in per_stream))
        hub = daemon.node.metrics_hub
        self.assertEqual(hub.channel(1.0).subscribers, 10)
        self.assertLessEqual(hub.channel(1.0).taken, 6)

        for s in streams:
            s.cancel()
        yield wait_for(lambda: hub.channel(1.0) is None)


class MetricsTimekeeperTests(unittest.TestCase):
    """One subscriber of an interval waits for the next sample to fall due, the others wait to be
    told it is there; when that timekeeper leaves, another must take over."""

    def test_next_sample_still_comes_when_the_timekeeper_leaves(self):
        conn = libvirt.open("test:///default")
        self.addCleanup(conn.close)
        hub = MetricsHub(lambda: conn)
        a, b = hub.subscribe(0.3), hub.subscribe(0.3)
        channel = hub.channel(0.3)
        self.addCleanup(channel.close)  # a thread left waiting by a failure ends with Unavailable
        self.assertEqual(channel.next_after(0, a)[0], 1)  # sample 1; the next is due in 0.3 s
        got: dict[str, object] = {}

        def take(name, sub):
            got[name] = channel.next_after(1, sub)

        keeper = threading.Thread(target=take, args=("a", a), daemon=True)
        keeper.start()
        deadline = time.monotonic() + 2
        while not channel.timekeeper and time.monotonic() < deadline:
            time.sleep(0.005)
        self.assertTrue(channel.timekeeper)
        other = threading.Thread(target=take, args=("b", b), daemon=True)
        other.start()
        time.sleep(0.1)  # b is waiting to be told, not for the due time
        # The timekeeper goes, and only it hears of it (a cancel wakes everyone, which would hide
        # a timekeeper that leaves without handing over): notify() wakes the first waiter.
        a.cancelled = True
        with channel.cond:
            channel.cond.notify()
        keeper.join(2)
        other.join(2)
        self.assertIsNone(got.get("a", "still waiting"))
        self.assertEqual(got.get("b", ("still waiting",))[0], 2)
        self.assertEqual(channel.taken, 2)
