"""Operations box: systemd notify and watchdog, log output, access log, metrics, quantix-nodectl.

Everything runs against real parts: a datagram socket standing in for systemd/journald, a real
in-process daemon on the test driver, real grpc and HTTP clients.
"""

from __future__ import annotations

import gc
import io
import json
import os
import socket
import threading
import time
import urllib.request
from typing import NoReturn

import grpc
from google.protobuf import empty_pb2
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task, threads
from twisted.logger import Logger, globalLogPublisher
from twisted.trial import unittest

from quantix import __version__
from quantix.config import ListenError, LoggingConfig
from quantix.hypervisor.hostinfo import HostBox
from quantix.ops import heap, logs, nodectl
from quantix.ops.metrics import MetricsService, NodeCollector
from quantix.ops.notify import Notifier, notify_address, watchdog_interval
from quantix.proto import node_pb2
from tests.support import Daemon, DatagramSink, wait_for

RUNNING_VM = "11111111-2222-3333-4444-555555555555"


def set_env(testcase: unittest.TestCase, **values: str) -> None:
    for key, value in values.items():
        old = os.environ.get(key)
        os.environ[key] = value
        testcase.addCleanup(_restore_env, key, old)


def _restore_env(key: str, old: str | None) -> None:
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old


# -- systemd notify ---------------------------------------------------------------------------


class NotifyProtocolTests(unittest.TestCase):
    def test_socket_address(self):
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}), b"/run/systemd/notify")
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "@abstract"}), b"\0abstract")
        self.assertIsNone(notify_address({}))
        self.assertIsNone(notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}))

    def test_watchdog_interval_is_half_and_only_for_our_pid(self):
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42), 15.0)
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42), 15.0)
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42))
        self.assertIsNone(watchdog_interval({"WATCHDOG_USEC": "0"}, 42))
        self.assertIsNone(watchdog_interval({}, 42))

    def test_without_notify_socket_everything_is_a_noop(self):
        notifier = Notifier(reactor, {"WATCHDOG_USEC": "1000"})
        self.assertFalse(notifier.enabled)
        self.assertFalse(notifier.send("READY=1"))
        notifier.ready()
        notifier.stopping()
        notifier.close()


class WatchdogOnAClockTests(unittest.TestCase):
    def test_pings_every_interval_and_none_after_close(self) -> None:
        sink = DatagramSink(self)
        clock = task.Clock()
        notifier = Notifier(clock, {"NOTIFY_SOCKET": sink.path, "WATCHDOG_USEC": "2000000"})
        notifier.ready()
        self.assertEqual(sink.count("WATCHDOG=1"), 1)  # at once, then every interval (1 s)
        clock.advance(1.0)
        clock.advance(1.0)
        self.assertEqual(sink.count("WATCHDOG=1"), 3)
        notifier.close()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(60.0)
        self.assertEqual(sink.count("WATCHDOG=1"), 3)


class HeapTests(unittest.TestCase):
    """Under twistd the node freezes its start-up heap once ready (see quantix.ops.heap)."""

    def setUp(self):
        gc.unfreeze()
        self.addCleanup(gc.unfreeze)  # this process runs many nodes: never leave objects frozen

    def test_freeze_moves_startup_objects_out_of_collection(self):
        survivor = [object()]
        frozen = heap.freeze_startup_heap()
        self.assertGreater(frozen, 1000)
        # at least what it reported (the later read is not exact in a threaded process)
        self.assertGreaterEqual(gc.get_freeze_count(), frozen)
        # frozen objects are no longer scanned
        self.assertFalse(any(o is survivor for o in gc.get_objects()))

    async def test_ready_freezes_only_when_the_process_is_the_daemons(self):
        daemon = await Daemon(self).start()
        self.assertEqual(gc.get_freeze_count(), 0)  # a node in a shared process leaves gc alone
        daemon.node.ops.freeze_heap_when_ready = True  # what configure_twistd sets under twistd
        daemon.node.ops.ready()
        self.assertGreater(gc.get_freeze_count(), 0)


class NotifyDaemonTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_ready_after_grpc_bound_watchdog_pings_stopping_at_stop(self):
        sink = DatagramSink(self)
        set_env(self, NOTIFY_SOCKET=sink.path, WATCHDOG_USEC="100000")
        daemon = Daemon(self)
        self.assertEqual(sink.messages(), [])
        yield daemon.start(wait_connected=False)
        ready = [m for m in sink.messages() if "READY=1" in m.splitlines()]
        self.assertEqual(len(ready), 1)
        self.assertIn(f"STATUS=serving gRPC on port {daemon.node.grpc.port}", ready[0].splitlines())
        # The port named in READY accepts connections right away: it was bound before READY.
        socket.create_connection(("127.0.0.1", daemon.node.grpc.port), timeout=5).close()
        yield wait_for(lambda: sink.count("WATCHDOG=1") >= 3)
        self.assertEqual(sink.count("STOPPING=1"), 0)
        yield daemon.stop()
        self.assertEqual(sink.count("STOPPING=1"), 1)
        # After the stop the watchdog is quiet (its timer: WatchdogOnAClockTests).
        self.assertIsNone(daemon.node.ops.notifier._watchdog)

    @defer.inlineCallbacks
    def test_blocked_reactor_sends_no_watchdog_ping(self):
        sink = DatagramSink(self)
        notifier = Notifier(reactor, {"NOTIFY_SOCKET": sink.path, "WATCHDOG_USEC": "20000"})
        self.addCleanup(notifier.close)
        notifier.ready()
        yield wait_for(lambda: sink.count("WATCHDOG=1") >= 2)

        def stuck() -> list[bytes]:
            # On the reactor thread: everything sent so far is already queued on the socket
            # (a Unix datagram is delivered by sendto), so drain it, block for 25 intervals,
            # and look again before the reactor can turn.
            sink.drain()
            time.sleep(0.5)
            return sink.drain()

        during = yield task.deferLater(reactor, 0, stuck)
        self.assertEqual(during, [])
        # Once the reactor turns again, so does the watchdog.
        after = sink.count("WATCHDOG=1")
        yield wait_for(lambda: sink.count("WATCHDOG=1") > after)


# -- logging ----------------------------------------------------------------------------------


def capture_json(testcase: unittest.TestCase, level: str = "debug") -> io.StringIO:
    """Our JSON observer on the global publisher, writing into a buffer."""
    buffer = io.StringIO()
    observer = logs.make_observer(LoggingConfig(level=level, format="json"), buffer)
    globalLogPublisher.addObserver(observer)
    testcase.addCleanup(globalLogPublisher.removeObserver, observer)
    return buffer


def json_lines(buffer: io.StringIO, namespace: str) -> list[dict]:
    records = [json.loads(line) for line in buffer.getvalue().splitlines()]
    return [r for r in records if r["namespace"] == namespace]


class AccessLogTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = yield Daemon(self, **{"logging.level": "debug"}).start()

    @defer.inlineCallbacks
    def test_one_json_line_per_rpc_with_fields(self):
        buffer = capture_json(self)
        yield self.daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        reply = yield self.daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        self.assertTrue(reply.healthy)
        lines = json_lines(buffer, "quantix.access")
        self.assertEqual(len(lines), 2)
        line = lines[0]
        self.assertEqual(line["level"], "debug")
        self.assertEqual(line["method"], "HealthCheck")
        self.assertEqual(line["code"], "OK")
        self.assertIsInstance(line["duration"], float)
        self.assertGreaterEqual(line["duration"], 0)
        self.assertRegex(line["peer"], r"^ipv4:127\.0\.0\.1:\d+$")
        self.assertNotIn("vm_id", line)
        self.assertIn("HealthCheck OK", line["message"])
        self.assertRegex(line["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")

    @defer.inlineCallbacks
    def test_vm_rpc_carries_vm_id_and_error_code(self):
        buffer = capture_json(self)
        try:
            yield self.daemon.call("GetVMStatus", node_pb2.VMIdRequest(vm_id="no-such-vm"))
        except grpc.RpcError as exc:
            code = exc.code().name
        else:
            code = "OK"
        lines = json_lines(buffer, "quantix.access")
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["method"], "GetVMStatus")
        self.assertEqual(lines[0]["vm_id"], "no-such-vm")
        self.assertEqual(lines[0]["code"], code)
        self.assertNotEqual(code, "OK")  # NOT_FOUND once the VM box lands, UNIMPLEMENTED before

    async def test_no_access_lines_are_built_below_debug(self):
        daemon = await Daemon(self, **{"logging.level": "info"}).start()
        buffer = capture_json(self)  # even an observer that would take debug lines sees none
        await daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        self.assertEqual(json_lines(buffer, "quantix.access"), [])

    @defer.inlineCallbacks
    def test_info_level_hides_access_lines(self):
        buffer = capture_json(self, level="info")
        yield self.daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        Logger(namespace="quantix.test").info("still here")
        self.assertEqual(json_lines(buffer, "quantix.access"), [])
        self.assertEqual(len(json_lines(buffer, "quantix.test")), 1)


