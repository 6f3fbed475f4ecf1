"""The agent box's quiesce owner: one freeze per VM, serialised, thawed by the owner.

Concurrent RPCs run in worker threads against a real agent manager and the reference guest
peer over a real UNIX socket; the serialisation itself is also shown with the peer holding its
reply (``silent``) while a second freeze arrives.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from quantix import bridge
from quantix.agent.facade import WorkerAgents
from quantix.agent.quiesce import ALREADY_FROZEN, Quiesce
from quantix.errors import Invalid
from quantix.proto import agent_pb2, node_pb2
from quantix.rpc.agent_rpcs import AgentRpcs
from tests.guestpeer import ChannelFixture
from tests.support import NoLibvirt


class QuiesceOwnerTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.f = ChannelFixture()
        self.f.setup(self)
        self.clock = Clock()
        self.quiesce = Quiesce(self.f.manager.request, self.clock)
        self.rpcs = AgentRpcs(WorkerAgents(reactor, self.f.manager, self.quiesce), NoLibvirt())
        self.peer = self.f.peer
        yield self.f.start()

    def freeze_rpc(self, seconds: int = 30):
        req = node_pb2.QuiesceFilesystemsRequest(vm_id=self.f.vm, timeout_seconds=seconds)
        return threads.deferToThread(self.rpcs.quiesce_filesystems, req, None)

    @defer.inlineCallbacks
    def test_two_concurrent_freezes_of_one_vm(self):
        """Both RPCs start before either has an answer: one freezes, the other is refused,
        and the guest is asked once."""
        first, second = yield defer.gatherResults([self.freeze_rpc(), self.freeze_rpc()])
        replies = sorted([first, second], key=lambda r: r.success)
        self.assertEqual([r.success for r in replies], [False, True])
        self.assertEqual(replies[0].error, ALREADY_FROZEN)
        self.assertEqual(len(self.peer.requests_of("quiesce")), 1)
        self.assertEqual(self.quiesce.frozen(self.f.vm).token, replies[1].quiesce_token)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # one auto-thaw timer

    @defer.inlineCallbacks
    def test_second_freeze_waits_for_the_first_answer(self):
        """The race the owner closes: the first freeze is still waiting for the guest when the
        second arrives; the second is decided only after the first is recorded."""
        self.peer.silent = True
        arrived = self.peer.wait_for("quiesce")
        request = agent_pb2.QuiesceFilesystemsRequest(timeout_seconds=30)
        first = self.quiesce.freeze(self.f.vm, request, 10, 30)
        msg = yield arrived
        second = self.quiesce.freeze(self.f.vm, request, 10, 30)
        self.assertFalse(second.called)  # queued behind the first, not checked yet
        # The guest answers the first freeze now.
        self.peer.connections[0].send(
            msg.message_id,
            quiesce_response=agent_pb2.QuiesceFilesystemsResponse(success=True, quiesce_token="g1"),
        )
        a, b = yield defer.gatherResults([first, second])
        self.assertEqual((a.reply.success, a.token), (True, "g1"))
        self.assertEqual((b.reply.success, b.reply.error), (False, ALREADY_FROZEN))
        self.assertEqual(len(self.peer.requests_of("quiesce")), 1)

    @defer.inlineCallbacks
    def test_thaw_with_another_token_is_refused_and_the_freeze_kept(self):
        q = yield self.freeze_rpc()
        bad = node_pb2.ThawFilesystemsRequest(vm_id=self.f.vm, quiesce_token="other")
        yield self.assertFailure(threads.deferToThread(self.rpcs.thaw_filesystems, bad, None), Invalid)
        self.assertIsNotNone(self.quiesce.frozen(self.f.vm))
        good = node_pb2.ThawFilesystemsRequest(vm_id=self.f.vm, quiesce_token=q.quiesce_token)
        t = yield threads.deferToThread(self.rpcs.thaw_filesystems, good, None)
        self.assertTrue(t.success)
        self.assertIsNone(self.quiesce.frozen(self.f.vm))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_owner_is_reactor_only(self):
        request = agent_pb2.QuiesceFilesystemsRequest()
        yield self.assertFailure(
            threads.deferToThread(self.quiesce.freeze, self.f.vm, request, 10, 30), bridge.WrongThread
        )
