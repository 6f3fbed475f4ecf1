"""Storage RPCs end to end: a real daemon, a real grpc client, libvirt's test driver and, in the
integration tier, the real libvirtd (real qcow2 volumes, real NFS/iSCSI/Ceph failures)."""

from __future__ import annotations

import os
import uuid

import grpc
import libvirt
from google.protobuf import empty_pb2
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.proto import node_pb2
from tests.libvirtd import real_libvirt_uri
from tests.support import Daemon, rpc_error

LOCAL_DIR, NFS, CEPH_RBD, CEPH_FS, ISCSI = 1, 3, 4, 5, 6
MIB = 1 << 20


def local_pool(pool_id: str, path: str = "") -> node_pb2.InitStoragePoolRequest:
    config = node_pb2.StoragePoolConfig(local=node_pb2.LocalDirPoolConfig(path=path))
    return node_pb2.InitStoragePoolRequest(pool_id=pool_id, type=LOCAL_DIR, config=config)


def vol(pool_id: str, volume_id: str) -> node_pb2.VolumeIdRequest:
    return node_pb2.VolumeIdRequest(pool_id=pool_id, volume_id=volume_id)


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


class TestDriverStorageTests(unittest.TestCase):
    """The test driver keeps volumes in memory: files are not created, resize is unsupported."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = yield Daemon(self).start()
        self.root = self.daemon.config.storage.root

    @defer.inlineCallbacks
    def test_local_pool_lifecycle(self):
        d = self.daemon
        first = yield d.call("InitStoragePool", local_pool("p1"))
        path = os.path.join(self.root, "pools", "p1")
        self.assertEqual((first.pool_id, first.type, first.mount_path), ("p1", LOCAL_DIR, path))
        self.assertTrue(os.path.isdir(path))
        self.assertGreater(first.total_bytes, 0)
        again = yield d.call("InitStoragePool", local_pool("p1"))  # idempotent
        self.assertEqual((again.pool_id, again.mount_path), ("p1", path))
        info = yield d.call("GetStoragePoolInfo", node_pb2.StoragePoolIdRequest(pool_id="p1"))
        self.assertEqual((info.type, info.volume_count), (LOCAL_DIR, 0))
        self.assertEqual(info.used_bytes, info.total_bytes - info.available_bytes)
        listing = yield d.call("ListStoragePools", empty_pb2.Empty())
        self.assertIn("p1", [p.pool_id for p in listing.pools])
        conn = d.node.hypervisor.conn()
        pool = conn.storagePoolLookupByName("p1")
        self.assertTrue(pool.isPersistent() and pool.autostart() and pool.isActive())
        yield d.call("DestroyStoragePool", node_pb2.StoragePoolIdRequest(pool_id="p1"))
        self.assertNotIn("p1", [p.name() for p in conn.listAllStoragePools(0)])
        self.assertFalse(os.path.exists(path))  # the empty default directory goes too
        yield d.call("DestroyStoragePool", node_pb2.StoragePoolIdRequest(pool_id="p1"))  # unknown: fine

    @defer.inlineCallbacks
    def test_concurrent_init_is_idempotent(self):
        replies = yield defer.gatherResults(
            [self.daemon.call("InitStoragePool", local_pool("pc")) for _ in range(4)], consumeErrors=True
        )
        self.assertEqual({r.pool_id for r in replies}, {"pc"})

    @defer.inlineCallbacks
    def test_changed_definition_of_active_pool(self):
        yield self.daemon.call("InitStoragePool", local_pool("pd"))
        other = os.path.join(self.daemon.tmp, "elsewhere")
        code, details = yield rpc_error(self.daemon.call("InitStoragePool", local_pool("pd", other)))
        self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)
        self.assertIn("different definition", details)
        # Stopped, the same request redefines it (keeping its identity) and starts it again.
        conn = self.daemon.node.hypervisor.conn()
        before = conn.storagePoolLookupByName("pd").UUIDString()
        conn.storagePoolLookupByName("pd").destroy()
        reply = yield self.daemon.call("InitStoragePool", local_pool("pd", other))
        self.assertEqual(reply.mount_path, other)
        self.assertEqual(conn.storagePoolLookupByName("pd").UUIDString(), before)

    @defer.inlineCallbacks
    def test_reserved_and_bad_ids(self):
        for pid in ("default", "a/b", "..", ""):
            code, _ = yield rpc_error(self.daemon.call("InitStoragePool", local_pool(pid)))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, pid)
        code, _ = yield rpc_error(
            self.daemon.call("DestroyStoragePool", node_pb2.StoragePoolIdRequest(pool_id="default"))
        )
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)

    @defer.inlineCallbacks
    def test_missing_pool_is_not_found(self):
        for method, req in (
            ("GetStoragePoolInfo", node_pb2.StoragePoolIdRequest(pool_id="nope")),
            ("ListStoragePoolFiles", node_pb2.ListStoragePoolFilesRequest(pool_id="nope")),
            ("ListVolumes", node_pb2.ListVolumesRequest(pool_id="nope")),
            ("DeleteVolume", vol("nope", "v")),
        ):
            code, details = yield rpc_error(self.daemon.call(method, req))
            self.assertEqual(code, grpc.StatusCode.NOT_FOUND, method)
            self.assertIn("not found", details, method)

    @defer.inlineCallbacks
    def test_unsupported_types_are_invalid(self):
        for number, name in ((0, "UNSPECIFIED"), (2, "LOCAL_LVM"), (CEPH_FS, "CEPH_FS"), (42, "42")):
            req = node_pb2.InitStoragePoolRequest(pool_id="u", type=number)
            code, details = yield rpc_error(self.daemon.call("InitStoragePool", req))
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
            self.assertIn(name, details)

    @defer.inlineCallbacks
    def test_volumes(self):
        d = self.daemon
        yield d.call("InitStoragePool", local_pool("p2"))
        made = yield d.call(
            "CreateVolume", node_pb2.CreateVolumeRequest(pool_id="p2", volume_id="v1", size_bytes=4 * MIB)
        )
        self.assertEqual((made.volume_id, made.format, made.size_bytes), ("v1", "qcow2", 4 * MIB))
        self.assertEqual(made.path, os.path.join(self.root, "pools", "p2", "v1.qcow2"))
        code, _ = yield rpc_error(
            d.call("CreateVolume", node_pb2.CreateVolumeRequest(pool_id="p2", volume_id="v1", size_bytes=MIB))
        )
        self.assertEqual(code, grpc.StatusCode.ALREADY_EXISTS)
        yield d.call(
            "CloneVolume",
            node_pb2.CloneVolumeRequest(pool_id="p2", source_volume_id="v1", dest_volume_id="v2"),
        )
        yield d.call(
            "CreateVolumeSnapshot",
            node_pb2.CreateVolumeSnapshotRequest(pool_id="p2", volume_id="v1", snapshot_id="s1"),
        )
        from_snap = yield d.call(
            "CreateVolume",
            node_pb2.CreateVolumeRequest(pool_id="p2", volume_id="v3", source_type=3, source_id="s1"),
        )
        self.assertEqual(from_snap.size_bytes, 4 * MIB)
        listing = yield d.call("ListVolumes", node_pb2.ListVolumesRequest(pool_id="p2"))
        self.assertEqual([v.volume_id for v in listing.volumes], ["v1", "v2", "v3"])  # snapshots hidden
        attach = yield d.call("GetVolumeAttachInfo", vol("p2", "v2"))
        self.assertEqual(attach.path, os.path.join(self.root, "pools", "p2", "v2.qcow2"))
        self.assertIn("<source file=", attach.disk_xml)
        code, _ = yield rpc_error(
            d.call("ResizeVolume", node_pb2.ResizeVolumeRequest(pool_id="p2", volume_id="v1"))
        )
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)  # shrinking to 0
        yield d.call("DeleteVolume", vol("p2", "v1"))
        yield d.call("DeleteVolume", vol("p2", "v1"))  # already gone: fine
        code, _ = yield rpc_error(d.call("GetVolumeAttachInfo", vol("p2", "v1")))
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        names = yield threads.deferToThread(
            lambda: d.node.hypervisor.conn().storagePoolLookupByName("p2").listVolumes()
        )
        self.assertEqual(sorted(names), ["v2.qcow2", "v3.qcow2"])  # v1's snapshot went with it

    @defer.inlineCallbacks
    def test_pool_files(self):
        d = self.daemon
        yield d.call("InitStoragePool", local_pool("p3"))
        root = os.path.join(self.root, "pools", "p3")
        _write(os.path.join(root, "iso", "b.iso"), b"x")
        _write(os.path.join(root, "a.qcow2"), b"QFI\xfb")
        os.symlink("/etc", os.path.join(root, "etc-link"))
        reply = yield d.call(
            "ListStoragePoolFiles", node_pb2.ListStoragePoolFilesRequest(pool_id="p3", path="")
        )
        self.assertEqual([e.name for e in reply.entries], ["iso", "a.qcow2"])
        reply = yield d.call(
            "ListStoragePoolFiles", node_pb2.ListStoragePoolFilesRequest(pool_id="p3", path="iso")
        )
        self.assertEqual(reply.current_path, "iso")
        (entry,) = reply.entries
        self.assertEqual(
            (entry.path, entry.file_type, entry.is_directory, entry.size_bytes),
            ("iso/b.iso", "iso", False, 1),
        )
        self.assertRegex(entry.permissions, r"^[0-7]{3}$")
        for bad in ("..", "iso/../..", "/etc", "etc-link"):
            code, _ = yield rpc_error(
                d.call("ListStoragePoolFiles", node_pb2.ListStoragePoolFilesRequest(pool_id="p3", path=bad))
            )
            self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT, bad)

    @defer.inlineCallbacks
    def test_non_utf8_names_are_skipped_not_fatal(self):
        """An NFS share's names are the remote side's bytes: the rest is listed, with a warning."""
        d = self.daemon
        yield d.call("InitStoragePool", local_pool("p8"))
        root = os.path.join(self.root, "pools", "p8")
        _write(os.path.join(root, "good.qcow2"), b"QFI\xfb")
        with open(os.path.join(root.encode(), b"bad-\xff\xfe.qcow2"), "wb"):
            pass
        os.makedirs(os.path.join(root.encode(), b"dir-\xe9"))
        storage = d.config.storage
        _write(os.path.join(storage.cloud_images, "ok.qcow2"), b"QFI\xfb" + bytes(28))
        with open(os.path.join(storage.cloud_images.encode(), b"latin-\xe9.qcow2"), "wb"):
            pass
        listing = yield d.call("ListStoragePoolFiles", node_pb2.ListStoragePoolFilesRequest(pool_id="p8"))
        self.assertEqual([e.name for e in listing.entries], ["good.qcow2"])
        images = yield d.call("ListImages", empty_pb2.Empty())
        self.assertIn("ok.qcow2", [i.name for i in images.images])
        self.assertEqual(len(images.images), 1)

    @defer.inlineCallbacks
    def test_list_images(self):
        storage = self.daemon.config.storage
        _write(os.path.join(storage.iso_images, "os", "x.iso"), bytes(0x8001) + b"CD001")
        _write(os.path.join(storage.cloud_images, "c.qcow2"), b"QFI\xfb" + bytes(28))
        reply = yield self.daemon.call("ListImages", empty_pb2.Empty())
        by = {i.name: i for i in reply.images}
        self.assertEqual((by["x.iso"].format, by["c.qcow2"].format), ("iso", "qcow2"))
        self.assertEqual(by["x.iso"].path, os.path.join(storage.iso_images, "os", "x.iso"))
        again = yield self.daemon.call("ListImages", empty_pb2.Empty())
        self.assertEqual({i.name: i.image_id for i in again.images}, {n: i.image_id for n, i in by.items()})


# -- the real libvirtd ---------------------------------------------------------------------------

SYSTEM_URI = "qemu:///system"


class _SystemBase(unittest.TestCase):
    """Real pools on the shared libvirtd: unique names, everything undefined at teardown."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        real_libvirt_uri(SYSTEM_URI)
        self.daemon = yield Daemon(self, **{"hypervisor.uri": SYSTEM_URI}).start()
        self.conn = self.daemon.node.hypervisor.conn()
        self.prefix = f"qtx-test-{uuid.uuid4().hex[:8]}"
        self.addCleanup(self._undefine_ours)

    def _undefine_ours(self) -> defer.Deferred:
        mine = (self.prefix, self.daemon.node.storage.vm_pool_name)

        def clean():
            conn = libvirt.open(SYSTEM_URI)
            try:
                for pool in conn.listAllStoragePools(0):
                    if pool.name().startswith(mine):
                        if pool.isActive():
                            pool.destroy()
                        pool.undefine()
                for secret in conn.listAllSecrets(0):
                    if (secret.usageID() or "").startswith(f"quantix-{self.prefix}"):
                        secret.undefine()
            finally:
                conn.close()

        return threads.deferToThread(clean)

    def _pool_names(self) -> defer.Deferred:
        return threads.deferToThread(lambda: [p.name() for p in self.conn.listAllStoragePools(0)])


