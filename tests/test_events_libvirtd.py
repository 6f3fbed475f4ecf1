"""Events and metrics against the real libvirtd (QEMU/TCG): remote-driver callbacks and stats."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import libvirt
from google.protobuf.empty_pb2 import Empty
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.events import mapping as m
from quantix.proto import node_pb2
from tests.libvirtd import NAME_PREFIX, real_libvirt_uri
from tests.support import Daemon, wait_for

URI = "qemu:///system"


def tiny_domain(name: str, vm_uuid: str) -> str:
    """A diskless TCG guest: SeaBIOS finds nothing to boot and idles, which is all we need."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = vm_uuid
    ET.SubElement(dom, "memory", unit="MiB").text = "64"
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


class LibvirtdEventTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.conn = libvirt.open(real_libvirt_uri(URI))
        self.addCleanup(self.conn.close)
        self.name = f"{NAME_PREFIX}-{uuid.uuid4().hex[:8]}"
        self.uuid = str(uuid.uuid4())
        self.addCleanup(self._destroy)

    def _destroy(self):
        try:
            self.conn.lookupByUUIDString(self.uuid).destroy()
        except libvirt.libvirtError:
            pass

    def mine(self, stream, n):
        """The next ``n`` typed events about our domain (other tests' domains share libvirtd)."""

        def run():
            got = []
            for event in stream:
                # UNKNOWN-typed ones (libvirt's "shutdown" before "stopped") carry no contract state.
                if event.vm_id == self.uuid and event.type != m.UNKNOWN:
                    got.append(event)
                    if len(got) == n:
                        return got
            return got

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_lifecycle_and_metrics_through_libvirtd(self):
        daemon = yield Daemon(self, **{"hypervisor.uri": URI}).start()
        yield wait_for(lambda: daemon.node.watcher.reconciliations > 0, timeout=30)
        stream = daemon.stub.StreamEvents(Empty(), timeout=45)
        self.addCleanup(stream.cancel)
        yield wait_for(lambda: daemon.node.bus.subscriber_count == 1)

        dom = yield threads.deferToThread(self.conn.createXML, tiny_domain(self.name, self.uuid), 0)
        yield threads.deferToThread(dom.suspend)
        metrics = daemon.stub.StreamMetrics(node_pb2.StreamMetricsRequest(interval_seconds=1), timeout=45)
        self.addCleanup(metrics.cancel)
        sample = yield threads.deferToThread(next, metrics)
        yield threads.deferToThread(dom.resume)
        yield threads.deferToThread(dom.destroy)

        events = yield self.mine(stream, 4)
        self.assertEqual([e.type for e in events], [m.VM_STARTED, m.VM_PAUSED, m.VM_RESUMED, m.VM_STOPPED])
        self.assertEqual(events[0].metadata["libvirt_detail"], "booted")
        self.assertEqual(events[0].metadata["vm_name"], self.name)
        self.assertEqual(events[3].metadata["libvirt_detail"], "destroyed")
        vms = {v.vm_id: v for v in sample.vms}
        self.assertIn(self.uuid, vms)
        self.assertEqual(vms[self.uuid].name, self.name)