class LogFormatTests(unittest.TestCase):
    def test_json_line_has_fields_and_traceback(self):
        event = {
            "log_format": "boom on {vm_id}",
            "log_level": logs.LogLevel.error,
            "log_namespace": "quantix.x",
            "log_time": 0.5,
            "vm_id": "abc",
            "code": grpc.StatusCode.NOT_FOUND,
            "log_failure": _failure(),
        }
        record = json.loads(logs.event_as_json(event))
        self.assertEqual(record["message"], "boom on abc")
        self.assertEqual(record["level"], "error")
        self.assertEqual(record["time"], "1970-01-01T00:00:00.500000Z")
        self.assertEqual(record["vm_id"], "abc")
        self.assertEqual(record["code"], "NOT_FOUND")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertNotIn("log_format", record)

    def test_agent_reconnect_chatter_is_quiet_unless_debug(self):
        import io

        from twisted.application.internet import ClientService

        namespace = ClientService._log.namespace
        for level, shown in (("info", False), ("debug", True)):
            out = io.StringIO()
            observer = logs.make_observer(LoggingConfig(level=level, format="json"), stream=out)
            Logger(namespace=namespace, observer=observer).info("Scheduling retry 1 to connect x")
            Logger(namespace=namespace, observer=observer).warn("a real problem")
            self.assertEqual("Scheduling retry" in out.getvalue(), shown, level)
            self.assertIn("a real problem", out.getvalue())

    def test_journald_native_protocol_over_a_real_socket(self):
        sink = DatagramSink(self, "journal")
        observer = logs.make_observer(
            LoggingConfig(level="debug", format="journald"), journal_socket=sink.path
        )
        Logger(namespace="quantix.x", observer=observer).warn(
            "vm {vm_id} said {text}", vm_id="abc", text="two\nlines", method="StartVM"
        )
        (datagram,) = sink.drain()
        fields = _parse_journal(datagram)
        self.assertEqual(fields["MESSAGE"], "vm abc said two\nlines")
        self.assertEqual(fields["PRIORITY"], "4")
        self.assertEqual(fields["SYSLOG_IDENTIFIER"], "quantix-node")
        self.assertEqual(fields["VM_ID"], "abc")
        self.assertEqual(fields["METHOD"], "StartVM")
        self.assertEqual(fields["TEXT"], "two\nlines")
        self.assertEqual(fields["TWISTED_NAMESPACE"], "quantix.x")

    def test_journald_gone_falls_back_to_text(self):
        sink = DatagramSink(self, "journal")
        fallback = io.StringIO()
        observer = logs.JournaldObserver(sink.path, fallback=fallback)
        sink.sock.close()
        os.unlink(sink.path)
        Logger(namespace="quantix.x", observer=observer).info("hello {who}", who="there")
        self.assertIn("hello there", fallback.getvalue())

    def test_journal_field_names(self):
        self.assertEqual(logs.journal_field_name("vm_id"), "VM_ID")
        self.assertEqual(logs.journal_field_name("message"), "QUANTIX_MESSAGE")
        self.assertEqual(logs.journal_field_name("_x-y"), "X_Y")
        self.assertEqual(logs.journal_field_name("9lives"), "QUANTIX_9LIVES")

    def test_twistd_destination(self):
        base = {"syslog": False, "logger": None, "logfile": None, "nodaemon": True}
        self.assertIsNone(logs.twistd_observer(LoggingConfig(), dict(base, syslog=True)))
        self.assertIsNone(logs.twistd_observer(LoggingConfig(), dict(base, logger="x.y")))
        self.assertIsNone(logs.twistd_observer(LoggingConfig(), None))
        self.assertIsNotNone(logs.twistd_observer(LoggingConfig(), base))
        path = os.path.abspath(self.mktemp())
        observer = logs.twistd_observer(LoggingConfig(format="json"), dict(base, logfile=path))
        Logger(namespace="quantix.x", observer=observer).info("to {where}", where="file")
        with open(path) as fh:
            self.assertEqual(json.loads(fh.read())["where"], "file")


def _failure():
    from twisted.python.failure import Failure

    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        return Failure()


