"""Agent RPC handlers called directly (from worker threads, as gRPC does) with a real manager
connected to the reference guest peer over a real UNIX socket."""

from __future__ import annotations

from twisted.internet import defer, reactor, threads
from twisted.internet.task import Clock
from twisted.trial import unittest

from quantix.agent.facade import WorkerAgents
from quantix.agent.quiesce import Quiesce
from quantix.errors import Invalid, Timeout, Unavailable
from quantix.proto import agent_pb2, node_pb2
from quantix.rpc import agent_rpcs
from quantix.rpc.agent_rpcs import AgentRpcs
from quantix.rpc.registry import collect
from tests.guestpeer import ChannelFixture
from tests.support import NoLibvirt


class Context:
    """The part of grpc.ServicerContext the handlers touch."""

    def __init__(self) -> None:
        self.trailing: tuple = ()

    def set_trailing_metadata(self, md: tuple) -> None:
        self.trailing = md


class AgentRpcTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.f = ChannelFixture()
        self.f.setup(self)
        self.thaw_clock = Clock()
        self.quiesce = Quiesce(self.f.manager.request, self.thaw_clock)
        agents = WorkerAgents(reactor, self.f.manager, self.quiesce)
        self.rpcs = AgentRpcs(agents, NoLibvirt(), wallclock=lambda: 1_800_000_000.5)
        self.guest = self.f.peer.guest
        yield self.f.start()

    def call(self, method, request, context=None):
        """Run a handler in a worker thread, as the gRPC server does."""
        return threads.deferToThread(method, request, context)

    def test_registered_names(self) -> None:
        names = set(collect([self.rpcs]))
        self.assertEqual(
            names,
            {
                "PingAgent",
                "ExecuteInGuest",
                "ReadGuestFile",
                "WriteGuestFile",
                "GuestShutdown",
                "QuiesceFilesystems",
                "ThawFilesystems",
                "SyncTime",
            },
        )

    @defer.inlineCallbacks
    def test_ping(self):
        ctx = Context()
        r = yield self.call(self.rpcs.ping_agent, node_pb2.VMIdRequest(vm_id=self.f.vm), ctx)
        self.assertEqual((r.connected, r.version, r.uptime_seconds), (True, "0.1.27-peer", 1234))
        ((key, value),) = ctx.trailing
        self.assertEqual(key, "x-quantix-agent-rtt-ms")
        self.assertGreaterEqual(float(value), 0.0)

    @defer.inlineCallbacks
    def test_no_agent_is_unavailable(self):
        yield self.assertFailure(
            self.call(self.rpcs.ping_agent, node_pb2.VMIdRequest(vm_id="other")), Unavailable
        )
        req = node_pb2.ExecuteInGuestRequest(vm_id="other", command="true")
        yield self.assertFailure(self.call(self.rpcs.execute_in_guest, req), Unavailable)
        yield self.assertFailure(self.call(self.rpcs.ping_agent, node_pb2.VMIdRequest()), Invalid)

    @defer.inlineCallbacks
    def test_execute_passes_every_field(self):
        req = node_pb2.ExecuteInGuestRequest(
            vm_id=self.f.vm,
            command="ls",
            args=["-l", "/etc"],
            timeout_seconds=7,
            wait_for_exit=True,
            working_directory="/tmp",
            environment={"A": "1", "B": "2"},
        )
        r = yield self.call(self.rpcs.execute_in_guest, req)
        self.assertTrue(r.success)
        self.assertEqual(r.stdout, "ls -l /etc|cwd=/tmp|env=A=1,B=2|t=7")
        sent = self.f.peer.requests_of("execute")[-1]
        self.assertEqual(
            (sent.command, list(sent.args), sent.working_directory, dict(sent.environment)),
            ("ls", ["-l", "/etc"], "/tmp", {"A": "1", "B": "2"}),
        )
        self.assertEqual((sent.timeout_seconds, sent.wait_for_exit), (7, True))

    @defer.inlineCallbacks
    def test_execute_defaults_and_no_wait(self):
        r = yield self.call(
            self.rpcs.execute_in_guest, node_pb2.ExecuteInGuestRequest(vm_id=self.f.vm, command="daemon")
        )
        self.assertTrue(r.success)
        sent = self.f.peer.requests_of("execute")[-1]
        self.assertEqual((sent.timeout_seconds, sent.wait_for_exit), (60, False))

    @defer.inlineCallbacks
    def test_execute_failures(self):
        r = yield self.call(
            self.rpcs.execute_in_guest,
            node_pb2.ExecuteInGuestRequest(vm_id=self.f.vm, command="false", wait_for_exit=True),
        )
        self.assertEqual((r.success, r.exit_code, r.stderr), (False, 1, "false failed"))
        r = yield self.call(
            self.rpcs.execute_in_guest,
            node_pb2.ExecuteInGuestRequest(vm_id=self.f.vm, command="explode", wait_for_exit=True),
        )
        self.assertFalse(r.success)
        self.assertEqual(r.error, "failed to spawn process: explode")

    @defer.inlineCallbacks
    def test_write_then_read_in_chunks(self):
        blob = bytes(range(256)) * 700  # 179200 bytes: three 64 KiB chunks
        w = yield self.call(
            self.rpcs.write_guest_file,
            node_pb2.WriteGuestFileRequest(
                vm_id=self.f.vm, path="/opt/app/conf.bin", data=blob, mode=0o600, create_parents=True
            ),
        )
        self.assertEqual((w.success, w.bytes_written), (True, len(blob)))
        self.assertEqual(self.guest.files["/opt/app/conf.bin"], blob)
        self.assertEqual(self.guest.modes["/opt/app/conf.bin"], 0o600)
        chunks = self.f.peer.requests_of("file_write")
        self.assertEqual([c.chunk_number for c in chunks], [0, 1, 2])
        self.assertEqual({c.total_chunks for c in chunks}, {3})
        self.assertEqual([c.eof for c in chunks], [False, False, True])
        self.assertEqual([c.offset for c in chunks], [0, 65536, 131072])
        self.assertTrue(all(c.create_parents and c.mode == 0o600 for c in chunks))

        r = yield self.call(
            self.rpcs.read_guest_file,
            node_pb2.ReadGuestFileRequest(vm_id=self.f.vm, path="/opt/app/conf.bin"),
        )
        self.assertEqual((r.success, r.data, r.total_size, r.eof), (True, blob, len(blob), True))
        self.assertEqual(len(self.f.peer.requests_of("file_read")), 3)

        r = yield self.call(
            self.rpcs.read_guest_file,
            node_pb2.ReadGuestFileRequest(
                vm_id=self.f.vm, path="/opt/app/conf.bin", offset=100, max_size=70000
            ),
        )
        self.assertEqual((r.data, r.total_size, r.eof), (blob[100:70100], len(blob), False))
        reads = self.f.peer.requests_of("file_read")[-2:]
        self.assertEqual([(q.offset, q.length) for q in reads], [(100, 65536), (65636, 70000 - 65536)])

        r = yield self.call(
            self.rpcs.read_guest_file,
            node_pb2.ReadGuestFileRequest(vm_id=self.f.vm, path="/opt/app/conf.bin", offset=len(blob) - 10),
        )
        self.assertEqual((r.data, r.eof), (blob[-10:], True))

    @defer.inlineCallbacks
    def test_read_stops_at_the_response_cap(self):
        self.patch(agent_rpcs, "MAX_READ", 100_000)
        self.guest.files["/var/log/big"] = b"z" * 150_000
        r = yield self.call(
            self.rpcs.read_guest_file,
            node_pb2.ReadGuestFileRequest(vm_id=self.f.vm, path="/var/log/big", max_size=10**9),
        )
        self.assertEqual((len(r.data), r.total_size, r.eof), (100_000, 150_000, False))

    @defer.inlineCallbacks
    def test_write_empty_and_without_parents(self):
        w = yield self.call(
            self.rpcs.write_guest_file, node_pb2.WriteGuestFileRequest(vm_id=self.f.vm, path="/tmp/empty")
        )
        self.assertEqual((w.success, w.bytes_written), (True, 0))
        self.assertEqual(self.guest.files["/tmp/empty"], b"")
        (c,) = self.f.peer.requests_of("file_write")
        self.assertEqual((c.eof, c.total_chunks, c.create_parents), (True, 1, False))
        w = yield self.call(
            self.rpcs.write_guest_file,
            node_pb2.WriteGuestFileRequest(vm_id=self.f.vm, path="/no/such/dir/f", data=b"x"),
        )
        self.assertFalse(w.success)
        self.assertIn("No such directory", w.error)

    @defer.inlineCallbacks
    def test_read_missing_file(self):
        r = yield self.call(
            self.rpcs.read_guest_file, node_pb2.ReadGuestFileRequest(vm_id=self.f.vm, path="/etc/missing")
        )
        self.assertFalse(r.success)
        self.assertIn("No such file", r.error)

    @defer.inlineCallbacks
    def test_shutdown_reboot_and_poweroff(self):
        r = yield self.call(
            self.rpcs.guest_shutdown,
            node_pb2.GuestShutdownRequest(vm_id=self.f.vm, reboot=True, delay_seconds=30, message="patching"),
        )
        self.assertTrue(r.accepted)
        r = yield self.call(self.rpcs.guest_shutdown, node_pb2.GuestShutdownRequest(vm_id=self.f.vm))
        self.assertTrue(r.accepted)
        reboot, off = self.guest.shutdowns
        self.assertEqual(
            (reboot.type, reboot.delay_seconds, reboot.message),
            (agent_pb2.SHUTDOWN_TYPE_REBOOT, 30, "patching"),
        )
        self.assertEqual(off.type, agent_pb2.SHUTDOWN_TYPE_POWEROFF)

    @defer.inlineCallbacks
    def test_shutdown_when_guest_hangs_up_before_answering(self):
        self.f.peer.silent = True
        arrived = self.f.peer.wait_for("shutdown")
        d = self.call(self.rpcs.guest_shutdown, node_pb2.GuestShutdownRequest(vm_id=self.f.vm))
        yield arrived
        self.f.peer.hang_up()
        r = yield d
        self.assertTrue(r.accepted)

    @defer.inlineCallbacks
    def test_quiesce_thaw_with_token_check(self):
        q = yield self.call(
            self.rpcs.quiesce_filesystems,
            node_pb2.QuiesceFilesystemsRequest(
                vm_id=self.f.vm, mount_points=["/", "/data"], timeout_seconds=20, run_pre_freeze_scripts=True
            ),
        )
        self.assertTrue(q.success)
        self.assertTrue(q.quiesce_token)
        self.assertEqual([(x.mount_point, x.frozen) for x in q.frozen], [("/", True), ("/data", True)])
        sent = self.f.peer.requests_of("quiesce")[-1]
        self.assertEqual(
            (list(sent.mount_points), sent.timeout_seconds, sent.run_pre_freeze_scripts),
            (["/", "/data"], 20, True),
        )

        again = yield self.call(
            self.rpcs.quiesce_filesystems, node_pb2.QuiesceFilesystemsRequest(vm_id=self.f.vm)
        )
        self.assertFalse(again.success)

        bad = node_pb2.ThawFilesystemsRequest(vm_id=self.f.vm, quiesce_token="wrong")
        yield self.assertFailure(self.call(self.rpcs.thaw_filesystems, bad), Invalid)
        self.assertIsNotNone(self.guest.freeze)

        t = yield self.call(
            self.rpcs.thaw_filesystems,
            node_pb2.ThawFilesystemsRequest(
                vm_id=self.f.vm, quiesce_token=q.quiesce_token, run_post_thaw_scripts=True
            ),
        )
        self.assertTrue(t.success)
        self.assertEqual(list(t.thawed_mount_points), ["/", "/data"])
        self.assertIsNone(self.guest.freeze)
        self.assertTrue(self.f.peer.requests_of("thaw")[-1].run_post_thaw_scripts)
        self.assertEqual(self.thaw_clock.getDelayedCalls(), [])  # the auto-thaw timer is gone

        t = yield self.call(
            self.rpcs.thaw_filesystems,
            node_pb2.ThawFilesystemsRequest(vm_id=self.f.vm, quiesce_token=q.quiesce_token),
        )
        self.assertFalse(t.success)  # nothing frozen any more: the agent says so
        self.assertIn("not frozen", t.error)

    @defer.inlineCallbacks
    def test_auto_thaw_when_timeout_passes(self):
        q = yield self.call(
            self.rpcs.quiesce_filesystems,
            node_pb2.QuiesceFilesystemsRequest(vm_id=self.f.vm, timeout_seconds=10),
        )
        self.assertTrue(q.success)
        thawed = self.f.peer.wait_for("thaw")
        self.thaw_clock.advance(9)
        self.assertIsNotNone(self.guest.freeze)
        self.thaw_clock.advance(1)
        msg = yield thawed
        self.assertEqual(msg.thaw.quiesce_token, q.quiesce_token)
        yield self.call(
            self.rpcs.ping_agent, node_pb2.VMIdRequest(vm_id=self.f.vm)
        )  # reply to the thaw is in
        self.assertIsNone(self.guest.freeze)
        self.assertEqual(self.guest.thaws, 1)
        # The freeze record is gone too: a late ThawFilesystems goes to the agent, which refuses.
        t = yield self.call(
            self.rpcs.thaw_filesystems,
            node_pb2.ThawFilesystemsRequest(vm_id=self.f.vm, quiesce_token=q.quiesce_token),
        )
        self.assertFalse(t.success)

    @defer.inlineCallbacks
    def test_sync_time_sends_host_time(self):
        r = yield self.call(self.rpcs.sync_time, node_pb2.SyncTimeRequest(vm_id=self.f.vm, force=True))
        self.assertEqual((r.success, r.time_source), (True, "host"))
        sent = self.f.peer.requests_of("sync_time")[-1]
        self.assertTrue(sent.force)
        self.assertEqual((sent.set_time.seconds, sent.set_time.nanos), (1_800_000_000, 500_000_000))
        self.assertNotEqual(r.offset_seconds, 0.0)

    @defer.inlineCallbacks
    def test_agent_timeout_is_timeout(self):
        self.patch(agent_rpcs, "DEFAULT_TIMEOUT", 0.05)
        self.f.peer.silent = True
        yield self.assertFailure(
            self.call(self.rpcs.ping_agent, node_pb2.VMIdRequest(vm_id=self.f.vm)), Timeout
        )

    @defer.inlineCallbacks
    def test_error_event_becomes_success_false(self):
        self.guest.on_sync_time = None  # the peer then answers with an ErrorEvent("unsupported")
        r = yield self.call(self.rpcs.sync_time, node_pb2.SyncTimeRequest(vm_id=self.f.vm))
        self.assertFalse(r.success)
        self.assertIn("unsupported", r.error)
