"""The agent protocol and manager against the reference guest peer over real UNIX sockets."""

from __future__ import annotations

import os

from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from quantix.agent import codec
from quantix.agent.guestinfo import AGENT_CONNECTED, AGENT_DISCONNECTED, GuestInfo, GuestInfoCache, to_proto
from quantix.agent.manager import socket_candidates
from quantix.agent.protocol import AgentError, ConnectionLost
from quantix.errors import Invalid, Timeout, Unavailable
from quantix.proto import agent_pb2
from tests.guestpeer import ChannelFixture, Events, default_ready, default_telemetry


class CandidateTests(unittest.TestCase):
    def test_own_socket_first_then_matching_libvirt_dirs(self) -> None:
        vm = "8a5f7c1e-0d7b-4f57-9a57-1d2b3c4d5e6f"
        tree = {
            "/run/libvirt/qemu/channel": [f"domain-3-{vm[:20]}", "domain-4-other", f"domain-5-x{vm[:19]}"],
            "/var/lib/libvirt/qemu/channel/target": ["domain-7-web01", "domain-8-web012"],
        }

        def listdir(path: str) -> list[str]:
            if path not in tree:
                raise FileNotFoundError(path)
            return tree[path]

        roots = ("/run/libvirt/qemu/channel", "/nope", "/var/lib/libvirt/qemu/channel/target")
        got = socket_candidates(vm, "/srv/socks", roots, domain_name="web01", listdir=listdir)
        self.assertEqual(
            got,
            [
                f"/srv/socks/{vm}.agent.sock",
                f"/run/libvirt/qemu/channel/domain-3-{vm[:20]}/org.quantix.agent.0",
                f"/run/libvirt/qemu/channel/domain-3-{vm[:20]}/org.limiquantix.agent.0",
                "/var/lib/libvirt/qemu/channel/target/domain-7-web01/org.quantix.agent.0",
                "/var/lib/libvirt/qemu/channel/target/domain-7-web01/org.limiquantix.agent.0",
            ],
        )

    def test_no_roots(self) -> None:
        self.assertEqual(socket_candidates("v", "/d", ()), ["/d/v.agent.sock"])


class GuestInfoTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.events = Events()
        self.cache = GuestInfoCache(self.clock, telemetry_interval=5, on_event=self.events)

    def test_ready_then_three_missed_intervals(self) -> None:
        self.cache.agent_ready("vm", default_ready())
        self.assertTrue(self.cache.get("vm").connected)
        self.clock.advance(14)
        self.cache.telemetry("vm", default_telemetry())
        self.clock.advance(14.9)
        self.assertTrue(self.cache.get("vm").connected)
        self.clock.advance(0.1)
        self.assertFalse(self.cache.get("vm").connected)
        self.assertEqual(self.events.kinds(), [AGENT_CONNECTED, AGENT_DISCONNECTED])
        self.assertIn("3 intervals", self.events.seen[-1][2])
        self.cache.telemetry("vm", default_telemetry())  # the agent comes back
        self.assertEqual(self.events.kinds(), [AGENT_CONNECTED, AGENT_DISCONNECTED, AGENT_CONNECTED])
        self.cache.forget("vm")
        self.assertEqual(self.events.kinds()[-1], AGENT_DISCONNECTED)
        self.assertEqual(self.cache.get("vm"), GuestInfo())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_to_proto(self) -> None:
        self.clock.advance(1700000000.25)
        self.cache.agent_ready("vm", default_ready())
        t = default_telemetry("renamed")
        t.interfaces.add(
            name="eth1",
            ipv4_addresses=["127.0.0.1/8", "bogus"],
            ipv6_addresses=["fe80::1/64", "2001:db8::5/64"],
            state=agent_pb2.INTERFACE_STATE_DOWN,
        )
        self.cache.telemetry("vm", t)
        p = to_proto(self.cache.get("vm"))
        self.assertTrue(p.connected)
        self.assertEqual(
            (p.version, p.os_name, p.os_version, p.kernel_version),
            ("0.1.27-peer", "Ubuntu", "24.04", "6.8.0"),
        )
        self.assertEqual(p.hostname, "renamed")
        self.assertEqual(list(p.ip_addresses), ["10.0.0.5", "2001:db8::5"])
        self.assertEqual(list(p.capabilities), list(default_ready().capabilities))
        self.assertEqual([(i.name, i.is_up) for i in p.interfaces], [("eth0", True), ("eth1", False)])
        self.assertEqual(p.resource_usage.memory_available_bytes, (1 << 30) - (1 << 28))
        self.assertEqual(p.resource_usage.process_count, 42)
        self.assertEqual(p.resource_usage.disks[0].usage_percent, 25.0)
        self.assertEqual((p.last_seen.seconds, p.last_seen.nanos), (1700000000, 250000000))
        self.assertFalse(to_proto(self.cache.get("unknown")).connected)

    def test_channel_down_without_agent_emits_nothing(self) -> None:
        self.cache.channel_down("vm")
        self.assertEqual(self.events.seen, [])

    def test_subscriber_failure_is_contained(self) -> None:
        def boom(*a: object) -> None:
            raise RuntimeError("subscriber bug")

        self.cache.on_event = boom
        self.cache.agent_ready("vm", default_ready())
        self.assertTrue(self.cache.get("vm").connected)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ChannelTests(unittest.TestCase):
    timeout = 20

    def setUp(self) -> None:
        self.f = ChannelFixture()
        self.f.setup(self)

    @defer.inlineCallbacks
    def test_ping_round_trip_and_ready_info(self):
        yield self.f.start()
        pong = yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(sequence=42), 10)
        self.assertEqual((pong.sequence, pong.version), (42, "0.1.27-peer"))
        info = self.f.manager.info(self.f.vm)
        self.assertTrue(info.connected)
        self.assertEqual((info.hostname, info.os_name), ("peer-guest", "Ubuntu"))
        self.assertIn("quiesce", info.capabilities)
        self.assertEqual(self.f.manager.socket_path(self.f.vm), self.f.path)
        (req,) = self.f.peer.requests
        self.assertTrue(req.message_id)
        self.assertGreater(req.timestamp.seconds, 0)

    @defer.inlineCallbacks
    def test_no_channel_opens_after_shutdown_began(self):
        """A VM reported running after stop_all (a late reconciliation) gets no channel."""
        yield self.f.start()
        yield self.f.manager.stop_all()
        self.f.manager.vm_started(self.f.vm)
        self.assertIsNone(self.f.manager.socket_path(self.f.vm))
        self.assertFalse(self.f.manager.is_channel_open(self.f.vm))

    @defer.inlineCallbacks
    def test_telemetry_updates_info(self):
        yield self.f.start()
        t = default_telemetry("from-telemetry")
        t.cpu_usage_percent = 77.0
        got = self.f.peer.wait_for("ping")
        self.f.peer.broadcast_telemetry(t)
        # The channel is ordered: once the ping's reply is in, the telemetry before it was handled.
        yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 10)
        yield got
        info = self.f.manager.info(self.f.vm)
        self.assertEqual(info.hostname, "from-telemetry")
        self.assertEqual(info.telemetry.cpu_usage_percent, 77.0)

    @defer.inlineCallbacks
    def test_disconnect_fails_pending_requests_at_once(self):
        yield self.f.start()
        self.f.peer.silent = True
        arrived = self.f.peer.wait_for("execute")
        d1 = self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 3600)
        d2 = self.f.manager.request(self.f.vm, agent_pb2.ExecuteRequest(command="sleep"), 3600)
        yield arrived
        gone = self.f.events.next(AGENT_DISCONNECTED)
        self.f.peer.hang_up()
        for d in (d1, d2):
            yield self.assertFailure(d, ConnectionLost)
        self.assertTrue(issubclass(ConnectionLost, Unavailable))
        yield gone
        self.assertFalse(self.f.manager.info(self.f.vm).connected)

    @defer.inlineCallbacks
    def test_reconnects_after_peer_restarts(self):
        yield self.f.start()
        gone = self.f.events.next(AGENT_DISCONNECTED)
        yield self.f.stop_listening()
        yield gone
        yield self.assertFailure(self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 5), Unavailable)
        back = self.f.events.next(AGENT_CONNECTED)
        self.f.listen()
        yield back
        pong = yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(sequence=2), 10)
        self.assertEqual(pong.sequence, 2)
        self.assertEqual(self.f.events.kinds(), [AGENT_CONNECTED, AGENT_DISCONNECTED, AGENT_CONNECTED])

    @defer.inlineCallbacks
    def test_one_structured_line_per_channel_state_change(self):
        """No factory reprs ("Starting factory <...>") at any level; one line per change."""
        from twisted.logger import globalLogPublisher

        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        yield self.f.start()
        gone = self.f.events.next(AGENT_DISCONNECTED)
        yield self.f.stop_listening()
        yield gone
        back = self.f.events.next(AGENT_CONNECTED)
        self.f.listen()
        yield back
        yield self.f.manager.vm_stopped(self.f.vm)
        mine = [e for e in seen if e.get("vm_id") == self.f.vm and "channel_state" in e]
        self.assertEqual([e["channel_state"] for e in mine], ["waiting", "open", "closed", "open", "stopped"])
        self.assertEqual(mine[1]["path"], self.f.path)
        self.assertTrue(mine[2]["reason"])
        factories = [e for e in seen if "factory" in str(e.get("log_format", "")).lower()]
        self.assertEqual(factories, [])

    @defer.inlineCallbacks
    def test_socket_appearing_late_is_found(self):
        yield self.f.stop_listening()
        self.assertFalse(os.path.exists(self.f.path))
        ready = self.f.events.next(AGENT_CONNECTED)
        self.f.manager.vm_started(self.f.vm)
        yield self.assertFailure(self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 5), Unavailable)
        reactor.callLater(0.05, self.f.listen)
        yield ready

    @defer.inlineCallbacks
    def test_explicit_socket_path_from_domain_xml(self):
        self.f.manager.socket_dir = "/nonexistent"
        ready = self.f.events.next(AGENT_CONNECTED)
        self.f.manager.vm_started(self.f.vm, socket_path=self.f.path)
        self.f.manager.vm_started(self.f.vm, socket_path="/ignored")  # idempotent
        yield ready
        self.assertEqual(self.f.manager.socket_path(self.f.vm), self.f.path)

    @defer.inlineCallbacks
    def test_agent_without_ready_is_asked_for_capabilities(self):
        """After a daemon restart the agent's port stays open: no agent_ready, only telemetry."""
        self.f.peer.ready = None
        connected = self.f.events.next(AGENT_CONNECTED)
        accepted = self.f.peer.wait_for("connected")
        self.f.manager.vm_started(self.f.vm)
        yield accepted
        asked = self.f.peer.wait_for("get_capabilities")
        self.f.peer.broadcast_telemetry()
        yield connected
        yield asked
        yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 10)  # the answer is in
        info = self.f.manager.info(self.f.vm)
        self.assertEqual((info.version, info.architecture, info.os_name), ("0.1.27-peer", "x86_64", "linux"))
        self.assertIn("quiesce", info.capabilities)
        self.assertEqual(len(self.f.peer.requests_of("get_capabilities")), 1)

    @defer.inlineCallbacks
    def test_garbage_from_peer_then_good_frame_is_served(self):
        yield self.f.start()
        noise = (
            b"\x00junk QTX1\x00\x00\x00\x00 QTX1\xff\xff\xff\xff"
            + codec.MAGIC
            + b"\x00\x00\x00\x03\xff\xff\xff"
        )
        self.f.peer.inject(noise)
        self.f.peer.garbage_before_reply = noise
        for seq in (1, 2, 3):
            pong = yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(sequence=seq), 10)
            self.assertEqual(pong.sequence, seq)

    @defer.inlineCallbacks
    def test_hostile_stream_is_dropped_logged_and_held(self):
        """A guest flooding its channel with garbage is hung up on and not reconnected at once."""
        yield self.f.start()
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        gone = self.f.peer.wait_for("disconnected")
        self.f.peer.inject(b"\x00garbage" * (codec.GARBAGE_LIMIT // 8 + 10))
        yield gone
        self.assertGreater(self.f.manager.held_for(self.f.vm), 20)
        self.assertFalse(self.f.manager.is_channel_open(self.f.vm))
        texts = [formatEvent(e) for e in logged]
        self.assertTrue(any("hostile stream" in t and self.f.vm in t for t in texts), texts)
        yield self.f.manager.vm_stopped(self.f.vm)
        self.assertEqual(self.f.manager.held_for(self.f.vm), 0)

    @defer.inlineCallbacks
    def test_replies_out_of_order(self):
        yield self.f.start()
        self.f.peer.silent = True
        second = self.f.peer.wait_for("execute")
        d1 = self.f.manager.request(self.f.vm, agent_pb2.PingRequest(sequence=1), 10)
        d2 = self.f.manager.request(self.f.vm, agent_pb2.ExecuteRequest(command="x"), 10)
        yield second
        ping_req, exec_req = self.f.peer.requests
        (conn,) = self.f.peer.connections
        conn.send(exec_req.message_id, execute_response=agent_pb2.ExecuteResponse(stdout="second"))
        conn.send(ping_req.message_id, pong=agent_pb2.PongResponse(sequence=1))
        r2, r1 = yield defer.gatherResults([d2, d1])
        self.assertEqual((r1.sequence, r2.stdout), (1, "second"))

    @defer.inlineCallbacks
    def test_mismatched_reply_kind_is_an_agent_error(self):
        yield self.f.start()
        self.f.peer.silent = True
        arrived = self.f.peer.wait_for("ping")
        d = self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 10)
        msg = yield arrived
        self.f.peer.connections[0].send(msg.message_id, thaw_response=agent_pb2.ThawFilesystemsResponse())
        e = yield self.assertFailure(d, AgentError)
        self.assertIn("thaw_response", str(e))

    @defer.inlineCallbacks
    def test_error_event_reply_is_an_agent_error(self):
        yield self.f.start()
        d = self.f.manager.request(self.f.vm, agent_pb2.ResetPasswordRequest(username="root"), 10)
        e = yield self.assertFailure(d, AgentError)
        self.assertIn("unsupported", str(e))

    @defer.inlineCallbacks
    def test_vm_stopped_fails_pending_and_forgets(self):
        yield self.f.start()
        self.f.peer.silent = True
        arrived = self.f.peer.wait_for("ping")
        d = self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 3600)
        yield arrived
        yield self.f.manager.vm_stopped(self.f.vm)
        yield self.assertFailure(d, Unavailable)
        self.assertEqual(self.f.events.kinds(), [AGENT_CONNECTED, AGENT_DISCONNECTED])
        self.assertFalse(self.f.manager.info(self.f.vm).connected)
        yield self.assertFailure(self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 5), Unavailable)

    def test_unknown_vm_and_bad_payload(self) -> None:
        self.assertFailure(self.f.manager.request("nope", agent_pb2.PingRequest(), 5), Unavailable)
        self.f.manager.vm_started(self.f.vm)
        proto_d = self.f.manager.when_connected(self.f.vm)

        def check(proto):
            return self.assertFailure(proto.request(agent_pb2.PongResponse(), 5), Invalid)

        return proto_d.addCallback(check)


