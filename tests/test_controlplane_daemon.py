"""The daemon registered with the fake control plane: real NodeService, real HTTP, real gRPC.

The conversions the link's data sources make are tested on their own first; then a daemon on
the private test-driver host registers, syncs its VMs, heartbeats, and sets up and releases a
pool the control plane assigns.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import grpc
import libvirt
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from quantix import config as cfg
from quantix import errors
from quantix.controlplane import sources, state
from quantix.controlplane.facts import VMFacts
from quantix.hypervisor import hostinfo
from quantix.hypervisor.storage import manager as sm
from quantix.hypervisor.storage import wire as storage_wire
from quantix.node import NodeService
from quantix.proto import node_pb2, storage_pb2
from quantix.rpc.server import SERVICE
from tests.fakecp import FakeControlPlane, FakeCPServer
from tests.support import Daemon, wait_for

Backend = storage_pb2.StorageBackend
POOL_ID = "0f6e7c1a-5b2d-4c3e-9f80-1a2b3c4d5e6f"


def cp_pool(backend: storage_pb2.StorageBackend, pool_id: str = POOL_ID) -> storage_pb2.StoragePool:
    return storage_pb2.StoragePool(
        id=pool_id, name="qtx-test-pool", spec=storage_pb2.StoragePoolSpec(backend=backend)
    )


class PoolConversionTests(unittest.TestCase):
    """GetPool's StoragePool → the InitStoragePool request the control plane would send."""

    def convert(self, backend: storage_pb2.StorageBackend) -> node_pb2.InitStoragePoolRequest:
        return sources.init_pool_request(cp_pool(backend))

    def test_local_dir(self) -> None:
        req = self.convert(
            Backend(type=Backend.LOCAL_DIR, local_dir=storage_pb2.LocalDirConfig(path="/srv/p"))
        )
        self.assertEqual(req.pool_id, POOL_ID)
        self.assertEqual(req.type, node_pb2.STORAGE_POOL_TYPE_LOCAL_DIR)
        self.assertEqual(req.config.local.path, "/srv/p")
        plain = storage_wire.pool_request(req)
        self.assertEqual((plain.type, plain.local_path), (sm.LOCAL_DIR, "/srv/p"))

    def test_absent_type_is_a_local_dir(self) -> None:
        # protobuf JSON leaves out enum zero (CEPH_RBD): without Ceph settings it is a directory.
        req = self.convert(Backend())
        self.assertEqual(req.type, node_pb2.STORAGE_POOL_TYPE_LOCAL_DIR)
        self.assertEqual(req.config.local.path, "")
        req = self.convert(Backend(local_dir=storage_pb2.LocalDirConfig(path="/srv/q")))
        self.assertEqual((req.type, req.config.local.path), (node_pb2.STORAGE_POOL_TYPE_LOCAL_DIR, "/srv/q"))
        req = self.convert(Backend(nfs=storage_pb2.NfsConfig(server="nas", export_path="/e")))
        self.assertEqual(req.type, node_pb2.STORAGE_POOL_TYPE_NFS)

    def test_nfs(self) -> None:
        nfs = storage_pb2.NfsConfig(
            server="nas1", export_path="/export/vms", version="4.1", options="noatime", mount_point="/mnt/x"
        )
        req = self.convert(Backend(type=Backend.NFS, nfs=nfs))
        self.assertEqual(req.type, node_pb2.STORAGE_POOL_TYPE_NFS)
        plain = storage_wire.pool_request(req)
        self.assertEqual(
            (plain.nfs_server, plain.nfs_export, plain.nfs_version, plain.nfs_options, plain.nfs_mount_point),
            ("nas1", "/export/vms", "4.1", "noatime", "/mnt/x"),
        )

    def test_ceph(self) -> None:
        ceph = storage_pb2.CephConfig(
            cluster_id="c1",
            pool_name="rbd",
            monitors=["10.0.0.1:6789", "10.0.0.2"],
            user="qtx",
            keyring_path="/etc/ceph/k",
            namespace="ns",
            secret_uuid="6a0e7a40-1111-2222-3333-444455556666",
        )
        req = self.convert(Backend(type=Backend.CEPH_RBD, ceph=ceph))
        self.assertEqual(req.type, node_pb2.STORAGE_POOL_TYPE_CEPH_RBD)
        c = req.config.ceph
        self.assertEqual(
            (c.cluster_id, c.pool_name, list(c.monitors), c.user, c.keyring_path, c.namespace, c.secret_uuid),
            ("c1", "rbd", ["10.0.0.1:6789", "10.0.0.2"], "qtx", "/etc/ceph/k", "ns", ceph.secret_uuid),
        )

    def test_iscsi(self) -> None:
        iscsi = storage_pb2.IscsiConfig(
            portal="10.0.0.9:3260",
            target="iqn.2024-01.x:t",
            chap_enabled=True,
            chap_user="u",
            chap_password="p",
            lun=3,
            volume_group="vg",
        )
        req = self.convert(Backend(type=Backend.ISCSI, iscsi=iscsi))
        self.assertEqual(req.type, node_pb2.STORAGE_POOL_TYPE_ISCSI)
        i = req.config.iscsi
        self.assertEqual(
            (i.portal, i.target, i.chap_enabled, i.chap_user, i.chap_password, i.lun, i.volume_group),
            ("10.0.0.9:3260", "iqn.2024-01.x:t", True, "u", "p", 3, "vg"),
        )

    def test_unsupported_types_are_named(self) -> None:
        for backend, name in ((Backend.CEPH_CEPHFS, "CEPH_FS"), (Backend.LOCAL_LVM, "LOCAL_LVM")):
            req = self.convert(Backend(type=backend))
            with self.assertRaises(errors.Invalid) as caught:
                storage_wire.pool_request(req)
            self.assertIn(name, str(caught.exception))

    def test_pool_without_id(self) -> None:
        self.assertRaises(errors.Invalid, sources.init_pool_request, storage_pb2.StoragePool())


