"""Pure parts of the event box: libvirt → NodeEvent mapping, the bus, reconciliation diffs."""

from __future__ import annotations

import libvirt
from twisted.internet import task
from twisted.trial import unittest

from quantix import errors
from quantix.events import mapping as m
from quantix.events import reconcile
from quantix.events.bus import EventBus
from quantix.events.metrics import vm_counters


class MappingTests(unittest.TestCase):
    def test_lifecycle_types_follow_the_contract(self):
        cases = [
            (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED, 1),
            (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED, 2),
            (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_PAUSED, 3),
            (libvirt.VIR_DOMAIN_EVENT_RESUMED, libvirt.VIR_DOMAIN_EVENT_RESUMED_UNPAUSED, 4),
            (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, 5),
            (libvirt.VIR_DOMAIN_EVENT_CRASHED, libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED, 5),
            (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED, 7),
            (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_MIGRATED, 8),
            (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED, 0),
        ]
        for event, detail, expected in cases:
            self.assertEqual(m.lifecycle("vm", event, detail)[0], expected, (event, detail))

    def test_lifecycle_reason_in_metadata(self):
        _, message, meta = m.lifecycle(
            "web", libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN
        )
        self.assertEqual(meta, {"libvirt_event": "stopped", "libvirt_detail": "shutdown"})
        self.assertIn("web", message)

    def test_texts_say_what_libvirt_reported(self):
        shutdown = libvirt.VIR_DOMAIN_EVENT_SHUTDOWN
        for detail, text in (
            (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_FINISHED, "VM web shutdown finished"),
            (libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST, "VM web shutdown finished (requested by the guest)"),
        ):
            kind, message, _ = m.lifecycle("web", shutdown, detail)
            self.assertEqual((kind, message), (m.UNKNOWN, text))
        # Every (event, detail) this libvirt knows has its own text.
        for name in m.LIFECYCLE_EVENTS.values():
            for det in m.DETAILS[name].values():
                self.assertIn((name, det), m.LIFECYCLE_TEXT, (name, det))

    def test_defined_and_undefined_keep_unknown_but_say_so(self):
        for event, word in (
            (libvirt.VIR_DOMAIN_EVENT_DEFINED, "defined"),
            (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, "undefined"),
        ):
            kind, message, meta = m.lifecycle("web", event, 0)
            self.assertEqual(kind, m.UNKNOWN)  # the contract has no type for them
            self.assertTrue(message.startswith(f"VM web {word}"), message)
            self.assertEqual(meta["libvirt_event"], word)

    def test_other_callbacks(self):
        self.assertEqual(m.reboot("vm")[0], 6)
        self.assertEqual(m.device("vm", "virtio-disk1", True)[0], 12)
        self.assertEqual(m.device("vm", "ua-disk-2", False)[0], 13)
        self.assertEqual(m.device("vm", "net1", True)[0], 14)
        self.assertEqual(m.device("vm", "net1", False)[0], 15)
        self.assertEqual(m.device("vm", "rng0", False)[0], 0)
        connected = libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED
        disconnected = libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED
        self.assertEqual(m.agent_lifecycle("vm", connected, 1)[0], 18)
        self.assertEqual(m.agent_lifecycle("vm", disconnected, 2)[2]["reason"], "channel")
        _, _, meta = m.io_error(
            "vm", "/img", "virtio-disk0", libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE, "enospc"
        )
        self.assertEqual((meta["action"], meta["reason"]), ("pause", "enospc"))
        self.assertEqual(m.watchdog("vm", libvirt.VIR_DOMAIN_EVENT_WATCHDOG_RESET)[2]["action"], "reset")

    def test_resumed_while_starting_is_redundant(self):
        resumed = libvirt.VIR_DOMAIN_EVENT_RESUMED
        self.assertTrue(m.redundant(resumed, None))
        self.assertTrue(m.redundant(resumed, m.STOPPED))
        self.assertFalse(m.redundant(resumed, m.PAUSED))
        self.assertFalse(m.redundant(libvirt.VIR_DOMAIN_EVENT_STARTED, None))

    def test_state_after(self):
        self.assertEqual(m.state_after(libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 0, m.RUNNING), m.PAUSED)
        self.assertIsNone(m.state_after(libvirt.VIR_DOMAIN_EVENT_UNDEFINED, 0, m.STOPPED))
        self.assertEqual(m.state_after(libvirt.VIR_DOMAIN_EVENT_DEFINED, 1, m.RUNNING), m.RUNNING)
        self.assertEqual(
            m.coarse_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED), m.CRASHED
        )