class ClockedChannelTests(unittest.TestCase):
    """Time-dependent behaviour with a fake clock driving timeouts and the watchdog."""

    timeout = 20

    def setUp(self) -> None:
        self.clock = Clock()
        self.f = ChannelFixture()
        self.f.setup(self, clock=self.clock, peer_clock=self.clock)

    @defer.inlineCallbacks
    def test_peer_that_never_answers_times_out(self):
        yield self.f.start()
        self.f.peer.silent = True
        arrived = self.f.peer.wait_for("ping")
        d = self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 30)
        yield arrived
        self.clock.advance(29)
        self.assertNoResult(d)
        self.clock.advance(1)
        e = yield self.assertFailure(d, Timeout)
        self.assertIn("ping", str(e))
        # A late answer for a request that timed out is dropped, and the channel still works.
        self.f.peer.silent = False
        pong = yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(sequence=9), 30)
        self.assertEqual(pong.sequence, 9)

    @defer.inlineCallbacks
    def test_false_header_swallowing_a_reply_is_dropped_after_a_timeout(self):
        yield self.f.start()
        proto = yield self.f.manager.when_connected(self.f.vm)
        stale = codec.MAGIC + (5000).to_bytes(4, "big") + b"stale"
        self.f.peer.inject(stale)
        d = self.f.manager.request(self.f.vm, agent_pb2.PingRequest(sequence=1), 30)
        yield self.f.peer.wait_for("ping")
        # The pong went out but lands inside the false frame's claimed payload.
        while proto.decoder.buffered <= len(stale):
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.clock.advance(30)
        yield self.assertFailure(d, Timeout)
        self.assertEqual(proto.decoder.buffered, 0)
        pong = yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(sequence=3), 30)
        self.assertEqual(pong.sequence, 3)

    @defer.inlineCallbacks
    def test_three_missed_telemetry_intervals_mark_disconnected(self):
        yield self.f.start()
        self.clock.advance(10)
        yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 30)
        self.f.peer.broadcast_telemetry()
        yield self.f.manager.request(self.f.vm, agent_pb2.PingRequest(), 30)  # telemetry handled
        self.clock.advance(14)
        self.assertTrue(self.f.manager.info(self.f.vm).connected)
        self.clock.advance(1)
        self.assertFalse(self.f.manager.info(self.f.vm).connected)
        self.assertTrue(self.f.manager.is_channel_open(self.f.vm))
        self.assertEqual(self.f.events.kinds(), [AGENT_CONNECTED, AGENT_DISCONNECTED])
