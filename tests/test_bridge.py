"""The reactor/worker bridge: each helper works from its own side and refuses the other."""

from __future__ import annotations

import threading

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from quantix import bridge


class BridgeTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_call_on_reactor_from_a_worker(self):
        seen = []

        def on_reactor(value: int) -> defer.Deferred:
            seen.append(bridge.on_reactor_thread())
            return defer.succeed(value * 2)

        result = yield threads.deferToThread(bridge.call_on_reactor, reactor, on_reactor, 21)
        self.assertEqual((result, seen), (42, [True]))

    def test_call_on_reactor_from_the_reactor_refuses(self):
        self.assertRaises(bridge.WrongThread, bridge.call_on_reactor, reactor, lambda: None)

    @defer.inlineCallbacks
    def test_run_in_worker(self):
        main = threading.get_ident()
        ident = yield bridge.run_in_worker(threading.get_ident)
        self.assertNotEqual(ident, main)

    @defer.inlineCallbacks
    def test_run_in_worker_from_a_worker_refuses(self):
        yield self.assertFailure(
            threads.deferToThread(bridge.run_in_worker, threading.get_ident), bridge.WrongThread
        )

    @defer.inlineCallbacks
    def test_post_to_reactor(self):
        done: defer.Deferred = defer.Deferred()
        yield threads.deferToThread(
            bridge.post_to_reactor, reactor, lambda: done.callback(bridge.on_reactor_thread())
        )
        self.assertTrue((yield done))

    @defer.inlineCallbacks
    def test_reactor_only(self):
        @bridge.reactor_only
        def owned(x: int) -> int:
            return x + 1

        self.assertEqual(owned(1), 2)
        yield self.assertFailure(threads.deferToThread(owned, 1), bridge.WrongThread)
        self.assertEqual((yield threads.deferToThread(bridge.call_on_reactor, reactor, owned, 2)), 3)