def _parse_journal(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    while data:
        head, _sep, rest = data.partition(b"\n")
        if b"=" in head:
            name, _, value = head.partition(b"=")
            out[name.decode()] = value.decode()
            data = rest
        else:
            size = int.from_bytes(rest[:8], "little")
            out[head.decode()] = rest[8 : 8 + size].decode()
            data = rest[8 + size + 1 :]
    return out


# -- metrics ----------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Blocking GET /metrics → {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


class _Bus:
    """Stand-ins with every attribute name the collector reads (the real boxes have a subset)."""

    last_id = 41
    published = 12
    dropped_subscribers = 1
    subscriber_count = 2

    def queue_depths(self):
        return [3, 7]

    def lag_seconds(self):
        return 0.25


def _restarting(_self: object) -> NoReturn:
    raise RuntimeError("restarting")


class _Agents:
    def connected_count(self):
        return 5


class _ControlPlane:
    registered = True


class MetricsTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_rpc_counters_by_method_and_code_over_http(self):
        daemon = yield Daemon(self, **{"server.metrics_listen": "127.0.0.1:0"}).start()
        for _ in range(3):
            yield daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        yield daemon.call("GetNodeInfo", empty_pb2.Empty())
        try:
            yield daemon.call("ListVMs", empty_pb2.Empty())
            list_code = "OK"
        except grpc.RpcError as exc:
            list_code = exc.code().name
        samples = yield threads.deferToThread(scrape, daemon.node.ops.metrics.port)
        count = "quantix_rpc_requests_total"
        self.assertEqual(samples[(count, (("code", "OK"), ("method", "HealthCheck")))], 3)
        self.assertEqual(samples[(count, (("code", "OK"), ("method", "GetNodeInfo")))], 1)
        self.assertEqual(samples[(count, (("code", list_code), ("method", "ListVMs")))], 1)
        self.assertEqual(
            samples[("quantix_rpc_duration_seconds_count", (("code", "OK"), ("method", "HealthCheck")))], 3
        )
        self.assertEqual(samples[("quantix_libvirt_connected", ())], 1)
        self.assertEqual(samples[("quantix_libvirt_reconnects_total", ())], 0)
        info = [k for k in samples if k[0] == "quantix_node_info"]
        self.assertEqual(dict(info[0][1])["node_id"], daemon.node.node_id)
        self.assertIn(("process_open_fds", ()), samples)

    @defer.inlineCallbacks
    def test_live_state_is_read_at_scrape_time(self):
        daemon = yield Daemon(
            self, **{"server.metrics_listen": "127.0.0.1:0", "logging.level": "debug"}
        ).start()
        port = daemon.node.ops.metrics.port
        samples = yield threads.deferToThread(scrape, port)
        self.assertEqual(samples[("quantix_events_subscribers", ())], 0)
        self.assertEqual(samples[("quantix_agent_connections", ())], 0)
        self.assertEqual(samples[("quantix_events_last_id", ())], daemon.node.bus.last_id)
        # An open StreamEvents call is a subscriber at the next scrape.
        call = daemon.stub.StreamEvents(empty_pb2.Empty())
        self.addCleanup(call.cancel)
        yield wait_for(lambda: daemon.node.bus.subscriber_count == 1)
        samples = yield threads.deferToThread(scrape, port)
        self.assertEqual(samples[("quantix_events_subscribers", ())], 1)
        # A stream the client cancels is counted CANCELLED (streams never end OK).
        log = capture_json(self)
        call.cancel()
        yield wait_for(lambda: json_lines(log, "quantix.access"))
        samples = yield threads.deferToThread(scrape, port)
        self.assertEqual(samples[("quantix_events_subscribers", ())], 0)
        self.assertEqual(
            samples[("quantix_rpc_requests_total", (("code", "CANCELLED"), ("method", "StreamEvents")))], 1
        )
        self.assertNotIn(
            ("quantix_rpc_requests_created", (("code", "CANCELLED"), ("method", "StreamEvents"))), samples
        )
        # So does libvirt going away.
        yield daemon.node.hypervisor.stopService()
        samples = yield threads.deferToThread(scrape, port)
        self.assertEqual(samples[("quantix_libvirt_connected", ())], 0)

    @defer.inlineCallbacks
    def test_registration_state(self):
        from tests.fakecp import FakeControlPlane, FakeCPServer

        server = FakeCPServer(reactor, FakeControlPlane())
        server.start()
        self.addCleanup(server.stop)
        daemon = Daemon(
            self,
            **{
                "server.metrics_listen": "127.0.0.1:0",
                "control_plane_url": server.url,
                "auto_register": True,
                "control_plane.startup_jitter": 0,
            },
        )
        yield daemon.start()
        yield wait_for(lambda: daemon.node.cplink.registered)
        samples = yield threads.deferToThread(scrape, daemon.node.ops.metrics.port)
        self.assertEqual(samples[("quantix_controlplane_registered", ())], 1)

    def test_collector_reads_every_documented_attribute(self):
        host = HostBox()
        host.node_id = "n1"
        hypervisor = type("Hv", (), {"connected": True, "reconnects": 3})()
        collector = NodeCollector(host, hypervisor, _Bus(), _Agents(), _ControlPlane())
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect()
            for s in family.samples
        }
        self.assertEqual(samples[("quantix_libvirt_connected", ())], 1)
        self.assertEqual(samples[("quantix_libvirt_reconnects_total", ())], 3)
        self.assertEqual(samples[("quantix_events_subscribers", ())], 2)
        self.assertEqual(samples[("quantix_events_queued", ())], 10)
        self.assertEqual(samples[("quantix_events_queue_depth_max", ())], 7)
        self.assertEqual(samples[("quantix_events_lag_seconds", ())], 0.25)
        self.assertEqual(samples[("quantix_events_last_id", ())], 41)
        self.assertEqual(samples[("quantix_events_published_total", ())], 12)
        self.assertEqual(samples[("quantix_events_dropped_subscribers_total", ())], 1)
        self.assertEqual(samples[("quantix_agent_connections", ())], 5)
        self.assertEqual(samples[("quantix_controlplane_registered", ())], 1)
        self.assertEqual(samples[("quantix_node_info", (("node_id", "n1"), ("version", __version__)))], 1)

    def test_absent_or_failing_boxes_have_no_series(self):
        class Broken:
            published = dropped_subscribers = last_id = subscriber_count = property(_restarting)

            def queue_depths(self):
                _restarting(self)

            def lag_seconds(self):
                _restarting(self)

        names = {family.name for family in NodeCollector(events=Broken()).collect()}
        self.assertEqual(names, {"quantix_node_info"})

    def test_busy_port_is_one_line(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        service = MetricsService(reactor, address)
        with self.assertRaises(ListenError) as caught:
            service.startService()
        self.assertEqual(
            str(caught.exception),
            f"metrics listener: cannot listen on {address}: address already in use"
            " (choose another with --metrics-listen HOST:PORT or server.metrics_listen; 'off' disables it)",
        )

    def test_disabled_binds_nothing(self):
        for listen in (None, "", "off", "OFF"):
            service = MetricsService(reactor, listen)
            service.startService()
            self.assertIsNone(service.port)
            service.stopService()


# -- quantix-nodectl --------------------------------------------------------------------------


def nodectl_run(*argv: str) -> defer.Deferred:
    """``main(argv)`` in a thread (it makes blocking grpc calls); fires (code, stdout, stderr)."""

    def run():
        out, err = io.StringIO(), io.StringIO()
        code = nodectl.main(list(argv), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    return threads.deferToThread(run)


class NodectlTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = yield Daemon(self).start()
        self.address = self.daemon.address

    def ctl(self, *argv: str) -> defer.Deferred:
        return nodectl_run("--address", self.address, "--timeout", "20", *argv)

    @defer.inlineCallbacks
    def test_health(self):
        code, out, err = yield self.ctl("health")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"(?m)^healthy:\s+yes$")
        self.assertRegex(out, r"(?m)^hypervisor:\s+TEST \d+\.\d+\.\d+$")
        self.assertRegex(out, r"(?m)^uptime:\s+\d+s$")

    @defer.inlineCallbacks
    def test_health_json(self):
        code, out, _ = yield self.ctl("--json", "health")
        self.assertEqual(code, 0)
        self.assertEqual(json.loads(out)["hypervisor"], "TEST")

    @defer.inlineCallbacks
    def test_health_when_libvirt_is_down_exits_4(self):
        yield self.daemon.node.hypervisor.stopService()
        code, out, _ = yield self.ctl("health")
        self.assertEqual(code, nodectl.EXIT_UNHEALTHY)
        self.assertRegex(out, r"(?m)^healthy:\s+no$")

    @defer.inlineCallbacks
    def test_info(self):
        code, out, err = yield self.ctl("info")
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, rf"(?m)^node id:\s+{self.daemon.node.node_id}$")
        self.assertIn("2 sockets x 2 cores x 2 threads = 8", out)
        self.assertRegex(out, r"(?m)^daemon:\s+\d+\.\d+\.\d+$")
        self.assertRegex(out, r"(?m)^proto:\s+[0-9a-f]{12}$")
        self.assertRegex(out, r"(?m)^DEVICE\s+MOUNT\s+FS\s+SIZE\s+USED\s+AVAIL$")
        self.assertRegex(out, r"(?m)^NIC\s+MAC\s+UP\s+SPEED\s+ADDRESSES$")

    @defer.inlineCallbacks
    def test_call_any_rpc_by_reflection(self):
        code, out, err = yield self.ctl("call", "HealthCheck")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(json.loads(out)["healthy"])
        code, out, _ = yield self.ctl(
            "--json", "call", "NodeDaemonService/GetVMStatus", f'{{"vm_id": "{RUNNING_VM}"}}'
        )
        self.assertEqual(code, 0)
        reply = json.loads(out)
        self.assertEqual((reply["name"], reply["state"]), ("vm-running", "POWER_STATE_RUNNING"))
        code, out, err = yield self.ctl(
            "call", "limiquantix.node.v1.NodeDaemonService/GetVMStatus", '{"vm_id": "nope"}'
        )
        self.assertEqual((code, out), (nodectl.EXIT_RPC_ERROR, ""))
        self.assertIn("NOT_FOUND: VM not found: nope", err)

    @defer.inlineCallbacks
    def test_call_a_stream_prints_one_line_per_message(self):
        code, out, err = yield self.ctl(
            "call", "StreamEvents", "--metadata", "x-quantix-resume-after=1", "--count", "1"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(out.splitlines()), 1)
        self.assertIn("id", json.loads(out))

    @defer.inlineCallbacks
    def test_call_usage_errors(self):
        for argv, text in (
            (("call", "NoSuchRpc"), "unknown RPC 'NoSuchRpc'"),
            (("call", "GetVMStatus", "{not json"), "VMIdRequest:"),
            (("call", "GetVMStatus", '{"no_such_field": 1}'), "no_such_field"),
        ):
            code, out, err = yield self.ctl(*argv)
            self.assertEqual((code, out), (nodectl.EXIT_USAGE, ""), argv)
            self.assertIn(text, err, argv)

    @defer.inlineCallbacks
    def test_list_names_every_rpc(self):
        code, out, err = yield self.ctl("list")
        self.assertEqual((code, err), (0, ""))
        self.assertIn(
            "limiquantix.node.v1.NodeDaemonService/GetVMStatus(VMIdRequest) returns VMStatusResponse", out
        )
        self.assertIn("StreamEvents(Empty) returns stream NodeEvent", out)
        from quantix.rpc.server import SERVICE

        self.assertEqual(out.count("NodeDaemonService/"), len(SERVICE.methods))

    @defer.inlineCallbacks
    def test_vms(self):
        code, out, err = yield self.ctl("vms")
        if code == nodectl.EXIT_RPC_ERROR:  # the VM box is not on this branch yet
            self.assertEqual(err.strip().split(":")[:2], ["quantix-nodectl", " UNIMPLEMENTED"])
            self.assertEqual(out, "")
            return
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"^VM ID\s+NAME\s+STATE")
        self.assertRegex(out, rf"(?m)^{RUNNING_VM}\s+vm-running\s+running\b")

    @defer.inlineCallbacks
    def test_vm(self):
        code, out, err = yield self.ctl("vm", RUNNING_VM)
        if code == nodectl.EXIT_RPC_ERROR:
            self.assertIn("UNIMPLEMENTED", err)
            return
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, rf"(?m)^vm id:\s+{RUNNING_VM}$")
        self.assertRegex(out, r"(?m)^state:\s+running$")

    @defer.inlineCallbacks
    def test_unknown_vm_is_an_rpc_error(self):
        code, out, err = yield self.ctl("vm", "00000000-0000-0000-0000-00000000dead")
        self.assertEqual(code, nodectl.EXIT_RPC_ERROR)
        self.assertRegex(err, r"^quantix-nodectl: (NOT_FOUND|UNIMPLEMENTED): ")
        self.assertEqual(out, "")

    @defer.inlineCallbacks
    def test_events_resume_from_an_id_older_than_the_buffer(self):
        # The daemon answers with a gap event first: the stream has something to show at once.
        code, out, err = yield self.ctl("--json", "events", "--resume-after", "1", "--count", "1")
        if code == nodectl.EXIT_RPC_ERROR:  # the event box is not on this branch
            self.assertIn("UNIMPLEMENTED", err)
            return
        self.assertEqual((code, err), (0, ""))
        event = json.loads(out)
        self.assertEqual(event["metadata"]["gap"], "true")
        self.assertEqual(event["metadata"]["resume_after"], "1")

    @defer.inlineCallbacks
    def test_metrics_sample(self):
        code, out, err = yield self.ctl("metrics")
        if code == nodectl.EXIT_RPC_ERROR:
            self.assertIn("UNIMPLEMENTED", err)
            return
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"(?m)^cpu:\s+\d+\.\d%$")
        self.assertRegex(out, r"(?m)^memory:\s+\S+ \S+ used of \S+ \S+$")

    @defer.inlineCallbacks
    def test_unreachable_exits_3(self):
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        closed.close()
        code, _out, err = yield nodectl_run("--address", f"127.0.0.1:{port}", "health")
        self.assertEqual(code, nodectl.EXIT_UNREACHABLE)
        self.assertIn("UNAVAILABLE", err)

    @defer.inlineCallbacks
    def test_usage_exits_2(self):
        code, out, err = yield nodectl_run("vm")
        self.assertEqual(code, nodectl.EXIT_USAGE)
        self.assertIn("required: vm_id", err)
        code, out, err = yield nodectl_run("frobnicate")
        self.assertEqual(code, nodectl.EXIT_USAGE)
        code, out, err = yield nodectl_run("--help")
        self.assertEqual(code, 0)
        self.assertIn("exit codes", out)


