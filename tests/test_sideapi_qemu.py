"""Integration tier: the 8443 side API against a real TCG VM on qemu:///system whose guest never
answers (no OS: neither our agent nor qemu-ga runs), plus GetConsole's management-IP invariant.

Skipped when ``qemu:///system`` does not answer, except under ``CI`` where that is a failure.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import time
import uuid

from twisted.internet import defer, reactor
from twisted.trial import unittest

from quantix.proto import node_pb2
from tests.fakecp import FakeControlPlane, FakeCPServer
from tests.libvirtd import real_libvirt_uri
from tests.sidehttp import SideClient
from tests.support import Daemon, storage_dir, wait_for
from tests.test_sideapi import served_cert


def virsh(*args: str) -> None:
    subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, timeout=60, check=False
    )


class SilentGuestTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        uri = real_libvirt_uri()
        self.cp = FakeControlPlane()
        server = FakeCPServer(reactor, self.cp)
        server.start()
        self.addCleanup(server.stop)
        # No node.management_ip: GetConsole and RegisterNode must agree on the detected one.
        self.daemon = Daemon(
            self,
            **{
                "hypervisor.uri": uri,
                "hypervisor.domain_type": "qemu",
                "hypervisor.console_listen": "127.0.0.1",
                "https.listen": "127.0.0.1:0",
                "control_plane_url": server.url,
                "auto_register": True,
                "control_plane.startup_jitter": 0,
            },
        )
        yield self.daemon.start()
        pool = self.daemon.node.storage.vm_pool_name
        self.addCleanup(virsh, "pool-undefine", pool)
        self.addCleanup(virsh, "pool-destroy", pool)
        self.vm_id = str(uuid.uuid4())
        name = f"qtx-test-side-{self.vm_id[:8]}"
        self.addCleanup(virsh, "undefine", name, "--nvram")
        self.addCleanup(virsh, "destroy", name)
        root = os.path.join(storage_dir(self.daemon), "root.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", root, "16M"], check=True)
        spec = node_pb2.VMSpec(
            cpu_cores=1,
            memory_mib=64,
            disks=[node_pb2.DiskSpec(id="root", path=root, bootable=True)],
            console=node_pb2.ConsoleSpec(vnc_enabled=True),
        )
        yield self.daemon.call(
            "CreateVM", node_pb2.CreateVMOnNodeRequest(vm_id=self.vm_id, name=name, spec=spec)
        )
        yield self.daemon.call("StartVM", node_pb2.VMIdRequest(vm_id=self.vm_id))
        port = self.daemon.node.https.port
        self.client = SideClient(
            self, served_cert(self.daemon), "127.0.0.1", port, server_name=self.mgmt_ip()
        )
        # QEMU bound our agent channel: the manager connects, but nobody is behind it.
        yield wait_for(lambda: self.daemon.node.agents.is_channel_open(self.vm_id), timeout=30)

    def mgmt_ip(self) -> str:
        from quantix.hypervisor import hostinfo

        return hostinfo.management_ip()

    @defer.inlineCallbacks
    def test_silent_guest_gets_json_answers_within_the_deadlines(self):
        vm = f"/api/v1/vms/{self.vm_id}"
        started = time.monotonic()
        code, body = yield self.client.get(f"{vm}/qemu-agent/ping")
        self.assertLess(time.monotonic() - started, 6.0)
        self.assertEqual((code, body["available"]), (200, False))
        self.assertIn("agent", body["error"].lower())

        code, body = yield self.client.get(f"{vm}/agent/ping")
        self.assertEqual((code, body["connected"]), (200, False))

        started = time.monotonic()
        code, body = yield self.client.post(f"{vm}/execute", {"command": "true", "timeoutSeconds": 1})
        self.assertLess(time.monotonic() - started, 28.0)
        self.assertEqual((code, body["error"]), (504, "guest_timeout"))

        code, body = yield self.client.post(f"{vm}/agent/install", {"force": False})
        self.assertEqual((code, body["success"]), (200, False))

        code, body = yield self.client.get(f"{vm}/logs?lines=5")
        self.assertEqual((code, body["vmId"]), (200, self.vm_id))
        self.assertIn("-device", body["qemuLog"])  # the tail of QEMU's command line

    @defer.inlineCallbacks
    def test_console_host_is_the_registered_ipv4_management_ip(self):
        yield self.cp.wait_for(lambda: bool(self.cp.calls("RegisterNode")))
        registered = self.cp.calls("RegisterNode")[0].body["managementIp"]
        console = yield self.daemon.call("GetConsole", node_pb2.VMIdRequest(vm_id=self.vm_id))
        self.assertEqual(console.host, registered)
        ipaddress.IPv4Address(console.host)  # the control plane dials host:port unbracketed
        self.assertGreaterEqual(console.port, 5900)
