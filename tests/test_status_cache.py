"""GetVMStatus's per-domain cache: filled by a call, dropped by the libvirt events that change
what the domain's XML says. A real daemon on the test driver, a real grpc client."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import grpc
from twisted.internet import threads
from twisted.trial import unittest

from quantix.proto import node_pb2
from tests.support import Daemon, rpc_error, wait_for

STOPPED_UUID = "66666666-7777-8888-9999-000000000000"


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