class NodectlFormatTests(unittest.TestCase):
    def test_table_aligns_and_right_aligns_numbers(self):
        text = nodectl.table(["NAME", "CPU%"], [("a", "1.5"), ("longer-name", "12.0")])
        self.assertEqual(text.splitlines(), ["NAME         CPU%", "a             1.5", "longer-name  12.0"])

    def test_human_units(self):
        self.assertEqual(nodectl.human_bytes(512), "512 B")
        self.assertEqual(nodectl.human_bytes(3 * 1024**3), "3.0 GiB")
        self.assertEqual(nodectl.human_duration(0), "0s")
        self.assertEqual(nodectl.human_duration(90061), "1d 1h")


# -- drain ------------------------------------------------------------------------------------


class DrainTests(unittest.TestCase):
    timeout = 60

    def test_refuses_new_calls_and_waits_for_the_one_in_flight(self):
        from quantix import errors
        from quantix.ops.drain import Drain

        drain = Drain()
        release = threading.Event()
        entered = threading.Event()

        def slow(request, context):
            entered.set()
            release.wait(10)
            return "done"

        table = drain.wrap({"Slow": slow}, streaming=set())
        results = []
        caller = threading.Thread(target=lambda: results.append(table["Slow"](None, None)))
        caller.start()
        self.assertTrue(entered.wait(10))
        drain.start()
        with self.assertRaises(errors.Unavailable):
            table["Slow"](None, None)
        self.assertEqual(drain.active, 1)
        release.set()
        remaining = drain.wait_idle(grace=30)
        caller.join(10)
        self.assertEqual(results, ["done"])
        self.assertEqual(drain.active, 0)
        self.assertGreater(remaining, 0)

    def test_stream_ends_unavailable_at_its_next_message(self):
        from quantix import errors
        from quantix.ops.drain import Drain

        drain = Drain()
        table = drain.wrap({"Stream": lambda request, context: iter(range(10))}, streaming={"Stream"})
        stream = table["Stream"](None, None)
        self.assertEqual(next(stream), 0)
        self.assertEqual(drain.active, 1)
        drain.start()
        with self.assertRaises(errors.Unavailable):
            next(stream)
        self.assertEqual(drain.active, 0)

    def test_grace_bounds_the_wait(self):
        from quantix.ops.drain import Drain

        drain = Drain()
        table = drain.wrap({"Stream": lambda request, context: iter(range(10))}, streaming={"Stream"})
        stream = table["Stream"](None, None)
        next(stream)  # a call that never finishes
        drain.start()
        self.assertEqual(drain.wait_idle(grace=0.2), 0.0)
        stream.close()

    @defer.inlineCallbacks
    def test_real_rpc_during_drain_is_unavailable(self):
        daemon = yield Daemon(self).start()
        daemon.node.ops.drain.start()
        try:
            yield daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        except grpc.RpcError as exc:
            self.assertEqual(exc.code(), grpc.StatusCode.UNAVAILABLE)
            self.assertEqual(exc.details(), "node daemon is shutting down")
        else:
            self.fail("a call during the drain must be refused")


