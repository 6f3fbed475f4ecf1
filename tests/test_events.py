"""StreamEvents / StreamMetrics end to end: a real daemon on the test driver, real grpc clients."""

from __future__ import annotations

import concurrent.futures

import grpc
import libvirt
from google.protobuf.empty_pb2 import Empty
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.events import mapping as m
from quantix.events.bus import RESUME_HEADER
from quantix.proto import node_pb2
from tests.support import Daemon, wait_for

RUNNING_UUID = "11111111-2222-3333-4444-555555555555"
STOPPED_UUID = "66666666-7777-8888-9999-000000000000"
STREAM_TIMEOUT = 20


def take(stream, n: int) -> defer.Deferred:
    """Read ``n`` messages from a grpc response iterator in a thread."""
    return threads.deferToThread(lambda: [next(stream) for _ in range(n)])


def stream_error(stream) -> defer.Deferred:
    """Drain ``stream`` in a thread until it fails; the status code."""

    def run():
        try:
            for _ in stream:
                pass
        except grpc.RpcError as exc:
            return exc.code()
        return None

    return threads.deferToThread(run)


class EventStreamTests(unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, **overrides):
        self.daemon = yield Daemon(self, **overrides).start()
        yield wait_for(lambda: self.daemon.node.watcher.reconciliations > 0)
        self.streams = []
        self.addCleanup(self._cancel)
        return self.daemon

    def _cancel(self):
        for s in self.streams:
            s.cancel()

    @defer.inlineCallbacks
    def open(self, resume_after=None, stub=None):
        """Open a StreamEvents call and wait until the daemon has subscribed it."""
        bus = self.daemon.node.bus
        before = bus.subscriber_count
        md = [(RESUME_HEADER, str(resume_after))] if resume_after is not None else None
        stream = (stub or self.daemon.stub).StreamEvents(Empty(), metadata=md, timeout=STREAM_TIMEOUT)
        self.streams.append(stream)
        yield wait_for(lambda: bus.subscriber_count > before)
        return stream

    def virsh(self, func) -> defer.Deferred:
        """Act on the daemon's own libvirt connection, in a thread (as any client would)."""
        conn = self.daemon.node.hypervisor.conn()
        return threads.deferToThread(func, conn)

    @defer.inlineCallbacks
    def test_lifecycle_events_arrive_in_order(self):
        yield self.start()
        stream = yield self.open()

        def churn(conn):
            dom = conn.lookupByName("vm-running")
            dom.suspend()
            dom.resume()
            dom.destroy()
            dom.create()

        yield self.virsh(churn)
        events = yield take(stream, 4)
        self.assertEqual([e.type for e in events], [m.VM_PAUSED, m.VM_RESUMED, m.VM_STOPPED, m.VM_STARTED])
        self.assertEqual({e.vm_id for e in events}, {RUNNING_UUID})
        ids = [int(e.id) for e in events]
        self.assertEqual(ids, list(range(ids[0], ids[0] + 4)))
        self.assertEqual(events[2].metadata["libvirt_detail"], "destroyed")
        self.assertEqual(events[2].metadata["vm_name"], "vm-running")
        self.assertIn("vm-running", events[0].message)
        self.assertTrue(events[0].timestamp.seconds > 0)
        self.assertEqual(self.daemon.node.watcher.known[RUNNING_UUID], ("vm-running", m.RUNNING))

    @defer.inlineCallbacks
    def test_publish_from_a_grpc_thread(self):
        yield self.start()
        stream = yield self.open()
        bus = self.daemon.node.bus
        yield threads.deferToThread(
            bus.publish_from_thread, m.SNAPSHOT_CREATED, STOPPED_UUID, "snapshot s1", {"snapshot": "s1"}
        )
        (event,) = yield take(stream, 1)
        self.assertEqual((event.type, event.vm_id, event.metadata["snapshot"]), (9, STOPPED_UUID, "s1"))

    @defer.inlineCallbacks
    def test_resume_after_id_then_live(self):
        yield self.start()
        bus = self.daemon.node.bus
        published = [bus.publish(m.VM_STARTED, RUNNING_UUID, f"e{i}") for i in range(5)]
        stream = yield self.open(resume_after=published[1].id)
        bus.publish(m.VM_STOPPED, RUNNING_UUID, "live")
        events = yield take(stream, 4)
        self.assertEqual([e.message for e in events], ["e2", "e3", "e4", "live"])

    @defer.inlineCallbacks
    def test_gap_event_when_resume_id_is_gone(self):
        yield self.start(**{"events.buffer_size": 3})
        bus = self.daemon.node.bus
        first = bus.publish(m.VM_STARTED, RUNNING_UUID, "old")
        for i in range(5):
            bus.publish(m.VM_STARTED, RUNNING_UUID, f"e{i}")
        stream = yield self.open(resume_after=first.id)
        events = yield take(stream, 4)
        self.assertEqual(events[0].metadata["gap"], "true")
        self.assertEqual(events[0].type, m.UNKNOWN)
        self.assertEqual([e.message for e in events[1:]], ["e2", "e3", "e4"])

    @defer.inlineCallbacks
    def test_slow_subscriber_cut_while_others_continue(self):
        # Big events fill the slow client's flow-control window, then its queue of 8.
        yield self.start(**{"events.subscriber_queue": 8})
        bus = self.daemon.node.bus
        slow = yield self.open()
        fast = yield self.open()
        payload = "x" * 256 * 1024
        received = 0
        for _ in range(200):
            for _ in range(4):
                bus.publish(m.UNKNOWN, "", payload)
            got = yield take(fast, 4)
            received += len(got)
            if bus.subscriber_count == 1:
                break
        self.assertEqual(bus.subscriber_count, 1, "the slow subscriber was never cut off")
        # Only now start reading the slow one: it holds what it was sent, then the error.
        code = yield stream_error(slow)
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        bus.publish(m.VM_STARTED, RUNNING_UUID, "still flowing")
        (event,) = yield take(fast, 1)
        self.assertEqual(event.message, "still flowing")

    @defer.inlineCallbacks
    def test_shutdown_ends_streams_unavailable(self):
        yield self.start()
        channel = grpc.insecure_channel(self.daemon.address)
        self.addCleanup(channel.close)
        from quantix.proto import node_grpc

        streams = []
        for _ in range(3):
            s = yield self.open(stub=node_grpc.NodeDaemonServiceStub(channel))
            streams.append(s)
        metrics = node_grpc.NodeDaemonServiceStub(channel).StreamMetrics(
            node_pb2.StreamMetricsRequest(interval_seconds=60), timeout=STREAM_TIMEOUT
        )
        yield take(metrics, 1)
        errors_ = [stream_error(s) for s in [*streams, metrics]]
        yield self.daemon.node.stopService()
        codes = yield defer.gatherResults(errors_)
        self.assertEqual(codes, [grpc.StatusCode.UNAVAILABLE] * 4)

    @defer.inlineCallbacks
    def test_bad_resume_header_is_invalid_argument(self):
        yield self.start()
        stream = self.daemon.stub.StreamEvents(
            Empty(), metadata=[(RESUME_HEADER, "yesterday")], timeout=STREAM_TIMEOUT
        )
        code = yield stream_error(stream)
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)

    @defer.inlineCallbacks
    def test_reconnect_reconciles_with_the_new_connection(self):
        # Every open of the private test host is a fresh copy, where vm-running runs again: the
        # reconciliation after the reconnect must report the resume nobody sent an event for.
        yield self.start()
        stream = yield self.open()
        yield self.virsh(lambda c: c.lookupByName("vm-running").suspend())
        (paused,) = yield take(stream, 1)
        self.assertEqual(paused.type, m.VM_PAUSED)
        hv = self.daemon.node.hypervisor
        done = self.daemon.node.watcher.reconciliations
        old = hv.conn()
        # libvirt's close callback, as when libvirtd goes away (cannot be provoked on the test driver).
        hv._closed(old, libvirt.VIR_CONNECT_CLOSE_REASON_EOF)
        yield wait_for(lambda: hv.connected and self.daemon.node.watcher.reconciliations > done)
        (resumed,) = yield take(stream, 1)
        self.assertEqual((resumed.type, resumed.vm_id), (m.VM_RESUMED, RUNNING_UUID))
        self.assertEqual(resumed.metadata["source"], "reconcile")
        self.assertEqual(int(resumed.id), int(paused.id) + 1)

    @defer.inlineCallbacks
    def test_reconcile_after_reconnect_finds_changes_behind_our_back(self):
        yield self.start()
        watcher = self.daemon.node.watcher
        stream = yield self.open()
        conn = self.daemon.node.hypervisor.conn()
        # As while the connection is down: no callbacks on it.
        yield threads.deferToThread(watcher.detach)

        def behind_our_back(conn):
            conn.lookupByName("vm-running").suspend()
            conn.lookupByName("vm-stopped").undefine()
            xml = conn.lookupByName("vm-running").XMLDesc(0)
            xml = xml.replace("vm-running", "vm-new").replace(
                RUNNING_UUID, "99999999-2222-3333-4444-555555555555"
            )
            conn.createXML(xml, 0)

        yield self.virsh(behind_our_back)
        yield watcher.attach(conn)
        events = yield take(stream, 4)
        got = [(e.type, e.vm_id, e.metadata.get("libvirt_event", "")) for e in events]
        self.assertEqual(
            got,
            [
                (m.VM_PAUSED, RUNNING_UUID, ""),
                (m.UNKNOWN, STOPPED_UUID, "undefined"),
                (m.UNKNOWN, "99999999-2222-3333-4444-555555555555", "defined"),
                (m.VM_STARTED, "99999999-2222-3333-4444-555555555555", ""),
            ],
        )
        self.assertTrue(all(e.metadata["source"] == "reconcile" for e in events))
        # Live events flow again after the re-registration.
        yield self.virsh(lambda c: c.lookupByName("vm-running").resume())
        (event,) = yield take(stream, 1)
        self.assertEqual((event.type, event.metadata["source"]), (m.VM_RESUMED, "libvirt"))

    @defer.inlineCallbacks
    def test_periodic_reconcile_is_silent_without_changes(self):
        yield self.start(**{"events.reconcile_interval": 0.05})
        watcher = self.daemon.node.watcher
        count = watcher.reconciliations
        yield wait_for(lambda: watcher.reconciliations >= count + 2)
        self.assertEqual(self.daemon.node.bus.published, 0)

    @defer.inlineCallbacks
    def test_stream_metrics_samples(self):
        yield self.start()
        stream = self.daemon.stub.StreamMetrics(
            node_pb2.StreamMetricsRequest(interval_seconds=1), timeout=STREAM_TIMEOUT
        )
        self.streams.append(stream)
        samples = yield take(stream, 2)
        first, second = samples
        self.assertGreater(first.memory_total_bytes, 0)
        self.assertGreater(second.timestamp.ToNanoseconds(), first.timestamp.ToNanoseconds())
        self.assertEqual({v.vm_id for v in first.vms}, {RUNNING_UUID, STOPPED_UUID})
        self.assertEqual({v.name for v in first.vms}, {"vm-running", "vm-stopped"})
        self.assertTrue(first.networks)

    @defer.inlineCallbacks
    def test_hundred_subscribers_do_not_starve_unary_calls(self):
        yield self.start(**{"server.max_workers": 256})
        bus = self.daemon.node.bus
        stub = self.daemon.stub
        streams = [stub.StreamEvents(Empty(), timeout=STREAM_TIMEOUT) for _ in range(100)]
        self.streams.extend(streams)
        yield wait_for(lambda: bus.subscriber_count == 100)

        def unary_burst():
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                futures = [
                    pool.submit(stub.HealthCheck, node_pb2.HealthCheckRequest(), timeout=10)
                    for _ in range(64)
                ]
                return [f.result().healthy for f in futures]

        healthy = yield threads.deferToThread(unary_burst)
        self.assertEqual(healthy, [True] * 64)
        event = bus.publish(m.VM_STARTED, RUNNING_UUID, "to everyone")
        ids = yield threads.deferToThread(lambda: {next(s).id for s in streams})
        self.assertEqual(ids, {event.id})