class FactsTests(unittest.TestCase):
    def test_vm_facts_from_bulk_stats(self) -> None:
        records = [
            (
                "u1",
                "web",
                {
                    "state.state": libvirt.VIR_DOMAIN_RUNNING,
                    "vcpu.current": 4,
                    "vcpu.maximum": 8,
                    "balloon.current": 1048576,
                    "balloon.maximum": 2097152,
                    "block.count": 3,
                    "block.0.path": "/var/lib/limiquantix/vms/web.qcow2",
                    "block.1.name": "sda",  # an empty CD-ROM: no path
                    "block.2.path": "rbd/web-data",
                },
            ),
            (
                "u2",
                "db",
                {"state.state": libvirt.VIR_DOMAIN_PAUSED, "vcpu.maximum": 2, "balloon.maximum": 524288},
            ),
        ]
        self.assertEqual(
            sources.vm_facts(records),
            [
                VMFacts(
                    id="u1",
                    name="web",
                    state="running",
                    cpu_cores=4,
                    memory_mib=2048,
                    disk_paths=("/var/lib/limiquantix/vms/web.qcow2", "rbd/web-data"),
                ),
                VMFacts(id="u2", name="db", state="paused", cpu_cores=2, memory_mib=512),
            ],
        )

    def test_vm_facts_fallback_for_state_only_drivers(self) -> None:
        asked: list[str] = []

        def fallback(uuid: str) -> tuple[int, int]:
            asked.append(uuid)
            return 2, 262144

        facts = sources.vm_facts([("u3", "x", {"state.state": libvirt.VIR_DOMAIN_SHUTOFF})], fallback)
        self.assertEqual(facts, [VMFacts(id="u3", name="x", state="stopped", cpu_cores=2, memory_mib=256)])
        self.assertEqual(asked, ["u3"])

    def test_state_names(self) -> None:
        self.assertEqual(
            [sources.state_name(s) for s in range(8)],
            ["unknown", "running", "running", "paused", "running", "stopped", "crashed", "suspended"],
        )
        self.assertEqual(sources.state_name(99), "unknown")

    def test_vm_change(self) -> None:
        self.assertEqual(
            sources.vm_change("u", "n", "running"), (VMFacts(id="u", name="n", state="running"), "updated")
        )
        self.assertEqual(sources.vm_change("u", "n", "pm")[0].state, "suspended")
        self.assertEqual(sources.vm_change("u", "n", "other")[0].state, "unknown")
        self.assertEqual(sources.vm_change("u", "n", None)[1], "deleted")

    def test_disk_kinds(self) -> None:
        self.assertEqual(sources.disk_kind("/dev/nvme0n1p2", "0"), "NVME")
        self.assertEqual(sources.disk_kind("/dev/sda1", "0\n"), "SSD")
        self.assertEqual(sources.disk_kind("/dev/sdb", "1\n"), "HDD")
        self.assertEqual(sources.disk_kind("/dev/vda", None), "HDD")

    def test_storage_devices(self) -> None:
        disks = [
            hostinfo.DiskFacts("/dev/sda1", "/", "ext4", 100, 40, 60),
            hostinfo.DiskFacts("/dev/sda1", "/var/snap", "ext4", 100, 40, 60),
            hostinfo.DiskFacts("overlay", "/", "overlay", 5, 1, 4),
            hostinfo.DiskFacts("/dev/nvme0n1p1", "/data", "xfs", 900, 0, 900),
        ]
        devices = sources.storage_devices(disks, lambda dev: "0")
        self.assertEqual(
            [(d.path, d.size_bytes, d.kind) for d in devices],
            [
                ("/dev/sda1", 100, "SSD"),
                ("/dev/nvme0n1p1", 900, "NVME"),
            ],
        )

    def test_network_devices_skip_guest_ends(self) -> None:
        nics = [
            hostinfo.NicFacts("eno1", "52:54:00:aa:bb:cc", ("10.0.0.5",), 10000, True),
            hostinfo.NicFacts("vnet3", "fe:54:00:00:00:01", (), 10, True),
            hostinfo.NicFacts("virbr0", "52:54:00:00:00:02", ("192.168.122.1",), 0, True),
            hostinfo.NicFacts("br0", "52:54:00:00:00:03", (), -1, True),
        ]
        devices = sources.network_devices(
            nics,
            mtu=lambda name: 9000 if name == "eno1" else None,
            driver=lambda name: "ixgbe" if name == "eno1" else "",
            sriov=lambda name: name == "eno1",
        )
        self.assertEqual(
            [(d.name, d.mac_address, d.driver, d.speed_mbps, d.mtu, d.sriov_capable) for d in devices],
            [
                ("eno1", "52:54:00:aa:bb:cc", "ixgbe", 10000, 9000, True),
                ("br0", "52:54:00:00:00:03", "", 0, 1500, False),
            ],
        )

    def test_pool_reports_cover_pools_the_control_plane_knows(self) -> None:
        def info(pool_id: str, active: bool = True, total: int = 100, available: int = 60) -> sm.PoolInfo:
            return sm.PoolInfo(
                pool_id,
                sm.LOCAL_DIR,
                "dir",
                f"/p/{pool_id}",
                "",
                "",
                total,
                available,
                total - available,
                2,
                active,
            )

        reports = sources.pool_reports(
            [
                info(POOL_ID),
                info("quantix-vms-1234abcd"),  # the daemon's own VM-disk pool
                info("assigned-by-name", available=0),
                info("6d1b0a8e-0000-4000-8000-000000000001", active=False),
                info("6d1b0a8e-0000-4000-8000-000000000002", total=0, available=0),
            ],
            assigned={"assigned-by-name"},
        )
        self.assertEqual(
            [(r.pool_id, r.health, r.mount_path) for r in reports],
            [
                (POOL_ID, "HEALTHY", f"/p/{POOL_ID}"),
                ("assigned-by-name", "DEGRADED", "/p/assigned-by-name"),
                (
                    "6d1b0a8e-0000-4000-8000-000000000001",
                    "UNMOUNTED",
                    "/p/6d1b0a8e-0000-4000-8000-000000000001",
                ),
                ("6d1b0a8e-0000-4000-8000-000000000002", "ERROR", "/p/6d1b0a8e-0000-4000-8000-000000000002"),
            ],
        )
        self.assertEqual(reports[0].used_bytes, 40)
        self.assertEqual(reports[2].error_message, "pool is not active on this host")

    def test_pool_users(self) -> None:
        domains = [
            ("web", ["/pools/a/web.qcow2"]),
            ("db", ["/elsewhere/db.qcow2", "/pools/a/sub/extra.raw"]),
            ("cache", ["/pools/ab/cache.qcow2", "rbd/x"]),
            ("rbd-user", ["rbd/vol1"]),
        ]
        self.assertEqual(sm.pool_users([], "/pools/a/", domains), ["web", "db"])
        self.assertEqual(sm.pool_users(["rbd/vol1"], "", domains), ["rbd-user"])
        self.assertEqual(sm.pool_users([], "", domains), [])


