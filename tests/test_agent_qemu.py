"""Integration: the manager against a real QEMU virtio-serial channel on qemu:///system.

The domain has no OS, so no agent ever answers: the manager must connect to the channel socket
QEMU binds, time requests out cleanly, and fail pending requests at once when the VM dies.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import xml.etree.ElementTree as ET

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from quantix.agent.manager import AgentManager
from quantix.agent.protocol import ConnectionLost
from quantix.errors import Timeout
from quantix.proto import agent_pb2
from tests.libvirtd import NAME_PREFIX, real_libvirt_uri

try:
    import libvirt
except ImportError:  # pragma: no cover
    libvirt = None

URI = "qemu:///system"


def domain_xml(name: str, vm_id: str, socket_path: str) -> str:
    """A diskless TCG domain with our agent channel bound at ``socket_path``."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = vm_id
    ET.SubElement(dom, "memory", unit="MiB").text = "32"
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "controller", type="virtio-serial", index="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind", path=socket_path)
    ET.SubElement(channel, "target", type="virtio", name="org.quantix.agent.0")
    return ET.tostring(dom, encoding="unicode")


def _open() -> object:
    if libvirt is None:
        raise RuntimeError("libvirt-python is not installed")
    return libvirt.open(URI)


class RealChannelTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        real_libvirt_uri(URI)
        self.conn = yield threads.deferToThread(_open)
        self.addCleanup(self.conn.close)
        self.dir = tempfile.mkdtemp(prefix="qtx-test-agent-")
        os.chmod(self.dir, 0o755)
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.vm = str(uuid.uuid4())
        self.name = f"{NAME_PREFIX}-agent-{self.vm[:8]}"
        self.sock = os.path.join(self.dir, f"{self.vm}.agent.sock")
        self.dom = yield threads.deferToThread(self.conn.defineXML, domain_xml(self.name, self.vm, self.sock))
        self.addCleanup(threads.deferToThread, self._remove)
        yield threads.deferToThread(self.dom.create)
        self.manager = AgentManager(reactor, socket_dir=self.dir, channel_roots=(), initial_backoff=0.05)
        self.addCleanup(self.manager.stop_all)

    def _remove(self) -> None:
        try:
            if self.dom.isActive():
                self.dom.destroy()
        finally:
            self.dom.undefine()

    @defer.inlineCallbacks
    def test_connects_to_qemu_channel_and_copes_with_a_silent_guest(self):
        self.assertTrue(os.path.exists(self.sock))
        self.manager.vm_started(self.vm, domain_name=self.name)
        yield self.manager.when_connected(self.vm)
        self.assertEqual(self.manager.socket_path(self.vm), self.sock)
        self.assertTrue(self.manager.is_channel_open(self.vm))

        # No agent inside: the request times out, the channel survives, the agent counts as absent.
        e = yield self.assertFailure(
            self.manager.request(self.vm, agent_pb2.PingRequest(sequence=1), 1.0), Timeout
        )
        self.assertIn("ping", str(e))
        self.assertTrue(self.manager.is_channel_open(self.vm))
        self.assertFalse(self.manager.info(self.vm).connected)

        # The VM dies with a request in flight: it fails at once, not after its hour-long timeout.
        pending = self.manager.request(self.vm, agent_pb2.PingRequest(sequence=2), 3600)
        yield threads.deferToThread(self.dom.destroy)
        yield self.assertFailure(pending, ConnectionLost)
        yield self.manager.vm_stopped(self.vm)
