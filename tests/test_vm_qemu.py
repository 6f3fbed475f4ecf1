"""Integration tier: the VM RPCs and connection supervision against the real libvirtd (QEMU, TCG).

A tiny VM with no OS (it idles in the firmware) goes through its whole life over real gRPC.
Skipped when ``qemu:///system`` does not answer, except under ``CI`` where that is a failure.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import uuid
import xml.etree.ElementTree as ET

import grpc
import libvirt
from google.protobuf import empty_pb2
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.proto import node_pb2
from tests.libvirtd import NAME_PREFIX, real_libvirt_uri, virsh
from tests.support import Daemon, rpc_error, storage_dir, wait_for

URI = "qemu:///system"
MGMT_IP = "192.0.2.10"


def require_libvirtd() -> None:
    real_libvirt_uri(URI)


class QemuVmTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        require_libvirtd()
        self.daemon = Daemon(
            self,
            **{
                "hypervisor.uri": URI,
                "hypervisor.domain_type": "qemu",
                "hypervisor.console_listen": "127.0.0.1",
                "hypervisor.stop_timeout": 1,
                "node.management_ip": MGMT_IP,
            },
        )
        yield self.daemon.start()
        # The storage box defines a persistent pool over this daemon's VM-disk directory.
        pool = self.daemon.node.storage.vm_pool_name
        self.addCleanup(virsh, "pool-undefine", pool)
        self.addCleanup(virsh, "pool-destroy", pool)
        self.call = self.daemon.call
        self.tag = uuid.uuid4().hex[:10]

    def conn_call(self, func, *args):
        return threads.deferToThread(func, self.daemon.node.hypervisor.conn(), *args)

    @defer.inlineCallbacks
    def network(self) -> str:
        """libvirt's ``default`` network when there is one, else one of our own.

        Ours forwards to a bridge the test creates: a NAT or isolated libvirt network needs
        iptables and dnsmasq, which a bare test host may lack.
        """
        bridge = f"qtxbr{self.tag[:8]}"

        def find_or_make(conn):
            try:
                conn.networkLookupByName("default")
                return "default", False
            except libvirt.libvirtError:
                pass
            _bridge(SIOCBRADDBR, bridge)
            self.addCleanup(_bridge, SIOCBRDELBR, bridge)
            name = f"{NAME_PREFIX}-{self.tag}"
            net = ET.Element("network")
            ET.SubElement(net, "name").text = name
            ET.SubElement(net, "forward", mode="bridge")
            ET.SubElement(net, "bridge", name=bridge)
            conn.networkCreateXML(ET.tostring(net, encoding="unicode"))
            self.addCleanup(virsh, "net-destroy", name)
            return name, True

        name, _ = yield self.conn_call(find_or_make)
        return name

    @defer.inlineCallbacks
    def state(self, vm_id: str) -> int:
        status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id))
        return status.state

    def xml_of(self, vm_id: str, flags: int = 0):
        return self.conn_call(lambda conn: conn.lookupByUUIDString(vm_id).XMLDesc(flags))

    @defer.inlineCallbacks
    def test_tiny_vm_lifecycle(self):
        network = yield self.network()
        vm_id = str(uuid.uuid4())
        name = f"{NAME_PREFIX}-{self.tag}"
        self.addCleanup(virsh, "undefine", name, "--snapshots-metadata", "--nvram")
        self.addCleanup(virsh, "destroy", name)
        root = os.path.join(storage_dir(self.daemon), "root.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", root, "16M"], check=True)
        iso = os.path.join(storage_dir(self.daemon), "media.iso")
        with open(iso, "wb") as fh:
            fh.write(b"\0" * 2048 * 16)
        req = node_pb2.CreateVMOnNodeRequest(
            vm_id=vm_id,
            name=name,
            labels={"suite": "qemu"},
            spec=node_pb2.VMSpec(
                cpu_cores=1,
                memory_mib=96,
                disks=[node_pb2.DiskSpec(id="root", path=root, bootable=True)],
                cdroms=[node_pb2.CdromSpec(id="cd0")],
                cloud_init=node_pb2.CloudInitConfig(user_data="#cloud-config\n"),
                console=node_pb2.ConsoleSpec(vnc_enabled=True),
            ),
        )
        yield self.call("CreateVM", req)
        yield self.call("CreateVM", req)  # idempotent
        yield self.call("StartVM", node_pb2.VMIdRequest(vm_id=vm_id))
        status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual(status.state, node_pb2.POWER_STATE_RUNNING)
        self.assertGreater(status.started_at.seconds, 0)
        self.assertEqual(status.resource_usage.memory_total_bytes, 96 * 1024 * 1024)
        self.assertEqual([d.id for d in status.disks], ["root"])
        listed = yield self.call("ListVMs", empty_pb2.Empty())
        self.assertIn(vm_id, [v.vm_id for v in listed.vms])

        console = yield self.call("GetConsole", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual((console.type, console.host), ("vnc", MGMT_IP))
        self.assertGreaterEqual(console.port, 5900)
        logs = yield self.call("GetVMLogs", node_pb2.GetVMLogsRequest(vm_id=vm_id, lines=20))
        self.assertEqual(logs.log_path, f"/var/log/libvirt/qemu/{name}.log")
        self.assertIn("qemu", logs.qemu_log)

        yield self.call("PauseVM", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual((yield self.state(vm_id)), node_pb2.POWER_STATE_PAUSED)
        yield self.call("ResumeVM", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual((yield self.state(vm_id)), node_pb2.POWER_STATE_RUNNING)
        yield self.call("RebootVM", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual((yield self.state(vm_id)), node_pb2.POWER_STATE_RUNNING)

        snap = yield self.call(
            "CreateSnapshot", node_pb2.CreateSnapshotRequest(vm_id=vm_id, name="s1", description="first")
        )
        self.assertEqual((snap.snapshot_id, snap.vm_state), ("s1", node_pb2.POWER_STATE_RUNNING))
        self.assertGreater(snap.created_at.seconds, 0)

        # Hot-plug while running: a NIC, a new disk (created by the daemon), media in the CD-ROM.
        nic = node_pb2.NicSpec(id="eth0", network=network, mac_address="52:54:00:12:34:56")
        yield self.call("AttachNIC", node_pb2.AttachNICRequest(vm_id=vm_id, nic=nic))
        yield self.call(
            "AttachDisk",
            node_pb2.AttachDiskRequest(
                vm_id=vm_id, disk=node_pb2.DiskSpec(id="data", size_gib=1, bus=node_pb2.DISK_BUS_SATA)
            ),
        )
        yield self.call("ChangeMedia", node_pb2.ChangeMediaRequest(vm_id=vm_id, device="cd0", iso_path=iso))
        live = ET.fromstring((yield self.xml_of(vm_id)))
        self.assertEqual(live.find("devices/interface/mac").get("address"), "52:54:00:12:34:56")
        sources = [s.get("file") for s in live.findall("devices/disk/source")]
        self.assertIn(iso, sources)
        status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id))
        [data_disk] = [d for d in status.disks if d.id == "data"]
        data = data_disk.path
        self.assertTrue(os.path.exists(data))
        self.assertEqual(data_disk.bus, node_pb2.DISK_BUS_VIRTIO)  # SATA cannot be hot-plugged
        self.assertEqual(data_disk.size_gib, 1)
        yield self.call("ChangeMedia", node_pb2.ChangeMediaRequest(vm_id=vm_id, device="cd0"))

        # No OS answers ACPI: StopVM times out and leaves the VM running.
        code, _ = yield rpc_error(self.call("StopVM", node_pb2.StopVMRequest(vm_id=vm_id, timeout_seconds=1)))
        self.assertEqual(code, grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertEqual((yield self.state(vm_id)), node_pb2.POWER_STATE_RUNNING)
        code, _ = yield rpc_error(self.call("DeleteVM", node_pb2.VMIdRequest(vm_id=vm_id)))
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)
        yield self.call("ForceStopVM", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual((yield self.state(vm_id)), node_pb2.POWER_STATE_STOPPED)

        yield self.call("DetachNIC", node_pb2.DetachNICRequest(vm_id=vm_id, nic_id="eth0"))
        # The VM is off, so libvirt sends no device event: the daemon reports the detach itself,
        # with the control plane's id. The live attach was libvirt's to report.
        bus = self.daemon.node.bus

        def ours(kind):
            return [e for e in bus.buffer if e.type == kind and e.metadata.get("nic_id") == "eth0"]

        yield wait_for(lambda: ours(node_pb2.EVENT_TYPE_NIC_DETACHED))
        self.assertEqual(ours(node_pb2.EVENT_TYPE_NIC_ATTACHED), [])
        yield self.call("DetachDisk", node_pb2.DetachDiskRequest(vm_id=vm_id, disk_id="data"))
        persistent = yield self.xml_of(vm_id, libvirt.VIR_DOMAIN_XML_INACTIVE)
        self.assertEqual(ET.fromstring(persistent).findall("devices/interface"), [])
        self.assertNotIn(data, persistent)

        yield self.call("RevertSnapshot", node_pb2.RevertSnapshotRequest(vm_id=vm_id, snapshot_id="s1"))
        self.assertEqual((yield self.state(vm_id)), node_pb2.POWER_STATE_RUNNING)
        yield self.call("ForceStopVM", node_pb2.VMIdRequest(vm_id=vm_id))
        snaps = yield self.call("ListSnapshots", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual([s.snapshot_id for s in snaps.snapshots], ["s1"])

        seed = [s.get("file") for s in ET.fromstring(persistent).findall("devices/disk/source")]
        seed = [p for p in seed if p and p.endswith("cloud-init.iso")]
        self.assertEqual(len(seed), 1)
        yield self.call("DeleteVM", node_pb2.VMIdRequest(vm_id=vm_id))
        code, _ = yield rpc_error(self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id)))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertFalse(os.path.exists(seed[0]))
        self.assertTrue(os.path.exists(root))  # given by path, not created: kept

    @defer.inlineCallbacks
    def test_disk_only_snapshot_and_delete_removes_created_files(self):
        """A live disk-only snapshot stacks an overlay on the disk the daemon created; DeleteVM
        removes both, and never the backing image under the created disk."""
        vm_id = str(uuid.uuid4())
        name = f"{NAME_PREFIX}-{self.tag}"
        self.addCleanup(virsh, "undefine", name, "--snapshots-metadata", "--nvram")
        self.addCleanup(virsh, "destroy", name)
        base = os.path.join(storage_dir(self.daemon), "base.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "16M"], check=True)
        req = node_pb2.CreateVMOnNodeRequest(
            vm_id=vm_id,
            name=name,
            spec=node_pb2.VMSpec(
                cpu_cores=1, memory_mib=64, disks=[node_pb2.DiskSpec(id="root", backing_file=base)]
            ),
        )
        yield self.call("CreateVM", req)
        # An overlay of a cloud image gets a seed even without cloud-init data.
        seed = os.path.join(self.daemon.config.storage.vm_images, f"{vm_id}-cloud-init.iso")
        self.assertTrue(os.path.exists(seed))
        yield self.call("StartVM", node_pb2.VMIdRequest(vm_id=vm_id))
        status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id))
        created = status.disks[0].path
        self.assertTrue(created.startswith(self.daemon.config.storage.vm_images))
        snap = yield self.call(
            "CreateSnapshot", node_pb2.CreateSnapshotRequest(vm_id=vm_id, name="d1", disk_only=True)
        )
        self.assertEqual(snap.vm_state, node_pb2.POWER_STATE_RUNNING)
        status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id))
        overlay = status.disks[0].path
        self.assertNotEqual(overlay, created)
        self.assertTrue(os.path.exists(overlay))
        yield self.call("ForceStopVM", node_pb2.VMIdRequest(vm_id=vm_id))
        yield self.call("DeleteVM", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertFalse(os.path.exists(overlay))
        self.assertFalse(os.path.exists(created))
        self.assertFalse(os.path.exists(seed))
        self.assertTrue(os.path.exists(base))

    @defer.inlineCallbacks
    def test_reconnects_after_the_connection_is_dropped(self):
        """libvirtd drops our client (virt-admin client-disconnect): the close callback fires,
        the supervisor reconnects and listeners run again."""
        hv = self.daemon.node.hypervisor
        connects = []
        hv.listen(lambda conn: connects.append(conn))
        self.assertEqual(len(connects), 1)
        dropped = yield threads.deferToThread(_disconnect_clients_of, os.getpid())
        if not dropped:
            raise unittest.SkipTest("virt-admin found no client of this process to disconnect")
        yield wait_for(lambda: len(connects) == 2, timeout=30)
        self.assertTrue(hv.connected)
        self.assertEqual(hv.reconnects, 1)
        listed = yield self.call("ListVMs", empty_pb2.Empty())
        self.assertIsNotNone(listed)


SIOCBRADDBR, SIOCBRDELBR = 0x89A0, 0x89A1


def _bridge(request: int, name: str) -> None:
    """Add or delete a Linux bridge with the kernel's bridge ioctls (no iproute2 needed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, request, name.encode() + b"\0")


def _disconnect_clients_of(pid: int) -> int:
    """Disconnect every libvirtd client whose peer is process ``pid``; how many were."""
    admin = ["virt-admin", "-q", "-c", "libvirtd:///system"]
    out = subprocess.run(
        [*admin, "srv-clients-list", "libvirtd"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    dropped = 0
    for line in out.splitlines():
        fields = line.split()
        if not fields or not fields[0].isdigit():
            continue
        info = subprocess.run(
            [*admin, "client-info", "libvirtd", fields[0]], capture_output=True, text=True, timeout=30
        ).stdout
        props = dict(
            (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in info.splitlines()) if k
        )
        if props.get("unix_process_id") == str(pid):
            subprocess.run(
                [*admin, "client-disconnect", "libvirtd", fields[0]], capture_output=True, timeout=30
            )
            dropped += 1
    return dropped