class ConfigTests(unittest.TestCase):
    def test_control_plane_keys(self) -> None:
        c = cfg.load(
            None,
            environ={},
            flags={"control-plane": "https://cp:8443", "register": True},
        )
        self.assertEqual((c.control_plane_url, c.auto_register), ("https://cp:8443", True))
        self.assertEqual(c.control_plane.startup_jitter, 5.0)
        with self.assertRaises(cfg.ConfigError) as caught:
            cfg.load(None, environ={}, flags={"control-plane": "cp:8080"})
        self.assertIn("--control-plane", str(caught.exception))
        with self.assertRaises(cfg.ConfigError):
            cfg.load(None, environ={"QUANTIX_CONTROL_PLANE_STARTUP_JITTER": "-1"})


def disk_domain_xml(name: str, disk_path: str) -> str:
    """A running test-driver domain with one file disk."""
    dom = ET.Element("domain", type="test")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory").text = "65536"
    ET.SubElement(dom, "vcpu").text = "1"
    ET.SubElement(ET.SubElement(dom, "os"), "type", arch="x86_64").text = "hvm"
    disk = ET.SubElement(ET.SubElement(dom, "devices"), "disk", type="file", device="disk")
    ET.SubElement(disk, "source", file=disk_path)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    return ET.tostring(dom, encoding="unicode")


