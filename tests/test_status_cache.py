"""GetVMStatus's per-domain cache: filled by a call, dropped by the libvirt events that change
what the domain's XML says. A real daemon on the test driver, a real grpc client."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET

import grpc
import libvirt
from twisted.internet import threads
from twisted.trial import unittest

from quantix import errors
from quantix.hypervisor import vms
from quantix.hypervisor.statuscache import DomainCache
from quantix.proto import node_pb2
from tests.support import Daemon, rpc_error, wait_for

STOPPED_UUID = "66666666-7777-8888-9999-000000000000"
RUNNING_UUID = "11111111-2222-3333-4444-555555555555"


def _with_disk(xml: str) -> str:
    root = ET.fromstring(xml)
    devices = root.find("devices")
    if devices is None:
        devices = ET.SubElement(root, "devices")
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "source", file="/var/lib/limiquantix/vms/extra.qcow2")
    ET.SubElement(disk, "target", dev="vdb", bus="virtio")
    return ET.tostring(root, encoding="unicode")


class StatusCacheTests(unittest.TestCase):
    async def test_redefine_and_undefine_drop_the_cached_xml(self):
        daemon = await Daemon(self).start()
        cache = daemon.node.domain_cache
        request = node_pb2.VMIdRequest(vm_id=STOPPED_UUID)
        before = await daemon.call("GetVMStatus", request)
        conn = daemon.node.hypervisor.conn()
        self.assertIsNotNone(cache.cached(conn, STOPPED_UUID))
        again = await daemon.call("GetVMStatus", request)
        self.assertEqual(again.disks, before.disks)

        # Another libvirt client (here: the daemon's own connection, from a thread) redefines
        # the domain with one more disk: the DEFINED event drops the entry.
        dom = conn.lookupByUUIDString(STOPPED_UUID)
        await threads.deferToThread(conn.defineXML, _with_disk(dom.XMLDesc(0)))
        await wait_for(lambda: cache.cached(conn, STOPPED_UUID) is None)
        after = await daemon.call("GetVMStatus", request)
        self.assertEqual([d.path for d in after.disks][-1], "/var/lib/limiquantix/vms/extra.qcow2")
        self.assertEqual(len(after.disks), len(before.disks) + 1)

        await threads.deferToThread(dom.undefine)
        await wait_for(lambda: cache.cached(conn, STOPPED_UUID) is None)
        code, details = await rpc_error(daemon.call("GetVMStatus", request))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertIn(STOPPED_UUID, details)
        self.assertEqual(len(cache), 0)


TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"  # test:///default's running domain "test"


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class StatusReuseTests(unittest.TestCase):
    """``DomainCache.status``: one libvirt query serves every caller for ``max_age`` seconds and
    every caller that arrives while it runs; a change of state drops it."""

    def setUp(self):
        self.conn = libvirt.open("test:///default")
        self.addCleanup(self.conn.close)
        self.clock = _Clock()
        self.cache = DomainCache(max_age=1.0, clock=self.clock)
        self.entry = self.cache.entry(self.conn, TEST_UUID, vms.lookup)
        self.sampler = vms.CpuSampler()
        self.queries = 0

    def build(self, entry):
        self.queries += 1
        return vms.status_of(self.conn, entry, self.sampler, None)

    def test_every_spelling_of_the_uuid_finds_the_entry(self):
        for spelling in (TEST_UUID, TEST_UUID.upper(), "{" + TEST_UUID + "}", TEST_UUID.replace("-", "")):
            self.assertIs(self.cache.cached(self.conn, spelling), self.entry, spelling)
        self.assertIsNone(self.cache.cached(self.conn, "not-a-uuid"))

    def test_reused_until_max_age(self):
        first = self.cache.status(self.entry, self.build)
        self.clock.now += 0.9
        second = self.cache.status(self.entry, self.build)
        self.assertEqual((self.queries, second), (1, first))
        self.assertIsNot(second, first)  # each caller gets its own copy to add to
        self.clock.now += 0.2
        self.cache.status(self.entry, self.build)
        self.assertEqual(self.queries, 2)

    def test_change_of_state_or_xml_drops_it(self):
        self.cache.status(self.entry, self.build)
        self.cache.state_changed(TEST_UUID, "test", "paused")
        self.cache.status(self.entry, self.build)
        self.cache.forget(TEST_UUID)
        self.cache.status(self.entry, self.build)
        self.assertEqual(self.queries, 3)

    def test_zero_max_age_queries_every_time(self):
        cache = DomainCache(max_age=0.0, clock=self.clock)
        cache.status(self.entry, self.build)
        cache.status(self.entry, self.build)
        self.assertEqual(self.queries, 2)

    def test_callers_during_a_query_share_it(self):
        entered, release = threading.Event(), threading.Event()
        self.clock.now = 0.0

        def slow(entry):
            entered.set()
            release.wait(10)
            return self.build(entry)

        results: list[object] = []
        leader = threading.Thread(target=lambda: results.append(self.cache.status(self.entry, slow)))
        leader.start()
        self.assertTrue(entered.wait(10))
        self.clock.now = 50.0  # any finished status is stale now: only the query in flight is shared
        followers = [
            threading.Thread(target=lambda: results.append(self.cache.status(self.entry, slow)))
            for _ in range(3)
        ]
        for t in followers:
            t.start()
        release.set()
        for t in [leader, *followers]:
            t.join(10)
        self.assertEqual(self.queries, 1)
        self.assertEqual(len(results), 4)
        self.assertEqual(len({r.SerializeToString() for r in results}), 1)

    def test_a_failed_query_reaches_waiters_and_is_not_kept(self):
        entered, release = threading.Event(), threading.Event()
        self.clock.now = 0.0

        def failing(entry):
            self.queries += 1
            entered.set()
            release.wait(10)
            raise errors.VMNotFound(entry.uuid)

        outcomes: list[object] = []

        def call():
            try:
                self.cache.status(self.entry, failing)
            except errors.VMNotFound as exc:
                outcomes.append(exc)

        threads_ = [threading.Thread(target=call)]
        threads_[0].start()
        self.assertTrue(entered.wait(10))
        threads_ += [threading.Thread(target=call) for _ in range(2)]
        for t in threads_[1:]:
            t.start()
        release.set()
        for t in threads_:
            t.join(10)
        self.assertEqual((self.queries, len(outcomes)), (1, 3))
        self.cache.status(self.entry, self.build)  # nothing kept: the next call queries again
        self.assertEqual(self.queries, 2)


class StatusStateTests(unittest.TestCase):
    async def test_a_change_of_state_is_seen_at_once_whatever_the_max_age(self):
        daemon = await Daemon(self, **{"hypervisor.status_max_age": 60.0}).start()
        request = node_pb2.VMIdRequest(vm_id=RUNNING_UUID)
        before = await daemon.call("GetVMStatus", request)
        self.assertEqual(before.state, node_pb2.POWER_STATE_RUNNING)
        # Another client pauses the domain: libvirt's SUSPENDED event drops the kept status.
        dom = daemon.node.hypervisor.conn().lookupByUUIDString(RUNNING_UUID)
        await threads.deferToThread(dom.suspend)
        self.addCleanup(lambda: threads.deferToThread(dom.resume))
        await wait_for(lambda: daemon.node.watcher.known.get(RUNNING_UUID, (None, None))[1] == "paused")
        after = await daemon.call("GetVMStatus", request)
        self.assertEqual(after.state, node_pb2.POWER_STATE_PAUSED)

    async def test_a_caller_reads_its_own_change_before_the_event_arrives(self):
        daemon = await Daemon(self, **{"hypervisor.status_max_age": 60.0}).start()
        node = daemon.node
        # Only the RPCs themselves can drop the kept status now: libvirt's events are not heard.
        node.watcher.state_listeners.remove(node.domain_cache.state_changed)
        node.watcher.xml_listeners.remove(node.domain_cache.forget)
        vm = node_pb2.VMIdRequest(vm_id=RUNNING_UUID)

        async def state():
            return (await daemon.call("GetVMStatus", vm)).state

        self.assertEqual(await state(), node_pb2.POWER_STATE_RUNNING)
        await daemon.call("PauseVM", vm)
        self.assertEqual(await state(), node_pb2.POWER_STATE_PAUSED)
        await daemon.call("ResumeVM", vm)
        self.assertEqual(await state(), node_pb2.POWER_STATE_RUNNING)
        await daemon.call("ForceStopVM", vm)
        self.assertEqual(await state(), node_pb2.POWER_STATE_STOPPED)
        await daemon.call("StartVM", vm)
        self.assertEqual(await state(), node_pb2.POWER_STATE_RUNNING)
        await daemon.call("StopVM", node_pb2.StopVMRequest(vm_id=RUNNING_UUID, timeout_seconds=5))
        self.assertEqual(await state(), node_pb2.POWER_STATE_STOPPED)
