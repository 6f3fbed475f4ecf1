"""Connection supervision on the test driver: backoff schedule, listeners across a reconnect.

The real loss of a connection (libvirtd dropping the client) is in ``test_vm_qemu``; here the
close callback is invoked the way libvirt invokes it, and retries run on a fake clock.
"""

from __future__ import annotations

import libvirt
from twisted.application.service import Service
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from quantix import errors
from quantix.hypervisor import eventloop
from quantix.hypervisor.connection import Hypervisor
from quantix.util.backoff import Backoff
from tests.support import TEST_NODE_XML, wait_for


class SupervisionTests(unittest.TestCase):
    def make(self, uri: str) -> tuple[Hypervisor, Clock]:
        clock = Clock()
        hv = Hypervisor(clock, uri, backoff=Backoff(0.5, 30.0, rand=lambda: 0.0))
        hv.loop = eventloop.install("thread", reactor)
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        Service.startService(hv)  # running, without opening yet
        self.addCleanup(lambda: hv.stopService() if hv.running else None)
        return hv, clock

    @defer.inlineCallbacks
    def next_retry(self, clock: Clock) -> float:
        yield wait_for(lambda: bool(clock.getDelayedCalls()))
        [call] = clock.getDelayedCalls()
        return call.getTime() - clock.seconds()

    @defer.inlineCallbacks
    def test_backoff_doubles_to_thirty_seconds_then_resets(self):
        hv, clock = self.make("qemu+unix:///system?socket=/nonexistent/libvirt-sock")
        hv._connect()
        delays = []
        for _ in range(8):
            delay = yield self.next_retry(clock)
            delays.append(delay)
            clock.advance(delay)
        self.assertEqual(delays, [0.5, 1, 2, 4, 8, 16, 30, 30])
        self.assertRaises(errors.HypervisorDown, hv.conn)
        hv.uri = f"test://{TEST_NODE_XML}"
        clock.advance((yield self.next_retry(clock)))
        yield wait_for(lambda: hv.connected)
        self.assertEqual(hv._backoff.attempts, 0)

    @defer.inlineCallbacks
    def test_listeners_run_again_after_reconnect(self):
        hv, clock = self.make(f"test://{TEST_NODE_XML}")
        events = []
        hv.listen(lambda conn: events.append(("up", conn)), lambda: events.append(("down", None)))
        hv._connect()
        yield wait_for(lambda: hv.connected)
        first = hv.conn()
        # What libvirt's close callback delivers when the daemon goes away.
        hv._closed(first, 0)
        self.assertFalse(hv.connected)
        self.assertRaises(errors.HypervisorDown, hv.conn)
        clock.advance((yield self.next_retry(clock)))
        yield wait_for(lambda: hv.connected)
        self.assertEqual([e[0] for e in events], ["up", "down", "up"])
        self.assertIsNot(events[2][1], first)
        self.assertEqual(hv.reconnects, 1)
        # A stale close callback from the old connection changes nothing.
        hv._closed(first, 0)
        self.assertTrue(hv.connected)