def daemon_sources(node: NodeService) -> sources.DaemonSources:
    """The link's data sources over a daemon's own boxes, as the node wires them."""
    return sources.DaemonSources(node.reactor, node.config, node.host, node.hypervisor, node.storage)


class PoolAdapterTests(unittest.TestCase):
    """ensure_pool / release_pool on a daemon's libvirt, without a control plane."""

    timeout = 30

    @defer.inlineCallbacks
    def test_release_keeps_a_pool_a_running_vm_uses(self) -> Any:
        daemon = yield Daemon(self).start()
        srcs = daemon_sources(daemon.node)
        path = os.path.join(daemon.config.storage.root, "busy-pool")
        backend = Backend(type=Backend.LOCAL_DIR, local_dir=storage_pb2.LocalDirConfig(path=path))
        info = yield srcs.ensure_pool(cp_pool(backend))
        self.assertEqual((info.pool_id, info.mount_path, info.active), (POOL_ID, path, True))

        conn = daemon.node.hypervisor.conn()
        dom = yield threads.deferToThread(
            conn.createXML, disk_domain_xml("qtx-test-busy", os.path.join(path, "d.qcow2")), 0
        )
        exc = yield self.assertFailure(srcs.release_pool(POOL_ID), errors.WrongState)
        self.assertIn("qtx-test-busy", str(exc))
        reply = yield daemon.call("ListStoragePools", empty_pb2.Empty())
        self.assertIn(POOL_ID, {p.pool_id for p in reply.pools})

        yield threads.deferToThread(dom.destroy)
        yield srcs.release_pool(POOL_ID)
        reply = yield daemon.call("ListStoragePools", empty_pb2.Empty())
        self.assertNotIn(POOL_ID, {p.pool_id for p in reply.pools})
        # Releasing again (a pool already gone) is fine.
        yield srcs.release_pool(POOL_ID)

    @defer.inlineCallbacks
    def test_sample_and_reports_while_libvirt_is_down(self) -> Any:
        daemon = Daemon(self)
        srcs = daemon_sources(daemon.node)
        # Not started: no libvirt connection. The heartbeat still has something to send.
        sample = yield srcs.heartbeat_sample()
        self.assertEqual(sample.running_vm_count, 0)
        self.assertGreater(sample.memory_total_mib, 0)
        reports = yield srcs.pool_reports()
        self.assertEqual(reports, [])
        yield self.assertFailure(srcs.facts(), errors.HypervisorDown)


