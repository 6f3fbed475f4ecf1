"""VM RPCs through a real gRPC client against a daemon on libvirt's test driver (fast tier)."""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET

import grpc
import libvirt
from google.protobuf import empty_pb2
from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from quantix.proto import node_pb2
from tests.guestpeer import GuestPeer
from tests.stderr import capture_stderr
from tests.support import Daemon, rpc_error, wait_for

RUNNING = "11111111-2222-3333-4444-555555555555"
STOPPED = "66666666-7777-8888-9999-000000000000"
MGMT_IP = "192.0.2.10"


def spec(**kw) -> node_pb2.VMSpec:
    base = {"cpu_cores": 1, "memory_mib": 64}
    base.update(kw)
    return node_pb2.VMSpec(**base)


def plain_domain(name: str, vm_id: str, *, vnc_port: int = 5905, cdrom: bool = True) -> str:
    """A test-driver domain with a VNC console and an empty CD-ROM, built without our builder."""
    dom = ET.Element("domain", type="test")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = vm_id
    ET.SubElement(dom, "memory", unit="MiB").text = "64"
    ET.SubElement(dom, "vcpu").text = "1"
    ET.SubElement(ET.SubElement(dom, "os"), "type", arch="x86_64").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    if cdrom:
        cd = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(cd, "driver", name="qemu", type="raw")
        ET.SubElement(cd, "target", dev="sda", bus="sata")
        ET.SubElement(cd, "readonly")
    ET.SubElement(devices, "graphics", type="vnc", port=str(vnc_port), autoport="no", listen="127.0.0.1")
    return ET.tostring(dom, encoding="unicode")


class VmRpcTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = Daemon(self, **{"node.management_ip": MGMT_IP})
        yield self.daemon.start()
        self.call = self.daemon.call
        self.tmp = self.daemon.tmp

    def in_thread(self, func, *args):
        """Run a direct libvirt call against the daemon's own test-driver connection."""
        return threads.deferToThread(func, self.daemon.node.hypervisor.conn(), *args)

    def define(self, xml: str):
        return self.in_thread(lambda conn: conn.defineXML(xml).UUIDString())

    def volume_exists(self, path: str):
        """Test-driver volumes have no files behind them: ask libvirt."""

        def lookup(conn):
            try:
                conn.storageVolLookupByPath(path)
                return True
            except libvirt.libvirtError:
                return False

        return self.in_thread(lookup)

    def xml_of(self, vm_id: str, flags: int = 0):
        return self.in_thread(lambda conn: conn.lookupByUUIDString(vm_id).XMLDesc(flags))

    @defer.inlineCallbacks
    def state(self, vm_id: str) -> int:
        status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id))
        return status.state

    # -- CreateVM -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_create_vm_adopts_uuid_and_creates_disk_and_seed(self):
        vm_id = str(uuid.uuid4())
        req = node_pb2.CreateVMOnNodeRequest(
            vm_id=vm_id,
            name="qtx-create",
            labels={"team": "a"},
            spec=spec(
                disks=[node_pb2.DiskSpec(id="root", size_gib=1)],
                nics=[node_pb2.NicSpec(id="n0", network="cp-network-uuid-unknown-to-libvirt")],
                cloud_init=node_pb2.CloudInitConfig(user_data="#cloud-config\n"),
            ),
        )
        resp = yield self.call("CreateVM", req)
        self.assertEqual((resp.vm_id, resp.created), (vm_id, True))
        status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual(status.state, node_pb2.POWER_STATE_STOPPED)
        self.assertEqual(status.name, "qtx-create")
        [disk] = status.disks
        self.assertEqual(disk.id, "root")
        self.assertEqual(disk.path, os.path.join(self.daemon.config.storage.vm_images, f"{vm_id}-root.qcow2"))
        self.assertTrue((yield self.volume_exists(disk.path)))
        self.assertTrue(disk.path.startswith(self.daemon.config.storage.vm_images))
        xml = yield self.xml_of(vm_id)
        root = ET.fromstring(xml)
        self.assertEqual(root.findtext("uuid"), vm_id)
        # The unknown control-plane network falls back to libvirt's default network.
        self.assertEqual(root.find("devices/interface/source").get("network"), "default")
        isos = [s.get("file") for s in root.findall("devices/disk[@device='cdrom']/source")]
        self.assertEqual(len(isos), 1)
        self.assertTrue(os.path.exists(isos[0]))

        # Same request again: fine. Another spec under the same id: ALREADY_EXISTS.
        again = yield self.call("CreateVM", req)
        self.assertEqual(again.vm_id, vm_id)
        req.spec.memory_mib = 128
        code, details = yield rpc_error(self.call("CreateVM", req))
        self.assertEqual(code, grpc.StatusCode.ALREADY_EXISTS)

        # DeleteVM removes the disk and the seed it created.
        yield self.call("DeleteVM", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertFalse((yield self.volume_exists(disk.path)))
        self.assertFalse(os.path.exists(isos[0]))
        code, details = yield rpc_error(self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm_id)))
        self.assertEqual((code, details), (grpc.StatusCode.NOT_FOUND, f"VM not found: {vm_id}"))

    @defer.inlineCallbacks
    def test_concurrent_identical_creates_define_one_vm(self):
        vm_id = str(uuid.uuid4())
        req = node_pb2.CreateVMOnNodeRequest(
            vm_id=vm_id, name="qtx-race", spec=spec(disks=[node_pb2.DiskSpec(id="root", size_gib=1)])
        )
        replies = yield defer.gatherResults([self.call("CreateVM", req) for _ in range(4)])
        self.assertEqual({r.vm_id for r in replies}, {vm_id})
        self.assertEqual(sorted(r.message for r in replies).count("VM created successfully"), 1)
        root = os.path.join(self.daemon.config.storage.vm_images, f"{vm_id}-root.qcow2")
        self.assertTrue((yield self.volume_exists(root)))

    @defer.inlineCallbacks
    def test_create_vm_rejects_bad_input(self):
        code, details = yield rpc_error(
            self.call("CreateVM", node_pb2.CreateVMOnNodeRequest(vm_id="not-a-uuid", name="x", spec=spec()))
        )
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("UUID", details)
        code, _ = yield rpc_error(
            self.call("CreateVM", node_pb2.CreateVMOnNodeRequest(vm_id=str(uuid.uuid4()), name="x"))
        )
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        # A disk to create without a size; nothing is left behind.
        req = node_pb2.CreateVMOnNodeRequest(
            vm_id=str(uuid.uuid4()), name="x", spec=spec(disks=[node_pb2.DiskSpec(id="d")])
        )
        code, _ = yield rpc_error(self.call("CreateVM", req))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        # The name of another VM.
        req = node_pb2.CreateVMOnNodeRequest(vm_id=str(uuid.uuid4()), name="vm-running", spec=spec())
        code, _ = yield rpc_error(self.call("CreateVM", req))
        self.assertEqual(code, grpc.StatusCode.ALREADY_EXISTS)

    @defer.inlineCallbacks
    def test_create_vm_rolls_back_created_disks_on_failure(self):
        vm_id = str(uuid.uuid4())
        req = node_pb2.CreateVMOnNodeRequest(
            vm_id=vm_id,
            name="qtx-rollback",
            spec=spec(cpu_cores=0, disks=[node_pb2.DiskSpec(id="root", size_gib=1)]),
        )
        code, _ = yield rpc_error(self.call("CreateVM", req))
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        root = os.path.join(self.daemon.config.storage.vm_images, f"{vm_id}-root.qcow2")
        self.assertFalse((yield self.volume_exists(root)))

    # -- power --------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_power_cycle(self):
        req = node_pb2.VMIdRequest(vm_id=STOPPED)
        code, _ = yield rpc_error(self.call("PauseVM", req))
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)
        code, _ = yield rpc_error(self.call("RebootVM", req))
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)
        yield self.call("StartVM", req)
        yield self.call("StartVM", req)  # idempotent
        self.assertEqual((yield self.state(STOPPED)), node_pb2.POWER_STATE_RUNNING)
        yield self.call("PauseVM", req)
        self.assertEqual((yield self.state(STOPPED)), node_pb2.POWER_STATE_PAUSED)
        code, _ = yield rpc_error(self.call("DeleteVM", req))
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)
        yield self.call("ResumeVM", req)
        yield self.call("RebootVM", req)
        self.assertEqual((yield self.state(STOPPED)), node_pb2.POWER_STATE_RUNNING)
        yield self.call("StopVM", node_pb2.StopVMRequest(vm_id=STOPPED, timeout_seconds=5))
        self.assertEqual((yield self.state(STOPPED)), node_pb2.POWER_STATE_STOPPED)
        yield self.call("StopVM", node_pb2.StopVMRequest(vm_id=STOPPED))  # already off: fine
        yield self.call("ForceStopVM", req)
        # A paused VM is started by resuming it.
        yield self.call("PauseVM", node_pb2.VMIdRequest(vm_id=RUNNING))
        yield self.call("StartVM", node_pb2.VMIdRequest(vm_id=RUNNING))
        self.assertEqual((yield self.state(RUNNING)), node_pb2.POWER_STATE_RUNNING)
        yield self.call("ForceStopVM", node_pb2.VMIdRequest(vm_id=RUNNING))
        self.assertEqual((yield self.state(RUNNING)), node_pb2.POWER_STATE_STOPPED)

    @defer.inlineCallbacks
    def test_missing_vm_is_not_found_everywhere(self):
        vm_id = str(uuid.uuid4())
        for method, req in [
            ("StartVM", node_pb2.VMIdRequest(vm_id=vm_id)),
            ("StopVM", node_pb2.StopVMRequest(vm_id=vm_id)),
            ("ForceStopVM", node_pb2.VMIdRequest(vm_id=vm_id)),
            ("DeleteVM", node_pb2.VMIdRequest(vm_id=vm_id)),
            ("GetConsole", node_pb2.VMIdRequest(vm_id=vm_id)),
            ("GetVMLogs", node_pb2.GetVMLogsRequest(vm_id=vm_id)),
            ("ListSnapshots", node_pb2.VMIdRequest(vm_id=vm_id)),
            ("DetachNIC", node_pb2.DetachNICRequest(vm_id=vm_id, nic_id="n")),
            ("GetVMStatus", node_pb2.VMIdRequest(vm_id="garbage/../x")),
        ]:
            code, details = yield rpc_error(self.call(method, req))
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, method)
            self.assertIn("VM not found", details, method)

    @defer.inlineCallbacks
    def test_list_vms(self):
        resp = yield self.call("ListVMs", empty_pb2.Empty())
        by_id = {vm.vm_id: vm for vm in resp.vms}
        self.assertEqual(by_id[RUNNING].state, node_pb2.POWER_STATE_RUNNING)
        self.assertEqual(by_id[RUNNING].name, "vm-running")
        self.assertEqual(by_id[STOPPED].state, node_pb2.POWER_STATE_STOPPED)

    @defer.inlineCallbacks
    def test_status_reports_memory(self):
        status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=RUNNING))
        self.assertEqual(status.resource_usage.memory_total_bytes, 262144 * 1024)

    @defer.inlineCallbacks
    def test_list_and_status_report_the_same_usage(self):
        """One mapping for both (the test driver has no balloon stats: both fall back to the
        domain's configured memory); ``quantix-nodectl vms`` showed 0 B where ``vm`` did not."""
        listed = yield self.call("ListVMs", empty_pb2.Empty())
        for vm in listed.vms:
            status = yield self.call("GetVMStatus", node_pb2.VMIdRequest(vm_id=vm.vm_id))
            mine, theirs = vm.resource_usage, status.resource_usage
            self.assertGreater(mine.memory_total_bytes, 0, vm.name)
            self.assertEqual(
                (mine.memory_total_bytes, mine.memory_used_bytes),
                (theirs.memory_total_bytes, theirs.memory_used_bytes),
                vm.name,
            )

    # -- console and logs ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_console_replaces_loopback_with_management_ip(self):
        vm_id = yield self.define(plain_domain("qtx-console", str(uuid.uuid4())))
        code, _ = yield rpc_error(self.call("GetConsole", node_pb2.VMIdRequest(vm_id=vm_id)))
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)
        yield self.call("StartVM", node_pb2.VMIdRequest(vm_id=vm_id))
        info = yield self.call("GetConsole", node_pb2.VMIdRequest(vm_id=vm_id))
        self.assertEqual((info.type, info.host, info.port), ("vnc", MGMT_IP, 5905))

    @defer.inlineCallbacks
    def test_logs_tail(self):
        log_dir = os.path.abspath(self.mktemp())
        os.makedirs(log_dir)
        daemon = Daemon(self, **{"hypervisor.log_dir": log_dir})
        yield daemon.start()
        empty = yield daemon.call("GetVMLogs", node_pb2.GetVMLogsRequest(vm_id=RUNNING))
        self.assertEqual((empty.qemu_log, empty.lines_returned, empty.vm_name), ("", 0, "vm-running"))
        with open(os.path.join(log_dir, "vm-running.log"), "w") as fh:
            fh.writelines(f"line {i}\n" for i in range(150))
        default = yield daemon.call("GetVMLogs", node_pb2.GetVMLogsRequest(vm_id=RUNNING))
        self.assertEqual(default.lines_returned, 100)
        self.assertTrue(default.truncated)
        self.assertEqual(default.qemu_log.splitlines()[-1], "line 149")
        self.assertTrue(default.last_modified.endswith("Z"))
        five = yield daemon.call("GetVMLogs", node_pb2.GetVMLogsRequest(vm_id=RUNNING, lines=5))
        self.assertEqual(five.qemu_log, "\n".join(f"line {i}" for i in range(145, 150)))
        many = yield daemon.call("GetVMLogs", node_pb2.GetVMLogsRequest(vm_id=RUNNING, lines=5000))
        self.assertEqual((many.lines_returned, many.truncated), (150, False))

    # -- snapshots ----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_snapshots(self):
        s1 = yield self.call("CreateSnapshot", node_pb2.CreateSnapshotRequest(vm_id=RUNNING, name="s1"))
        self.assertEqual(
            (s1.snapshot_id, s1.vm_state, s1.parent_id), ("s1", node_pb2.POWER_STATE_RUNNING, "")
        )
        self.assertGreater(s1.created_at.seconds, 0)
        s2 = yield self.call(
            "CreateSnapshot",
            node_pb2.CreateSnapshotRequest(vm_id=RUNNING, name="s2", description="second"),
        )
        self.assertEqual((s2.parent_id, s2.description), ("s1", "second"))
        code, _ = yield rpc_error(
            self.call("CreateSnapshot", node_pb2.CreateSnapshotRequest(vm_id=RUNNING, name="s2"))
        )
        self.assertEqual(code, grpc.StatusCode.ALREADY_EXISTS)
        code, _ = yield rpc_error(
            self.call("CreateSnapshot", node_pb2.CreateSnapshotRequest(vm_id=RUNNING, name="bad name/"))
        )
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        listed = yield self.call("ListSnapshots", node_pb2.VMIdRequest(vm_id=RUNNING))
        self.assertEqual([s.snapshot_id for s in listed.snapshots], ["s1", "s2"])
        yield self.call("ForceStopVM", node_pb2.VMIdRequest(vm_id=RUNNING))
        yield self.call("RevertSnapshot", node_pb2.RevertSnapshotRequest(vm_id=RUNNING, snapshot_id="s1"))
        self.assertEqual((yield self.state(RUNNING)), node_pb2.POWER_STATE_RUNNING)
        yield self.call("DeleteSnapshot", node_pb2.DeleteSnapshotRequest(vm_id=RUNNING, snapshot_id="s2"))
        code, details = yield rpc_error(
            self.call("DeleteSnapshot", node_pb2.DeleteSnapshotRequest(vm_id=RUNNING, snapshot_id="s2"))
        )
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertIn("snapshot not found: s2", details)
        # A stopped VM snapshots its disks only; the state says so.
        yield self.call("ForceStopVM", node_pb2.VMIdRequest(vm_id=STOPPED))
        s3 = yield self.call(
            "CreateSnapshot", node_pb2.CreateSnapshotRequest(vm_id=STOPPED, name="s3", disk_only=True)
        )
        self.assertEqual(s3.vm_state, node_pb2.POWER_STATE_STOPPED)

    @defer.inlineCallbacks
    def test_snapshot_events_reach_the_bus(self):
        bus = self.daemon.node.bus
        kinds = {
            node_pb2.EVENT_TYPE_SNAPSHOT_CREATED,
            node_pb2.EVENT_TYPE_SNAPSHOT_REVERTED,
            node_pb2.EVENT_TYPE_SNAPSHOT_DELETED,
        }

        def ours():
            return [(e.type, e.vm_id, dict(e.metadata)) for e in bus.buffer if e.type in kinds]

        yield self.call("CreateSnapshot", node_pb2.CreateSnapshotRequest(vm_id=RUNNING, name="e1"))
        yield self.call("RevertSnapshot", node_pb2.RevertSnapshotRequest(vm_id=RUNNING, snapshot_id="e1"))
        yield self.call("DeleteSnapshot", node_pb2.DeleteSnapshotRequest(vm_id=RUNNING, snapshot_id="e1"))
        yield wait_for(lambda: len(ours()) == 3)
        self.assertEqual(
            ours(),
            [
                (node_pb2.EVENT_TYPE_SNAPSHOT_CREATED, RUNNING, {"snapshot_id": "e1"}),
                (node_pb2.EVENT_TYPE_SNAPSHOT_REVERTED, RUNNING, {"snapshot_id": "e1"}),
                (node_pb2.EVENT_TYPE_SNAPSHOT_DELETED, RUNNING, {"snapshot_id": "e1"}),
            ],
        )

    @defer.inlineCallbacks
    def test_quiesced_snapshot_freezes_and_thaws_through_the_agent(self):
        req = node_pb2.CreateSnapshotRequest(vm_id=RUNNING, name="q1", quiesce=True)
        # No agent connected: a consistent snapshot cannot be had, so none is taken.
        code, details = yield rpc_error(self.call("CreateSnapshot", req))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, details)
        listed = yield self.call("ListSnapshots", node_pb2.VMIdRequest(vm_id=RUNNING))
        self.assertEqual(list(listed.snapshots), [])

        peer = yield self.guest_on_running_vm()
        snap = yield self.call("CreateSnapshot", req)
        self.assertEqual(snap.snapshot_id, "q1")
        self.assertEqual(len(peer.requests_of("quiesce")), 1)
        self.assertEqual(peer.guest.thaws, 1)
        self.assertIsNone(peer.guest.freeze)

        # The guest refuses to freeze (already frozen): no snapshot.
        peer.guest.freeze = ("other", 0.0, ["/"])
        req.name = "q2"
        code, details = yield rpc_error(self.call("CreateSnapshot", req))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("already frozen", details)

    @defer.inlineCallbacks
    def guest_on_running_vm(self):
        """A reference guest peer on the running VM's agent socket, its channel open."""
        agents = self.daemon.node.agents
        os.makedirs(self.daemon.config.agent.socket_dir, exist_ok=True)
        peer = GuestPeer(reactor)
        port = reactor.listenUNIX(
            os.path.join(self.daemon.config.agent.socket_dir, f"{RUNNING}.agent.sock"), peer
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(peer.hang_up)
        agents.vm_started(RUNNING)
        yield wait_for(lambda: agents.is_channel_open(RUNNING))
        return peer

    @defer.inlineCallbacks
    def test_quiesced_snapshot_during_an_rpc_freeze(self):
        """QuiesceFilesystems and a quiesced snapshot share one owner: while the RPC's freeze is
        active the snapshot is refused without asking the guest, and the RPC's token still
        thaws; afterwards a quiesced snapshot freezes and thaws by itself."""
        peer = yield self.guest_on_running_vm()

        q = yield self.call("QuiesceFilesystems", node_pb2.QuiesceFilesystemsRequest(vm_id=RUNNING))
        self.assertTrue(q.success)
        req = node_pb2.CreateSnapshotRequest(vm_id=RUNNING, name="during", quiesce=True)
        code, details = yield rpc_error(self.call("CreateSnapshot", req))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("already frozen", details)
        self.assertEqual(len(peer.requests_of("quiesce")), 1)  # decided by the owner
        self.assertEqual(len(peer.requests_of("thaw")), 0)  # the RPC's freeze is untouched
        self.assertIsNotNone(peer.guest.freeze)

        t = yield self.call(
            "ThawFilesystems", node_pb2.ThawFilesystemsRequest(vm_id=RUNNING, quiesce_token=q.quiesce_token)
        )
        self.assertTrue(t.success)
        snap = yield self.call("CreateSnapshot", req)
        self.assertEqual(snap.snapshot_id, "during")
        self.assertEqual((len(peer.requests_of("quiesce")), peer.guest.thaws), (2, 2))
        self.assertIsNone(peer.guest.freeze)
        self.assertIsNone(self.daemon.node.quiesce.frozen(RUNNING))

    # -- hot-plug -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def _created_vm(self) -> str:
        vm_id = str(uuid.uuid4())
        req = node_pb2.CreateVMOnNodeRequest(vm_id=vm_id, name=f"qtx-{vm_id[:8]}", spec=spec())
        yield self.call("CreateVM", req)
        return vm_id

    # The test driver has no device hot-plug: attach/detach/media succeed in the integration tier
    # (test_vm_qemu); here only what is decided before libvirt is asked.

    @defer.inlineCallbacks
    def test_hotplug_errors(self):
        vm_id = yield self._created_vm()
        for method, req, want in [
            ("AttachNIC", node_pb2.AttachNICRequest(vm_id=vm_id), grpc.StatusCode.INVALID_ARGUMENT),
            ("AttachDisk", node_pb2.AttachDiskRequest(vm_id=vm_id), grpc.StatusCode.INVALID_ARGUMENT),
            (
                "AttachNIC",
                node_pb2.AttachNICRequest(vm_id=vm_id, nic=node_pb2.NicSpec(mac_address="01:00:00:00:00:01")),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            ("DetachNIC", node_pb2.DetachNICRequest(vm_id=vm_id, nic_id="eth9"), grpc.StatusCode.NOT_FOUND),
            ("DetachDisk", node_pb2.DetachDiskRequest(vm_id=vm_id, disk_id="d9"), grpc.StatusCode.NOT_FOUND),
            (
                "ChangeMedia",
                node_pb2.ChangeMediaRequest(vm_id=vm_id, device="sdz"),
                grpc.StatusCode.NOT_FOUND,
            ),
        ]:
            code, details = yield rpc_error(self.call(method, req))
            self.assertEqual(code, want, (method, details))
        media = yield self.define(plain_domain("qtx-media", str(uuid.uuid4())))
        missing = os.path.join(self.daemon.config.storage.iso_images, "x.iso")
        code, details = yield rpc_error(
            self.call("ChangeMedia", node_pb2.ChangeMediaRequest(vm_id=media, device="sda", iso_path=missing))
        )
        self.assertEqual((code, details), (grpc.StatusCode.NOT_FOUND, f"ISO not found: {missing}"))
        code, details = yield rpc_error(
            self.call(
                "ChangeMedia", node_pb2.ChangeMediaRequest(vm_id=media, device="sda", iso_path="/no/x.iso")
            )
        )
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)  # outside the storage locations
        self.assertNotIn("not found", details)


class HypervisorDownTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unavailable_while_libvirt_is_down(self):
        # libxml2 inside libvirt warns about the missing file ("failed to load external entity").
        capture_stderr(self)
        daemon = Daemon(self, **{"hypervisor.uri": "test:///no/such/node.xml"})
        yield daemon.start(wait_connected=False)
        for method, req in [
            ("StartVM", node_pb2.VMIdRequest(vm_id=RUNNING)),
            ("ListVMs", empty_pb2.Empty()),
            ("CreateVM", node_pb2.CreateVMOnNodeRequest(vm_id=str(uuid.uuid4()), name="x", spec=spec())),
        ]:
            code, details = yield rpc_error(daemon.call(method, req))
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE, method)
            self.assertIn("hypervisor unavailable", details)