class ReconcileDiffTests(unittest.TestCase):
    def test_missed_transitions(self):
        known = {"a": ("a", m.RUNNING), "b": ("b", m.PAUSED), "c": ("c", m.RUNNING), "d": ("d", m.STOPPED)}
        now = {"a": ("a", m.RUNNING), "b": ("b", m.RUNNING), "d": ("d", m.CRASHED), "e": ("e", m.RUNNING)}
        got = [(t, u, meta.get("libvirt_event")) for t, u, _, meta in reconcile.diff(known, now)]
        self.assertEqual(
            got,
            [
                (m.VM_RESUMED, "b", None),
                (m.VM_STOPPED, "c", None),
                (m.UNKNOWN, "c", "undefined"),
                (m.VM_CRASHED, "d", None),
                (m.UNKNOWN, "e", "defined"),
                (m.VM_STARTED, "e", None),
            ],
        )
        self.assertTrue(all(meta["source"] == "reconcile" for *_, meta in reconcile.diff(known, now)))

    def test_no_change_no_events(self):
        same = {"a": ("a", m.RUNNING)}
        self.assertEqual(reconcile.diff(same, dict(same)), [])


class BusTests(unittest.TestCase):
    def bus(self, **kw):
        return EventBus(task.Clock(), first_id=kw.pop("first_id", 100), **kw)

    def test_ids_increase_and_fan_out(self):
        bus = self.bus()
        a, b = bus.subscribe(), bus.subscribe()
        for i in range(3):
            bus.publish(m.VM_STARTED, f"vm{i}", "started")
        for sub in (a, b):
            got = [sub.queue.popleft() for _ in range(3)]
            self.assertEqual([e.id for e in got], ["100", "101", "102"])
            self.assertEqual(got[0].vm_id, "vm0")

    def test_resume_after_id(self):
        bus = self.bus()
        for _ in range(5):
            bus.publish(m.VM_STARTED, "vm", "x")
        sub = bus.subscribe(resume_after=102)
        self.assertEqual([e.id for e in sub.backlog], ["103", "104"])
        self.assertEqual(bus.subscribe(resume_after=104).backlog, [])

    def test_gap_when_id_left_the_buffer(self):
        bus = self.bus(buffer_size=3)
        for _ in range(6):
            bus.publish(m.VM_STARTED, "vm", "x")
        backlog = bus.subscribe(resume_after=100).backlog
        self.assertEqual(backlog[0].metadata["gap"], "true")
        self.assertEqual([e.id for e in backlog[1:]], ["103", "104", "105"])
        # An id from a later run than ours (cannot be ours): also a gap.
        self.assertEqual(bus.subscribe(resume_after=10**9).backlog[0].metadata["gap"], "true")

    def test_slow_subscriber_is_cut_off_alone(self):
        bus = self.bus(subscriber_queue=2)
        slow, fast = bus.subscribe(), bus.subscribe()
        fast_events = fast.events(lambda: True, poll=0.01)
        seen = []
        for _ in range(4):
            bus.publish(m.VM_STARTED, "vm", "x")
            seen.append(next(fast_events).id)
        self.assertEqual(len(seen), 4)
        self.assertEqual(bus.subscriber_count, 1)
        events = slow.events(lambda: True, poll=0.01)
        self.assertRaises(errors.ResourceExhausted, lambda: list(events))

    def test_stop_ends_subscribers_unavailable(self):
        bus = self.bus()
        bus.startService()
        sub = bus.subscribe()
        bus.stopService()
        self.assertRaises(errors.Unavailable, lambda: list(sub.events(lambda: True, poll=0.01)))
        self.assertRaises(errors.Unavailable, bus.subscribe)

    def test_queued_events_come_in_order_then_shutdown(self):
        bus = self.bus()
        bus.startService()
        sub = bus.subscribe()
        for _ in range(3):
            bus.publish(m.VM_STARTED, "vm", "x")
        bus.stopService()
        events = sub.events(lambda: True, poll=0.01)
        self.assertEqual([next(events).id for _ in range(3)], ["100", "101", "102"])
        self.assertRaises(errors.Unavailable, next, events)

    def test_overflow_ends_at_once_without_queued_events(self):
        bus = self.bus(subscriber_queue=2)
        sub = bus.subscribe()
        for _ in range(3):
            bus.publish(m.VM_STARTED, "vm", "x")
        self.assertRaises(errors.ResourceExhausted, next, sub.events(lambda: True, poll=0.01))

    def test_inactive_client_returns(self):
        bus = self.bus()
        sub = bus.subscribe()
        self.assertEqual(list(sub.events(lambda: False, poll=0.01)), [])
        self.assertEqual(bus.subscriber_count, 0)


