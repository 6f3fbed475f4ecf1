"""Agent channels follow VM lifecycle events: opened when a VM starts, closed when it stops."""

from __future__ import annotations

import os

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from quantix.events import mapping
from tests.guestpeer import GuestPeer
from tests.support import Daemon, wait_for

STOPPED_VM = "66666666-7777-8888-9999-000000000000"
RUNNING_VM = "11111111-2222-3333-4444-555555555555"


class AgentFollowsLifecycleTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_start_connects_and_destroy_disconnects(self):
        daemon = Daemon(self)
        sockets = daemon.config.agent.socket_dir
        os.makedirs(sockets)
        peer = GuestPeer(reactor)
        port = reactor.listenUNIX(os.path.join(sockets, f"{STOPPED_VM}.agent.sock"), peer)
        self.addCleanup(port.stopListening)
        yield daemon.start()
        node = daemon.node
        yield wait_for(lambda: node.watcher.reconciliations >= 1)
        self.assertFalse(node.agents.info(STOPPED_VM).connected)

        dom = node.hypervisor.conn().lookupByUUIDString(STOPPED_VM)
        yield threads.deferToThread(dom.create)
        yield wait_for(lambda: node.agents.info(STOPPED_VM).connected)
        types = [e.type for e in node.bus.buffer if e.vm_id == STOPPED_VM]
        self.assertIn(mapping.AGENT_CONNECTED, types)

        yield threads.deferToThread(dom.destroy)
        yield wait_for(lambda: not node.agents.info(STOPPED_VM).connected)
        types = [e.type for e in node.bus.buffer if e.vm_id == STOPPED_VM]
        self.assertIn(mapping.AGENT_DISCONNECTED, types)
        peer.hang_up()

    @defer.inlineCallbacks
    def test_vm_running_at_start_is_followed(self):
        """The reconciliation baseline starts channels for VMs that were already running."""
        daemon = Daemon(self)
        os.makedirs(daemon.config.agent.socket_dir)
        peer = GuestPeer(reactor)
        path = os.path.join(daemon.config.agent.socket_dir, f"{RUNNING_VM}.agent.sock")
        port = reactor.listenUNIX(path, peer)
        self.addCleanup(port.stopListening)
        yield daemon.start()
        yield wait_for(lambda: daemon.node.agents.info(RUNNING_VM).connected)
        peer.hang_up()