class NodectlStreamTests(unittest.TestCase):
    """``events`` and ``metrics`` against a real grpc server whose stream handlers record what
    they were sent (the event and metrics boxes may not be on this branch)."""

    timeout = 60

    def setUp(self):
        from concurrent.futures import ThreadPoolExecutor

        from google.protobuf.timestamp_pb2 import Timestamp

        from quantix.rpc.server import build_generic_handler
        from tests.stderr import capture_stderr

        # grpc's core may log the GOAWAY of the stop(0) below at a client still connected.
        capture_stderr(self)
        self.metadata = []
        stamp = Timestamp(seconds=1_700_000_000)

        def stream_events(request, context):
            self.metadata.append(dict(context.invocation_metadata()))
            for n in (42, 43, 44):
                yield node_pb2.NodeEvent(
                    id=str(n),
                    timestamp=stamp,
                    type=node_pb2.EventType.Value("EVENT_TYPE_VM_STARTED"),
                    vm_id=RUNNING_VM,
                    message=f"started {n}",
                )

        def stream_metrics(request, context):
            self.metadata.append({"interval": request.interval_seconds})
            while True:
                yield node_pb2.NodeMetrics(
                    timestamp=stamp,
                    cpu_usage_percent=12.5,
                    memory_used_bytes=2 * 1024**3,
                    memory_total_bytes=8 * 1024**3,
                    vms=[node_pb2.VMMetrics(vm_id=RUNNING_VM, name="vm-running", cpu_usage_percent=3.0)],
                )

        server = grpc.server(ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers(
            [build_generic_handler({"StreamEvents": stream_events, "StreamMetrics": stream_metrics})]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(lambda: server.stop(0).wait())
        self.address = f"127.0.0.1:{port}"

    @defer.inlineCallbacks
    def test_events_follow_with_resume(self):
        code, out, err = yield nodectl_run(
            "--address", self.address, "events", "--resume-after", "41", "--count", "2"
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.metadata[0]["x-quantix-resume-after"], "41")
        lines = out.splitlines()
        self.assertRegex(lines[0], r"^TIME\s+ID\s+TYPE\s+VM ID\s+MESSAGE$")
        self.assertEqual(len(lines), 3)
        self.assertRegex(lines[1], rf"^2023-11-14 22:13:20\s+42\s+vm_started\s+{RUNNING_VM}\s+started 42$")

    @defer.inlineCallbacks
    def test_events_json(self):
        code, out, _ = yield nodectl_run("--address", self.address, "--json", "events", "--count", "3")
        self.assertEqual(code, 0)
        self.assertEqual([json.loads(line)["id"] for line in out.splitlines()], ["42", "43", "44"])
        self.assertNotIn("x-quantix-resume-after", self.metadata[0])

    @defer.inlineCallbacks
    def test_metrics_one_sample_and_follow(self):
        code, out, err = yield nodectl_run("--address", self.address, "metrics", "--interval", "3")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(self.metadata[0], {"interval": 3})
        self.assertRegex(out, r"(?m)^cpu:\s+12\.5%$")
        self.assertRegex(out, r"(?m)^memory:\s+2\.0 GiB used of 8\.0 GiB$")
        self.assertRegex(out, rf"(?m)^{RUNNING_VM}\s+vm-running\s+3\.0\b")
        code, out, _ = yield nodectl_run("--address", self.address, "metrics", "--follow", "--count", "2")
        self.assertEqual(code, 0)
        self.assertEqual(len(out.splitlines()), 2)
        self.assertIn("cpu  12.5%", out)


class UnitFileTests(unittest.TestCase):
    def test_systemd_unit(self):
        import configparser

        from quantix.config import ServerConfig

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str
        unit.read(os.path.join(root, "etc", "systemd", "quantix-node.service"))
        service = unit["Service"]
        self.assertEqual(service["Type"], "notify")
        self.assertEqual(service["NotifyAccess"], "main")
        self.assertEqual(service["Restart"], "always")
        self.assertIn("twistd -n --pidfile= quantix-node", service["ExecStart"])
        self.assertGreater(int(service["WatchdogSec"]), 0)
        # Stopping takes at most the grace period plus closing agents and libvirt.
        self.assertGreaterEqual(int(service["TimeoutStopSec"]), 2 * ServerConfig().grace_seconds + 10)
        for key in ("After", "Wants"):
            self.assertIn("libvirtd.service", unit["Unit"][key].split())
            self.assertIn("virtqemud.socket", unit["Unit"][key].split())