class MetricsTests(unittest.TestCase):
    def test_vm_counters(self):
        stats = {
            "cpu.time": 5_000_000_000,
            "vcpu.current": 2,
            "balloon.available": 1000,
            "balloon.unused": 200,
            "block.count": 2,
            "block.0.rd.bytes": 10,
            "block.1.rd.bytes": 5,
            "block.0.wr.bytes": 7,
            "net.count": 1,
            "net.0.rx.bytes": 3,
            "net.0.tx.bytes": 4,
        }
        c = vm_counters(stats)
        self.assertEqual((c["memory"], c["rd"], c["wr"], c["rx"], c["tx"]), (800 * 1024, 15, 7, 3, 4))


class BusGaugeTests(unittest.TestCase):
    def test_queue_depths_and_lag(self):
        bus = EventBus(task.Clock(), buffer_size=10, subscriber_queue=10)
        self.assertEqual(bus.queue_depths(), [])
        self.assertEqual(bus.lag_seconds(), 0.0)
        sub = bus.subscribe()
        bus.publish(1, "vm", "started")
        bus.publish(3, "vm", "paused")
        self.assertEqual(bus.queue_depths(), [2])
        self.assertGreaterEqual(bus.lag_seconds(), 0.0)
        sub.queue.clear()
        self.assertEqual(bus.lag_seconds(), 0.0)


class WatcherMemoryTests(unittest.TestCase):
    def test_nothing_is_kept_for_a_domain_once_it_is_gone(self):
        """Churn (define, start, stop, undefine) leaves no per-domain entry behind."""
        from quantix.events.watcher import Domain, DomainWatcher

        class Hypervisor:
            def listen(self, *callbacks):
                pass

        watcher = DomainWatcher(task.Clock(), Hypervisor(), EventBus(task.Clock(), first_id=1))
        conn = watcher._conn = object()
        uuids = [f"00000000-0000-0000-0000-{n:012d}" for n in range(500)]
        for uuid in uuids:
            dom = Domain(uuid, f"vm-{uuid[-4:]}")
            for event, detail in (
                (libvirt.VIR_DOMAIN_EVENT_DEFINED, libvirt.VIR_DOMAIN_EVENT_DEFINED_ADDED),
                (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED),
                (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED),
                (libvirt.VIR_DOMAIN_EVENT_UNDEFINED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED_REMOVED),
            ):
                watcher._on_lifecycle(conn, dom, event, detail)
        held = [
            name
            for name, value in vars(watcher).items()
            if isinstance(value, dict | set) and any(u in value for u in uuids)
        ]
        self.assertEqual(held, [])
