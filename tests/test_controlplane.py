"""The control-plane link against the fake control plane, over real HTTP on loopback.

The link's timers run on a ``task.Clock`` so hours of outage pass in a moment; its HTTP calls
run on the real reactor. ``step`` fires the next timer and waits until the calls it started
have finished.
"""

from __future__ import annotations

import gc
import itertools
import json
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from quantix.controlplane import state
from quantix.controlplane.connect import ConnectClient, ConnectError
from quantix.controlplane.facts import (
    CpuFacts,
    HeartbeatSample,
    HostFacts,
    MemoryFacts,
    NetworkDeviceFacts,
    PoolReport,
    StorageDeviceFacts,
    VMFacts,
)
from quantix.controlplane.link import FAILURES_BEFORE_REREGISTER, ControlPlaneLink, Link
from quantix.controlplane.link import Input as LinkInput
from quantix.proto import compute_pb2, storage_pb2
from quantix.util.states import IllegalTransition
from tests.certs import server_tls
from tests.fakecp import FakeControlPlane, FakeCPServer, listen_silent

GiB = 1 << 30

FACTS = HostFacts(
    hostname="qtx-test-node1",
    management_ip="10.1.2.3",
    labels={"rack": "r7", "zone": "a"},
    cpu=CpuFacts(
        model="AMD EPYC 7302", sockets=2, cores_per_socket=8, threads_per_core=2, frequency_mhz=3000
    ),
    memory=MemoryFacts(total_bytes=64 * GiB, allocatable_bytes=60 * GiB),
    storage_devices=(StorageDeviceFacts(path="/dev/nvme0n1", size_bytes=512 * GiB, model="WD", kind="NVME"),),
    network_devices=(NetworkDeviceFacts(name="eno1", mac_address="52:54:00:12:34:56", speed_mbps=10000),),
)
VMS = [
    VMFacts(
        id="6f1c0e4e-0000-4000-8000-000000000001", name="web", state="running", cpu_cores=2, memory_mib=2048
    )
]


class LinkTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.cp = FakeControlPlane(now=self.clock.seconds)
        self.server = FakeCPServer(reactor, self.cp)
        self.server.start()
        self.addCleanup(lambda: self.server.stop())
        self.state_dir = self.mktemp()
        self.sample_times: list[float] = []
        self.ensured: list[storage_pb2.StoragePool] = []
        self.released: list[str] = []
        self.ensure_failures = 0

    # -- helpers -----------------------------------------------------------------------------

    def sample(self) -> HeartbeatSample:
        self.sample_times.append(self.clock.seconds())
        return HeartbeatSample(
            cpu_usage_percent=12.5,
            memory_used_mib=2048,
            memory_total_mib=65536,
            running_vm_count=1,
            load=(0.5, 0.25, 0.125),
        )

    def ensure_pool(self, pool: storage_pb2.StoragePool) -> defer.Deferred:
        if self.ensure_failures:
            self.ensure_failures -= 1
            return defer.fail(RuntimeError("mount failed"))
        self.ensured.append(pool)
        return defer.succeed(None)

    def release_pool(self, pool_id: str) -> defer.Deferred:
        self.released.append(pool_id)
        return defer.succeed(None)

    def make_link(self, client: Any = None, start: bool = True, **kwargs: Any) -> ControlPlaneLink:
        options: dict[str, Any] = {
            "vms": lambda: defer.succeed(list(VMS)),
            "heartbeat_sample": self.sample,
            "pool_reports": lambda: [PoolReport(pool_id="p-local", health="HEALTHY", total_bytes=10 * GiB)],
            "ensure_pool": self.ensure_pool,
            "release_pool": self.release_pool,
            "rand": lambda: 0.5,
        }
        options.update(kwargs)
        link = ControlPlaneLink(
            self.clock,
            client or ConnectClient(reactor, self.server.url),
            lambda: FACTS,
            self.state_dir,
            **options,
        )
        link.startService()
        self.addCleanup(link.stopService)
        if start:
            link.start_registration()
        return link

    @defer.inlineCallbacks
    def step(self, link: ControlPlaneLink) -> Any:
        calls = self.clock.getDelayedCalls()
        self.assertEqual(len(calls), 1, "the link keeps exactly one timer")
        self.clock.advance(max(calls[0].getTime() - self.clock.seconds(), 0))
        yield link.idle()

    @defer.inlineCallbacks
    def run_until(self, link: ControlPlaneLink, predicate: Any, limit: int = 100) -> Any:
        for _ in range(limit):
            if predicate():
                return
            yield self.step(link)
        self.fail("condition not reached")

    def heartbeats(self) -> int:
        return len(self.cp.calls("UpdateHeartbeat"))

    def stored(self) -> dict[str, Any]:
        return json.loads((Path(self.state_dir) / state.FILENAME).read_text())

    def capture_log(self) -> list[str]:
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if str(event.get("log_namespace", "")).startswith("quantix.controlplane"):
                lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    # -- registration ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_waits_until_grpc_is_listening(self) -> Any:
        link = self.make_link(start=False)
        self.clock.advance(3600)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.cp.requests, [])
        link.start_registration()
        link.start_registration()
        yield self.run_until(link, lambda: link.registered)
        self.assertEqual(len(self.cp.calls("RegisterNode")), 1)

    @defer.inlineCallbacks
    def test_registration_payload(self) -> Any:
        link = self.make_link()
        yield self.run_until(link, lambda: self.heartbeats() >= 1)
        self.assertEqual(
            self.cp.methods(), ["RegisterNode", "SyncNodeVMs", "SyncFullState", "UpdateHeartbeat"]
        )
        reg = self.cp.calls("RegisterNode")[0]
        self.assertEqual(reg.headers["content-type"], "application/json")
        body = reg.body
        self.assertEqual(body["hostname"], "qtx-test-node1")
        self.assertEqual(body["managementIp"], "10.1.2.3")
        self.assertEqual(body["labels"], {"rack": "r7", "zone": "a"})
        self.assertEqual(body["role"], {"compute": True})
        self.assertEqual(
            body["cpuInfo"],
            {
                "model": "AMD EPYC 7302",
                "sockets": 2,
                "coresPerSocket": 8,
                "threadsPerCore": 2,
                "totalThreads": 32,
                "frequencyMhz": "3000",
            },
        )
        self.assertEqual(body["memoryInfo"], {"totalBytes": str(64 * GiB), "allocatableBytes": str(60 * GiB)})
        self.assertEqual(
            body["storageDevices"],
            [
                {
                    "path": "/dev/nvme0n1",
                    "model": "WD",
                    "sizeBytes": str(512 * GiB),
                    "type": "NVME",
                    "available": True,
                }
            ],
        )
        self.assertEqual(
            body["networkDevices"],
            [{"name": "eno1", "macAddress": "52:54:00:12:34:56", "speedMbps": "10000", "mtu": 1500}],
        )
        self.assertTrue(link.registered)
        self.assertEqual(link.node_id, self.cp.nodes["qtx-test-node1"])

        sync = self.cp.calls("SyncNodeVMs")[0].body
        self.assertEqual(sync["nodeId"], link.node_id)
        self.assertEqual(
            sync["vms"],
            [{"id": VMS[0].id, "name": "web", "state": "running", "cpuCores": 2, "memoryMib": "2048"}],
        )

    @defer.inlineCallbacks
    def test_node_id_persisted_and_reused_after_restart(self) -> Any:
        link = self.make_link()
        yield self.run_until(link, lambda: link.registered)
        first = link.node_id
        self.assertEqual(self.stored()["node_id"], first)
        self.assertEqual(self.stored()["control_plane"], self.server.url)
        yield link.stopService()

        # Restart while the control plane is down: the id is known before any answer.
        yield self.server.stop()
        again = self.make_link()
        self.assertEqual(again.node_id, first)
        self.assertFalse(again.registered)
        yield self.step(again)
        self.assertFalse(again.registered)
        self.server.start()
        yield self.run_until(again, lambda: again.registered)
        self.assertEqual(again.node_id, first)
        yield self.run_until(again, lambda: self.heartbeats() >= 2)
        self.assertEqual(self.cp.calls("UpdateHeartbeat")[-1].body["nodeId"], first)

        # An id from another control plane is not reused.
        self.assertEqual(state.load(self.state_dir, "http://elsewhere:8080").node_id, "")

    # -- heartbeats --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_heartbeats(self) -> Any:
        link = self.make_link(heartbeat_interval=30)
        yield self.run_until(link, lambda: self.heartbeats() >= 4)
        gaps = {b - a for a, b in itertools.pairwise(self.sample_times)}
        self.assertEqual(gaps, {30})
        self.assertEqual(len(self.cp.calls("RegisterNode")), 1)
        body = self.cp.calls("UpdateHeartbeat")[-1].body
        self.assertEqual(body["nodeId"], link.node_id)
        self.assertEqual(body["cpuUsagePercent"], 12.5)
        self.assertEqual(body["memoryUsedMib"], "2048")
        self.assertEqual(body["memoryTotalMib"], "65536")
        self.assertEqual(body["runningVmCount"], 1)
        self.assertEqual((body["load1m"], body["load5m"], body["load15m"]), (0.5, 0.25, 0.125))
        self.assertEqual(
            body["storagePools"],
            [{"poolId": "p-local", "health": "HEALTH_HEALTHY", "totalBytes": str(10 * GiB)}],
        )
        self.assertEqual(link.last_heartbeat_ok, self.sample_times[-1])
        self.assertEqual(link.consecutive_failures, 0)

    @defer.inlineCallbacks
    def test_reregisters_on_not_found(self) -> Any:
        link = self.make_link()
        yield self.run_until(link, lambda: self.heartbeats() >= 1)
        first = link.node_id
        self.cp.forget_nodes()  # the control plane restarted on an empty in-memory store
        yield self.run_until(link, lambda: len(self.cp.calls("RegisterNode")) == 2 and link.registered)
        self.assertNotEqual(link.node_id, first)
        self.assertEqual(self.stored()["node_id"], link.node_id)
        yield self.run_until(link, lambda: link.consecutive_failures == 0 and self.heartbeats() >= 3)
        self.assertEqual(self.cp.calls("UpdateHeartbeat")[-1].body["nodeId"], link.node_id)
        self.assertEqual(self.cp.methods()[-4:-1], ["RegisterNode", "SyncNodeVMs", "SyncFullState"])

    @defer.inlineCallbacks
    def test_reregisters_after_three_failures(self) -> Any:
        link = self.make_link()
        yield self.run_until(link, lambda: self.heartbeats() >= 1)
        self.cp.fail("UpdateHeartbeat", "internal", times=2)
        yield self.run_until(link, lambda: self.heartbeats() >= 4)
        self.assertEqual(len(self.cp.calls("RegisterNode")), 1, "two failures are not enough")
        self.assertEqual(link.consecutive_failures, 0)

        self.cp.fail("UpdateHeartbeat", "internal", times=3)
        yield self.run_until(link, lambda: len(self.cp.calls("RegisterNode")) == 2)
        methods = self.cp.methods()
        second = len(methods) - 1 - methods[::-1].index("RegisterNode")
        self.assertEqual(methods[second - 3 : second], ["UpdateHeartbeat"] * 3)
        yield self.run_until(link, lambda: link.registered and link.consecutive_failures == 0)
        self.assertEqual(link.node_id, self.cp.nodes["qtx-test-node1"])

    # -- outages -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_long_outage_costs_a_request_a_minute_and_recovers(self) -> Any:
        link = self.make_link()
        yield self.run_until(link, lambda: self.heartbeats() >= 1)
        self.cp.down = True

        def hours(n: float) -> Any:
            end = self.clock.seconds() + n * 3600
            return self.run_until(link, lambda: self.clock.seconds() >= end, limit=100000)

        yield hours(1)
        self.assertFalse(link.registered)
        seen = len(self.cp.requests)
        yield hours(0.1)
        self.assertEqual(set(self.cp.methods()[seen:]), {"RegisterNode"})

        self.cp.record = False
        seen = self.cp.count
        gc.collect()
        objects = len(gc.get_objects())
        yield hours(6)
        gc.collect()
        # Capped backoff: 54-60 s between attempts, so 360-400 requests in six hours,
        # and nothing kept per request (the reactor's cancelled timers come and go).
        attempts = self.cp.count - seen
        self.assertTrue(360 <= attempts <= 401, attempts)
        growth = len(gc.get_objects()) - objects
        self.assertLess(growth, attempts // 2)
        self.cp.record = True
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertIn("registration", link.last_error)

        self.cp.down = False
        yield self.run_until(link, lambda: link.registered and link.consecutive_failures == 0)
        yield self.run_until(link, lambda: self.heartbeats() >= 3)
        self.assertIsNone(link.last_error)

    @defer.inlineCallbacks
    def test_connection_refused_and_recovery(self) -> Any:
        link = self.make_link()
        yield self.run_until(link, lambda: self.heartbeats() >= 1)
        first = link.node_id
        yield self.server.stop()
        yield self.run_until(link, lambda: not link.registered and link.consecutive_failures >= 4)
        self.assertIn("refused", link.last_error)
        beats = self.heartbeats()
        self.server.start()
        yield self.run_until(link, lambda: self.heartbeats() > beats)
        self.assertTrue(link.registered)
        self.assertEqual(link.consecutive_failures, 0)
        self.assertEqual(link.node_id, first)
        self.assertEqual(link.last_heartbeat_ok, self.clock.seconds())

    @defer.inlineCallbacks
    def test_maintenance_503_retry_after_is_honoured(self) -> Any:
        link = self.make_link()
        yield self.run_until(link, lambda: self.heartbeats() >= 1)
        seen = len(self.cp.requests)
        self.cp.maintenance = 120
        yield self.run_until(link, lambda: len(self.cp.requests) >= seen + 5)
        rejected = [r.at for r in self.cp.requests[seen:]]
        self.assertTrue(all(b - a >= 120 for a, b in itertools.pairwise(rejected)), rejected)
        self.assertFalse(link.registered)  # three failures: it is registering again
        self.cp.maintenance = None
        yield self.run_until(link, lambda: link.registered and link.last_heartbeat_ok is not None)
        yield self.run_until(link, lambda: link.consecutive_failures == 0 and self.heartbeats() >= 3)

    # -- optional calls ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_unimplemented_is_tolerated_and_logged_once(self) -> Any:
        self.cp.unimplemented_status = 404  # older connect-go
        lines = self.capture_log()
        link = self.make_link()
        yield self.run_until(link, lambda: self.heartbeats() >= 1)
        yield link.notify_vm_change(VMS[0], "updated", previous_state="paused")
        yield link.notify_vm_change(VMS[0], "deleted")  # skipped: known to be unimplemented
        self.assertEqual(len(self.cp.calls("NotifyVMChange")), 1)
        note = self.cp.calls("NotifyVMChange")[0].body
        self.assertEqual(note["eventType"], "VM_CHANGE_UPDATED")
        self.assertEqual(note["previousState"], "VM_POWER_STATE_PAUSED")
        self.assertEqual(note["vm"]["state"], "VM_POWER_STATE_RUNNING")

        self.cp.forget_nodes()
        yield self.run_until(link, lambda: len(self.cp.calls("RegisterNode")) == 2 and link.registered)
        yield self.run_until(link, lambda: link.consecutive_failures == 0 and self.heartbeats() >= 3)
        self.assertEqual(len(self.cp.calls("SyncFullState")), 2)  # tried again after re-registering
        self.assertTrue(link.registered)
        unimplemented = [line for line in lines if "does not implement" in line]
        self.assertEqual(len(unimplemented), 2, unimplemented)
        self.assertTrue(any("SyncFullState" in line for line in unimplemented))
        self.assertTrue(any("NotifyVMChange" in line for line in unimplemented))

    # -- pools -------------------------------------------------------------------------------

    def nfs_pool(self, pool_id: str) -> storage_pb2.StoragePool:
        pool = storage_pb2.StoragePool(id=pool_id, name="nfs-" + pool_id)
        pool.spec.backend.type = storage_pb2.StorageBackend.NFS
        pool.spec.backend.nfs.server = "10.0.0.9"
        pool.spec.backend.nfs.export_path = "/export/" + pool_id
        pool.spec.assigned_node_ids.append("whoever")
        pool.status.capacity.total_bytes = 1 << 40
        return pool

    @defer.inlineCallbacks
    def test_pool_assignment_and_release(self) -> Any:
        self.cp.pools["p1"] = self.nfs_pool("p1")
        self.cp.assigned_pool_ids = ["p1", "p-gone"]  # p-gone: GetPool answers not_found
        self.ensure_failures = 1
        link = self.make_link()
        yield self.run_until(link, lambda: self.heartbeats() >= 1)
        self.assertEqual(self.ensured, [])  # the first mount failed
        yield self.run_until(link, lambda: self.ensured)
        (pool,) = self.ensured
        self.assertEqual(pool.id, "p1")
        self.assertEqual(pool.spec.backend.type, storage_pb2.StorageBackend.NFS)
        self.assertEqual(pool.spec.backend.nfs.export_path, "/export/p1")
        self.assertEqual(pool.status.capacity.total_bytes, 1 << 40)
        self.assertIn({"id": "p1"}, [c.body for c in self.cp.calls("GetPool")])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(link.assigned_pools, {"p1"})
        self.assertEqual(self.stored()["pools"], ["p1"])

        fetches = len(self.cp.calls("GetPool"))
        yield self.run_until(link, lambda: self.heartbeats() >= 5)
        self.assertEqual(len(self.ensured), 1)
        self.assertTrue(all(c.body == {"id": "p-gone"} for c in self.cp.calls("GetPool")[fetches:]))

        self.cp.assigned_pool_ids = []
        yield self.run_until(link, lambda: self.released)
        self.assertEqual(self.released, ["p1"])
        self.assertEqual(link.assigned_pools, frozenset())
        self.assertEqual(self.stored()["pools"], [])

    @defer.inlineCallbacks
    def test_pool_withdrawn_while_down_is_released_after_restart(self) -> Any:
        self.cp.pools["p1"] = self.nfs_pool("p1")
        self.cp.assigned_pool_ids = ["p1"]
        link = self.make_link()
        yield self.run_until(link, lambda: self.ensured)
        yield link.stopService()
        self.cp.assigned_pool_ids = []
        again = self.make_link()
        yield self.run_until(again, lambda: self.released)
        self.assertEqual(self.released, ["p1"])
        self.assertEqual(self.stored()["pools"], [])

    # -- transport options -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_bearer_token_sent(self) -> Any:
        self.cp.required_token = "s3cret"
        link = self.make_link(client=ConnectClient(reactor, self.server.url, token="s3cret"))
        yield self.run_until(link, lambda: self.heartbeats() >= 2)
        self.assertEqual({r.headers.get("authorization") for r in self.cp.requests}, {"Bearer s3cret"})

    @defer.inlineCallbacks
    def test_https_with_self_signed_ca(self) -> Any:
        ca_file, options = server_tls(Path(self.mktemp()))
        tls_server = FakeCPServer(reactor, self.cp, options)
        tls_server.start()
        self.addCleanup(tls_server.stop)
        client = ConnectClient(reactor, tls_server.url, ca_file=ca_file)
        link = self.make_link(client=client)
        yield self.run_until(link, lambda: self.heartbeats() >= 2)
        self.assertTrue(link.registered)
        self.assertEqual(self.stored()["control_plane"], tls_server.url)

    # -- robustness --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_broken_facts_source_is_retried(self) -> Any:
        calls = [0]

        def facts() -> HostFacts:
            calls[0] += 1
            if calls[0] == 1:
                raise OSError("cannot read /proc/cpuinfo")
            return FACTS

        link = ControlPlaneLink(
            self.clock, ConnectClient(reactor, self.server.url), facts, self.state_dir, rand=lambda: 0.0
        )
        link.startService()
        self.addCleanup(link.stopService)
        link.start_registration()
        yield self.run_until(link, lambda: link.registered)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(calls[0], 2)

    @defer.inlineCallbacks
    def test_stop_cancels_the_call_in_flight(self) -> Any:
        port, gone = listen_silent(self)
        client = ConnectClient(reactor, f"http://127.0.0.1:{port}")
        link = self.make_link(client=client)
        self.clock.advance(10)
        yield _until(lambda: gone)
        waiting = link.idle()
        self.assertFalse(waiting.called)
        yield link.stopService()
        self.assertTrue(waiting.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(link.registered)
        yield gone[0].addErrback(lambda _: None)


def _until(predicate: Any) -> defer.Deferred:
    """Poll the real reactor briefly until ``predicate()`` holds."""

    @defer.inlineCallbacks
    def poll() -> Any:
        while not predicate():
            yield task.deferLater(reactor, 0.01, lambda: None)

    return poll()


class Messages(unittest.TestCase):
    def test_pool_health_names(self) -> None:
        from quantix.controlplane.messages import pool_status

        self.assertEqual(pool_status(PoolReport("p", health="healthy")).health, 1)
        self.assertEqual(pool_status(PoolReport("p", health="HEALTH_UNMOUNTED")).health, 4)
        self.assertEqual(pool_status(PoolReport("p", health="weird")).health, 0)

    def test_power_states(self) -> None:
        from quantix.controlplane.messages import power_state

        self.assertEqual(power_state("Running"), 1)
        self.assertEqual(power_state("shutoff"), 2)
        self.assertEqual(power_state("blocked"), 0)

    def test_unknown_device_type_is_hdd(self) -> None:
        from quantix.controlplane.messages import register_request

        facts = HostFacts(
            hostname="h",
            management_ip="1.2.3.4",
            storage_devices=(StorageDeviceFacts("/dev/x", kind="tape"),),
        )
        self.assertEqual(register_request(facts).storage_devices[0].type, 0)


class _RecordingClient:
    """Answers each call with a Deferred the test fires; no network."""

    base_url = "http://cp.invalid:8080"

    def __init__(self) -> None:
        self.calls: list[tuple[str, defer.Deferred]] = []

    def call(self, service: str, method: str, request: Any, response_cls: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.calls.append((method, d))
        return d

    def answer(self, method: str, value: Any) -> None:
        name, d = self.calls.pop(0)
        assert name == method, (name, method)
        d.callback(value)

    def refuse(self, method: str) -> None:
        name, d = self.calls.pop(0)
        assert name == method, (name, method)
        d.errback(ConnectError("unavailable", "down", 503))


class LinkStateTests(unittest.TestCase):
    """The main loop's named states on a fake clock with a recording client."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.client = _RecordingClient()
        self.link = ControlPlaneLink(
            self.clock,
            self.client,
            lambda: FACTS,
            self.mktemp(),
            rand=lambda: 0.0,
            heartbeat_interval=30.0,
        )

    def test_held_until_both_started_and_allowed_in_either_order(self) -> None:
        link = self.link
        self.assertIs(link.state, Link.IDLE)
        link.start_registration()
        self.assertIs(link.state, Link.ALLOWED)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        link.startService()
        self.assertIs(link.state, Link.REGISTER_PENDING)
        link.stopService()
        self.assertIs(link.state, Link.ALLOWED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

        other = ControlPlaneLink(self.clock, self.client, lambda: FACTS, self.mktemp(), rand=lambda: 0.0)
        other.startService()
        self.addCleanup(other.stopService)
        self.assertIs(other.state, Link.HELD)
        other.start_registration()
        other.start_registration()  # idempotent
        self.assertIs(other.state, Link.REGISTER_PENDING)

    def test_register_heartbeat_fail_and_reregister(self) -> None:
        link = self.link
        link.startService()
        self.addCleanup(link.stopService)
        link.start_registration()
        self.clock.advance(0)
        self.assertIs(link.state, Link.REGISTERING)
        self.client.refuse("RegisterNode")
        self.assertIs(link.state, Link.REGISTER_PENDING)
        self.clock.advance(1.0)  # the backoff's first delay
        self.client.answer("RegisterNode", compute_pb2.Node(id="n-1"))
        self.client.answer("SyncNodeVMs", compute_pb2.SyncNodeVMsResponse())
        self.client.answer("SyncFullState", compute_pb2.SyncFullStateResponse())
        self.assertIs(link.state, Link.HEARTBEAT_PENDING)
        self.assertTrue(link.registered)
        for _ in range(FAILURES_BEFORE_REREGISTER - 1):
            self.clock.advance(60)
            self.assertIs(link.state, Link.HEARTBEATING)
            self.client.refuse("UpdateHeartbeat")
            self.assertIs(link.state, Link.HEARTBEAT_PENDING)
        self.clock.advance(60)
        self.client.refuse("UpdateHeartbeat")
        self.assertIs(link.state, Link.REGISTER_PENDING)
        self.assertFalse(link.registered)

    def test_stop_while_calling_cancels_and_a_late_answer_changes_nothing(self) -> None:
        link = self.link
        link.startService()
        link.start_registration()
        self.clock.advance(0)
        [(_, pending)] = self.client.calls
        link.stopService()
        self.assertIs(link.state, Link.ALLOWED)
        self.assertTrue(pending.called)  # cancelled
        self.assertEqual(self.clock.getDelayedCalls(), [])
        with self.assertRaises(IllegalTransition):
            link.states.fire(LinkInput.DUE)