class SystemStorageTests(_SystemBase):
    @defer.inlineCallbacks
    def test_local_dir_real_volumes(self):
        d = self.daemon
        pid = f"{self.prefix}-local"
        path = os.path.join(d.tmp, "local-pool")
        info = yield d.call("InitStoragePool", local_pool(pid, path))
        self.assertEqual(info.mount_path, path)
        self.assertGreater(info.total_bytes, 0)
        yield d.call("InitStoragePool", local_pool(pid, path))
        made = yield d.call(
            "CreateVolume", node_pb2.CreateVolumeRequest(pool_id=pid, volume_id="v1", size_bytes=MIB)
        )
        with open(made.path, "rb") as fh:
            self.assertEqual(fh.read(4), b"QFI\xfb")
        yield d.call(
            "ResizeVolume", node_pb2.ResizeVolumeRequest(pool_id=pid, volume_id="v1", new_size_bytes=2 * MIB)
        )
        code, details = yield rpc_error(
            d.call(
                "ResizeVolume", node_pb2.ResizeVolumeRequest(pool_id=pid, volume_id="v1", new_size_bytes=MIB)
            )
        )
        self.assertEqual(code, grpc.StatusCode.INVALID_ARGUMENT)
        self.assertIn("shrink", details)
        yield d.call(
            "CloneVolume",
            node_pb2.CloneVolumeRequest(pool_id=pid, source_volume_id="v1", dest_volume_id="v2"),
        )
        yield d.call(
            "CreateVolumeSnapshot",
            node_pb2.CreateVolumeSnapshotRequest(pool_id=pid, volume_id="v1", snapshot_id="s1"),
        )
        yield d.call(
            "CreateVolume",
            node_pb2.CreateVolumeRequest(pool_id=pid, volume_id="v3", source_type=3, source_id="s1"),
        )
        image = os.path.join(d.config.storage.cloud_images, "base.img")
        _write(image, bytes(3 * MIB))
        images = yield d.call("ListImages", empty_pb2.Empty())
        (image_id,) = [i.image_id for i in images.images if i.name == "base.img"]
        from_image = yield d.call(
            "CreateVolume",
            node_pb2.CreateVolumeRequest(
                pool_id=pid, volume_id="v4", size_bytes=MIB, source_type=2, source_id=image_id
            ),
        )
        self.assertEqual(from_image.size_bytes, 3 * MIB)  # never smaller than its image
        listing = yield d.call("ListVolumes", node_pb2.ListVolumesRequest(pool_id=pid))
        sizes = {v.volume_id: v.size_bytes for v in listing.volumes}
        self.assertEqual(sizes, {"v1": 2 * MIB, "v2": 2 * MIB, "v3": 2 * MIB, "v4": 3 * MIB})
        xml = yield threads.deferToThread(
            lambda: self.conn.storagePoolLookupByName(pid).storageVolLookupByName("v4.qcow2").XMLDesc(0)
        )
        self.assertIn(os.path.realpath(image), xml)  # a qcow2 overlay on the image
        files = yield d.call("ListStoragePoolFiles", node_pb2.ListStoragePoolFilesRequest(pool_id=pid))
        self.assertEqual(
            [e.name for e in files.entries], ["v1.qcow2", "v1@s1.qcow2", "v2.qcow2", "v3.qcow2", "v4.qcow2"]
        )
        for volume_id in ("v1", "v2", "v3", "v4"):
            yield d.call("DeleteVolume", vol(pid, volume_id))
        self.assertEqual(os.listdir(path), [])
        yield d.call("DestroyStoragePool", node_pb2.StoragePoolIdRequest(pool_id=pid))
        self.assertNotIn(pid, (yield self._pool_names()))
        self.assertTrue(os.path.isdir(path))  # a given directory is never removed

    @defer.inlineCallbacks
    def test_vm_disk_api_and_default_pool_resize(self):
        d = self.daemon
        storage = d.node.storage
        vm, disk = uuid.uuid4().hex[:8], "d0"
        path = yield threads.deferToThread(storage.create_disk, None, f"{vm}-{disk}.qcow2", MIB)
        self.assertEqual(os.path.dirname(path), d.config.storage.vm_images)
        yield d.call(
            "ResizeVolume",
            node_pb2.ResizeVolumeRequest(pool_id="default", volume_id=vm, new_size_bytes=2 * MIB),
        )
        listing = yield d.call("ListVolumes", node_pb2.ListVolumesRequest(pool_id="default"))
        self.assertEqual([(v.path, v.size_bytes) for v in listing.volumes], [(path, 2 * MIB)])
        overlay = yield threads.deferToThread(storage.create_disk, "", "ov.qcow2", 0, backing_file=path)
        self.assertTrue(os.path.exists(overlay))
        self.assertTrue((yield threads.deferToThread(storage.delete_path, overlay)))
        self.assertTrue((yield threads.deferToThread(storage.delete_path, path)))
        self.assertFalse(os.path.exists(path))
        self.assertFalse((yield threads.deferToThread(storage.delete_path, path)))

    @defer.inlineCallbacks
    def _assert_clean_failure(self, req, codes=(grpc.StatusCode.UNAVAILABLE,)):
        code, details = yield rpc_error(self.daemon.call("InitStoragePool", req))
        self.assertIn(code, codes, details)
        self.assertIn(req.pool_id, details + req.pool_id)
        self.assertNotIn(req.pool_id, (yield self._pool_names()))
        return details

    @defer.inlineCallbacks
    def test_nfs_unreachable(self):
        pid = f"{self.prefix}-nfs"
        config = node_pb2.StoragePoolConfig(
            nfs=node_pb2.NfsPoolConfig(server="127.0.0.1", export_path="/exp")
        )
        req = node_pb2.InitStoragePoolRequest(pool_id=pid, type=NFS, config=config)
        details = yield self._assert_clean_failure(req)
        self.assertIn("mount", details)  # libvirt's reason, whatever mount.nfs said
        self.assertFalse(os.path.exists(os.path.join(self.daemon.config.storage.root, "mnt", f"nfs-{pid}")))

    @defer.inlineCallbacks
    def test_iscsi_unreachable(self):
        pid = f"{self.prefix}-iscsi"
        config = node_pb2.StoragePoolConfig(
            iscsi=node_pb2.IscsiPoolConfig(
                portal="127.0.0.1:1",
                target="iqn.2024-01.test:t",
                chap_enabled=True,
                chap_user="u",
                chap_password="p",
            )
        )
        req = node_pb2.InitStoragePoolRequest(pool_id=pid, type=ISCSI, config=config)
        details = yield self._assert_clean_failure(req)
        self.assertIn("iscsi", details.lower())
        secrets = yield threads.deferToThread(lambda: [s.usageID() for s in self.conn.listAllSecrets(0)])
        self.assertNotIn(f"quantix-{pid}", secrets)

    @defer.inlineCallbacks
    def test_ceph_unreachable(self):
        pid = f"{self.prefix}-ceph"
        keyring = os.path.join(self.daemon.config.storage.root, "ceph.keyring")
        _write(keyring, b"[client.admin]\n  key = QUJDREVGR0hJSktMTU5PUA==\n")
        config = node_pb2.StoragePoolConfig(
            ceph=node_pb2.CephPoolConfig(pool_name="rbd", monitors=["127.0.0.1:1"], keyring_path=keyring)
        )
        req = node_pb2.InitStoragePoolRequest(pool_id=pid, type=CEPH_RBD, config=config)
        # Without libvirt's rbd backend the definition is refused; with it, the cluster is unreachable.
        yield self._assert_clean_failure(
            req, (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
        )
        secrets = yield threads.deferToThread(lambda: [s.usageID() for s in self.conn.listAllSecrets(0)])
        self.assertNotIn(f"quantix-{pid}", secrets)


def _domain_xml(name: str, disk: str) -> str:
    import xml.etree.ElementTree as ET

    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = "64"
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64").text = "hvm"
    devices = ET.SubElement(dom, "devices")
    el = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(el, "driver", name="qemu", type="qcow2")
    ET.SubElement(el, "source", file=disk)
    ET.SubElement(el, "target", dev="vda", bus="virtio")
    return ET.tostring(dom, encoding="unicode")


class SystemRunningDiskTests(_SystemBase):
    """A disk held open by a running VM grows through the VM, not through qemu-img."""

    @defer.inlineCallbacks
    def test_resize_disk_of_running_vm(self):
        d = self.daemon
        vm = f"{self.prefix}-vm"
        path = yield threads.deferToThread(d.node.storage.create_disk, "default", f"{vm}-disk0.qcow2", MIB)

        def start():
            dom = self.conn.defineXML(_domain_xml(vm, path))
            self.addCleanup(threads.deferToThread, self._drop_domain, vm)
            dom.create()
            return dom

        dom = yield threads.deferToThread(start)
        yield d.call(
            "ResizeVolume",
            node_pb2.ResizeVolumeRequest(pool_id="default", volume_id="disk0", new_size_bytes=4 * MIB),
        )
        capacity = yield threads.deferToThread(lambda: dom.blockInfo("vda")[0])
        self.assertEqual(capacity, 4 * MIB)

    def _drop_domain(self, name: str) -> None:
        conn = libvirt.open(SYSTEM_URI)
        try:
            dom = conn.lookupByName(name)
            if dom.isActive():
                dom.destroy()
            dom.undefine()
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
