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
from quantix.hypervisor.connection import Conn, Hypervisor, HypervisorIdentity, Input
from quantix.util.backoff import Backoff
from quantix.util.states import IllegalTransition
from tests.support import TEST_NODE_XML, wait_for


class SupervisionTests(unittest.TestCase):
    def make(self, uri: str) -> tuple[Hypervisor, Clock]:
        clock = Clock()
        hv = Hypervisor(clock, uri, backoff=Backoff(0.5, 30.0, rand=lambda: 0.0))
        hv.loop = eventloop.install("thread", reactor)
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        Service.startService(hv)  # running, without opening yet (the test calls start())
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
        hv.start()
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
        hv.start()
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


class _Conn:
    """Records what the supervisor does to a connection."""

    def __init__(self) -> None:
        self.close_callback = None

    def registerCloseCallback(self, cb, opaque) -> None:
        self.close_callback = cb


class _Loop:
    def dispatch(self, func):
        return func


IDENT = HypervisorIdentity("QEMU", "9.0.0", "9.0.0", "host")


class TransitionTests(unittest.TestCase):
    """The named states on a fake clock: no libvirt, no threads."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.opens: list[defer.Deferred] = []
        self.closed: list[_Conn] = []
        self.hv = Hypervisor(
            self.clock,
            "qemu:///x",
            backoff=Backoff(0.5, 30.0, rand=lambda: 0.0),
            opener=self._open,
            closer=self.closed.append,
        )
        self.hv.loop = _Loop()
        self.events: list[str] = []
        self.hv.listen(lambda conn: self.events.append("up"), lambda: self.events.append("down"))

    def _open(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.opens.append(d)
        return d

    def test_connect_fail_retry_connect_lose_reconnect(self) -> None:
        hv = self.hv
        self.assertIs(hv.state, Conn.IDLE)
        hv.start()
        self.assertIs(hv.state, Conn.CONNECTING)
        self.opens[-1].errback(libvirt.libvirtError("refused"))
        self.assertIs(hv.state, Conn.WAITING)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [0.5])
        self.clock.advance(0.5)
        self.assertIs(hv.state, Conn.CONNECTING)
        first = _Conn()
        self.opens[-1].callback((first, IDENT))
        self.assertIs(hv.state, Conn.CONNECTED)
        self.assertIs(hv.conn(), first)
        first.close_callback(first, 1)
        self.assertIs(hv.state, Conn.WAITING)
        self.assertEqual(self.closed, [first])
        self.assertRaises(errors.HypervisorDown, hv.conn)
        # The backoff started over with the connection: the retry is 0.5 s away again.
        self.assertEqual([c.getTime() - self.clock.seconds() for c in self.clock.getDelayedCalls()], [0.5])
        self.clock.advance(0.5)
        second = _Conn()
        self.opens[-1].callback((second, IDENT))
        self.assertEqual(self.events, ["up", "down", "up"])
        self.assertEqual(hv.reconnects, 1)
        first.close_callback(first, 1)  # stale: nothing changes
        self.assertIs(hv.state, Conn.CONNECTED)

    def test_stop_while_connecting_closes_the_late_connection(self) -> None:
        self.hv.start()
        self.assertIsNone(self.hv.stop())
        self.assertIs(self.hv.state, Conn.STOPPED)
        late = _Conn()
        self.opens[-1].callback((late, IDENT))
        self.assertEqual(self.closed, [late])
        self.assertIs(self.hv.state, Conn.STOPPED)
        self.assertFalse(self.hv.connected)

    def test_stop_while_waiting_cancels_the_retry(self) -> None:
        self.hv.start()
        self.opens[-1].errback(libvirt.libvirtError("refused"))
        self.hv.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIs(self.hv.state, Conn.STOPPED)

    def test_stop_while_connected_closes_and_a_restart_connects_again(self) -> None:
        self.hv.start()
        conn = _Conn()
        self.opens[-1].callback((conn, IDENT))
        d = self.hv.stop()
        self.assertIsNotNone(d)
        self.assertEqual(self.closed, [conn])
        conn.close_callback(conn, 0)  # the close we caused: ignored
        self.assertIs(self.hv.state, Conn.STOPPED)
        self.hv.start()
        self.assertIs(self.hv.state, Conn.CONNECTING)
        self.assertEqual(len(self.opens), 2)

    def test_an_input_the_table_does_not_list_fails_loudly(self) -> None:
        with self.assertRaises(IllegalTransition):
            self.hv.states.fire(Input.RETRY)
        self.hv.start()
        with self.assertRaises(IllegalTransition):
            self.hv.start()