class ProbingControlPlane(FakeControlPlane):
    """Checks, while answering RegisterNode, that the daemon's gRPC server already serves."""

    def __init__(self) -> None:
        super().__init__()
        self.node: Any = None
        self.probes: list[Any] = []

    def _register(self, req: Any) -> Any:
        port = self.node.grpc.port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE.full_name), timeout=5
                )
                self.probes.append(reply.status)
            except grpc.RpcError as exc:
                self.probes.append(exc.code())
        return super()._register(req)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonRegistrationTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.cp = ProbingControlPlane()
        self.server = FakeCPServer(reactor, self.cp)
        self.server.start()
        self.addCleanup(self.server.stop)

    def make_daemon(self, url: str | None = None, **overrides: Any) -> Daemon:
        values = {
            "control_plane_url": url or self.server.url,
            "auto_register": True,
            "control_plane.heartbeat_interval": 0.2,
            "control_plane.startup_jitter": 0,
            "node.labels": {"rack": "r1", "qtx-test": "yes"},
        }
        values.update(overrides)
        daemon = Daemon(self, **values)
        self.cp.node = daemon.node
        return daemon

    def heartbeats(self, predicate: Any = lambda body: True) -> list[dict[str, Any]]:
        return [r.body for r in self.cp.calls("UpdateHeartbeat") if predicate(r.body)]

    @defer.inlineCallbacks
    def pool_ids(self, daemon: Daemon) -> Any:
        reply = yield daemon.call("ListStoragePools", empty_pb2.Empty())
        return {p.pool_id for p in reply.pools}

    @defer.inlineCallbacks
    def until_pools(self, daemon: Daemon, predicate: Any, limit: float = 10.0) -> Any:
        waited = 0.0
        while True:
            ids = yield self.pool_ids(daemon)
            if predicate(ids):
                return ids
            if waited > limit:
                self.fail(f"pools never matched: {sorted(ids)}")
            yield task.deferLater(reactor, 0.05, lambda: None)
            waited += 0.05

    @defer.inlineCallbacks
    def test_registers_syncs_and_keeps_heartbeating(self) -> Any:
        daemon = self.make_daemon()
        yield daemon.start()
        yield self.cp.wait_for(lambda: len(self.heartbeats(lambda b: b.get("runningVmCount") == 1)) >= 3)

        self.assertEqual(self.cp.probes, [health_pb2.HealthCheckResponse.SERVING])
        self.assertEqual(self.cp.methods()[:2], ["RegisterNode", "SyncNodeVMs"])
        self.assertEqual(len(self.cp.calls("RegisterNode")), 1)

        body = self.cp.calls("RegisterNode")[0].body
        self.assertEqual(body["role"], {"compute": True})
        cpu = body["cpuInfo"]
        # tests/fixtures/node.xml: 2 sockets x 2 cores x 2 threads at 2400 MHz.
        self.assertEqual((cpu["sockets"], cpu["coresPerSocket"], cpu["threadsPerCore"]), (2, 2, 2))
        self.assertEqual(cpu["frequencyMhz"], "2400")
        self.assertGreater(int(body["memoryInfo"]["totalBytes"]), 0)
        self.assertEqual(body["hostname"], socket.gethostname())
        self.assertTrue(body["managementIp"])
        self.assertEqual(body["labels"], {"rack": "r1", "qtx-test": "yes"})

        vms = {vm["id"]: vm for vm in self.cp.calls("SyncNodeVMs")[0].body["vms"]}
        self.assertEqual(
            {vid: (vm["name"], vm["state"]) for vid, vm in vms.items()},
            {
                "11111111-2222-3333-4444-555555555555": ("vm-running", "running"),
                "66666666-7777-8888-9999-000000000000": ("vm-stopped", "stopped"),
            },
        )
        self.assertEqual(vms["11111111-2222-3333-4444-555555555555"]["memoryMib"], "256")
        self.assertEqual(vms["11111111-2222-3333-4444-555555555555"]["cpuCores"], 1)

        link = daemon.node.cplink
        cp_id = self.cp.nodes[socket.gethostname()]
        self.assertTrue(link.registered)
        self.assertEqual(link.node_id, cp_id)
        self.assertTrue(all(b["nodeId"] == cp_id for b in self.heartbeats()))
        beat = self.heartbeats()[-1]
        self.assertGreater(int(beat["memoryTotalMib"]), 0)
        self.assertGreater(int(beat["diskTotalBytes"]), 0)

        # A state change is pushed once; the answer `unimplemented` (today's control plane) stops it.
        conn = daemon.node.hypervisor.conn()
        dom = yield threads.deferToThread(conn.lookupByUUIDString, "11111111-2222-3333-4444-555555555555")
        yield threads.deferToThread(dom.suspend)
        yield self.cp.wait_for(lambda: len(self.cp.calls("NotifyVMChange")) == 1)
        change = self.cp.calls("NotifyVMChange")[0].body
        self.assertEqual(change["nodeId"], cp_id)
        self.assertEqual(change["eventType"], "VM_CHANGE_UPDATED")
        self.assertEqual(
            change["vm"],
            {
                "id": "11111111-2222-3333-4444-555555555555",
                "name": "vm-running",
                "state": "VM_POWER_STATE_PAUSED",
            },
        )
        yield link.idle()  # the answer has reached the link
        yield threads.deferToThread(dom.resume)
        seen = len(self.heartbeats())
        yield self.cp.wait_for(lambda: len(self.heartbeats()) >= seen + 2)
        self.assertEqual(len(self.cp.calls("NotifyVMChange")), 1)

        # The control plane's id is kept for the control plane; GetNodeInfo keeps the daemon's own.
        stored = json.loads((Path(daemon.config.state_dir) / state.FILENAME).read_text())
        self.assertEqual(stored["node_id"], cp_id)
        info = yield daemon.call("GetNodeInfo", empty_pb2.Empty())
        self.assertEqual(info.node_id, daemon.node.node_id)

    @defer.inlineCallbacks
    def test_assigned_pool_is_set_up_and_released(self) -> Any:
        daemon = self.make_daemon()
        path = os.path.join(daemon.config.storage.root, "assigned-pool")
        backend = Backend(type=Backend.LOCAL_DIR, local_dir=storage_pb2.LocalDirConfig(path=path))
        self.cp.pools[POOL_ID] = cp_pool(backend)
        self.cp.assigned_pool_ids = [POOL_ID]
        yield daemon.start()

        yield self.until_pools(daemon, lambda ids: POOL_ID in ids)
        self.assertTrue(os.path.isdir(path))
        self.assertEqual([r.body for r in self.cp.calls("GetPool")], [{"id": POOL_ID}])
        yield wait_for(lambda: POOL_ID in daemon.node.cplink.assigned_pools)
        yield self.cp.wait_for(
            lambda: any(
                p["poolId"] == POOL_ID and p["health"] == "HEALTH_HEALTHY"
                for b in self.heartbeats()
                for p in b.get("storagePools", [])
            )
        )
        # Only pools the control plane knows are reported, not the daemon's own VM-disk pool.
        reported = {p["poolId"] for b in self.heartbeats() for p in b.get("storagePools", [])}
        self.assertEqual(reported, {POOL_ID})

        self.cp.assigned_pool_ids = []
        yield self.until_pools(daemon, lambda ids: POOL_ID not in ids)
        yield wait_for(lambda: POOL_ID not in daemon.node.cplink.assigned_pools)
        stored = json.loads((Path(daemon.config.state_dir) / state.FILENAME).read_text())
        self.assertEqual(stored["pools"], [])
        self.assertFalse(os.path.exists(path))  # an empty directory under storage.root goes too

    @defer.inlineCallbacks
    def test_health_is_independent_of_a_dead_control_plane(self) -> Any:
        daemon = self.make_daemon(url=f"http://127.0.0.1:{free_port()}")
        yield daemon.start()
        link = daemon.node.cplink
        yield wait_for(lambda: link.last_error is not None)
        reply = yield daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        self.assertTrue(reply.healthy)
        self.assertFalse(link.registered)
        self.assertIn("unavailable", link.last_error)

    @defer.inlineCallbacks
    def test_no_link_without_register(self) -> Any:
        daemon = Daemon(self, control_plane_url=self.server.url)
        yield daemon.start()
        self.assertIsNone(daemon.node.cplink)
        self.assertEqual(self.cp.requests, [])

    def test_unreadable_ca_bundle_is_one_line(self) -> None:
        err = io.StringIO()
        self.patch(sys, "__stderr__", err)
        missing = os.path.join(self.mktemp(), "missing.pem")
        with self.assertRaises(SystemExit):
            Daemon(
                self,
                control_plane_url="https://127.0.0.1:1",
                auto_register=True,
                **{"control_plane.ca_bundle": missing},
            )
        self.assertEqual(
            err.getvalue(), f"quantix-node: control_plane.ca_bundle {missing}: No such file or directory\n"
        )
