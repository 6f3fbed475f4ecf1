"""Files a request names: confined to the storage locations, never opened in a way that blocks
or reads without bound, and a VM disk never handed to a second VM (real gRPC, test driver)."""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET

import grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.hypervisor.storage import paths
from quantix.proto import node_pb2 as pb
from tests.support import Daemon, rpc_error

C = grpc.StatusCode


def ceph_pool(pool_id: str, keyring: str) -> pb.InitStoragePoolRequest:
    config = pb.StoragePoolConfig(
        ceph=pb.CephPoolConfig(pool_name="rbd", monitors=["192.0.2.1"], keyring_path=keyring)
    )
    return pb.InitStoragePoolRequest(pool_id=pool_id, type=pb.STORAGE_POOL_TYPE_CEPH_RBD, config=config)


def create(name: str, *disks: pb.DiskSpec) -> pb.CreateVMOnNodeRequest:
    vm_id = str(uuid.uuid4())
    return pb.CreateVMOnNodeRequest(
        vm_id=vm_id, name=f"{name}-{vm_id[:8]}", spec=pb.VMSpec(cpu_cores=1, memory_mib=64, disks=list(disks))
    )


class FileKindTests(unittest.TestCase):
    """FIFOs, devices and huge files inside the allowed locations: refused, never blocking."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = Daemon(self, **{"storage.allowed_paths": ("/dev/zero",)})
        yield self.daemon.start()
        storage = self.daemon.config.storage
        self.root = storage.root
        os.makedirs(storage.cloud_images, exist_ok=True)
        self.fifo = os.path.join(storage.cloud_images, "base.qcow2")
        os.mkfifo(self.fifo)

    def call(self, method, request):
        return rpc_error(self.daemon.call(method, request, timeout=10))

    @defer.inlineCallbacks
    def test_fifo_as_backing_file_is_refused_at_once(self):
        code, details = yield self.call(
            "CreateVM", create("fifo", pb.DiskSpec(id="d0", backing_file="base.qcow2"))
        )
        self.assertEqual(code, C.INVALID_ARGUMENT, details)
        self.assertIn("not a regular file", details)

    @defer.inlineCallbacks
    def test_fifo_char_device_and_huge_keyring_are_refused(self):
        code, details = yield self.call("InitStoragePool", ceph_pool("c1", self.fifo))
        self.assertEqual((code, "not a regular file" in details), (C.INVALID_ARGUMENT, True), details)
        code, details = yield self.call(
            "InitStoragePool", ceph_pool("c2", "/dev/zero")
        )  # allowed, but a device
        self.assertEqual((code, "not a regular file" in details), (C.INVALID_ARGUMENT, True), details)
        big = os.path.join(self.root, "big.keyring")
        with open(big, "wb") as fh:
            fh.truncate(paths.KEYRING_MAX_BYTES + 1)
        code, details = yield self.call("InitStoragePool", ceph_pool("c3", big))
        self.assertEqual((code, "larger than" in details), (C.INVALID_ARGUMENT, True), details)

    @defer.inlineCallbacks
    def test_symlink_out_of_the_storage_root_is_outside(self):
        link = os.path.join(self.root, "shadow.qcow2")
        os.symlink("/etc/shadow", link)
        code, details = yield self.call("CreateVM", create("link", pb.DiskSpec(id="d0", path=link)))
        self.assertEqual(code, C.INVALID_ARGUMENT)
        self.assertIn("outside the storage locations", details)

    def test_open_checked_never_blocks_on_a_fifo(self):
        """The primitive itself: a FIFO with no writer opens at once and is refused."""
        with self.assertRaises(Exception) as caught:
            paths.read_bounded("keyring", self.fifo, 100)
        self.assertIn("not a regular file", str(caught.exception))


class SharedDiskTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = yield Daemon(self).start()

    @defer.inlineCallbacks
    def disk_paths(self, vm_id: str) -> list[str]:
        xml = yield threads.deferToThread(
            lambda: self.daemon.node.hypervisor.conn().lookupByUUIDString(vm_id).XMLDesc(0)
        )
        return [s.get("file") for s in ET.fromstring(xml).iter("source") if s.get("file")]

    @defer.inlineCallbacks
    def test_relative_path_is_exact_and_another_vms_disk_is_refused(self):
        first = create("owner", pb.DiskSpec(id="d0", size_gib=1))
        yield self.daemon.call("CreateVM", first)
        (owned,) = yield self.disk_paths(first.vm_id)
        self.assertTrue(owned.endswith(f"{first.vm_id}-d0.qcow2"), owned)

        # "d0" ends the first VM's disk name: it used to be matched loosely and handed over.
        second = create("loose", pb.DiskSpec(id="x", path="d0", size_gib=1))
        yield self.daemon.call("CreateVM", second)
        (own,) = yield self.disk_paths(second.vm_id)
        self.assertNotEqual(own, owned)
        self.assertTrue(own.endswith("/d0.qcow2"), own)

        for path in (f"{first.vm_id}-d0", owned):  # the exact volume name, the absolute path
            third = create("thief", pb.DiskSpec(id="y", path=path))
            code, details = yield rpc_error(self.daemon.call("CreateVM", third))
            self.assertEqual(code, C.FAILED_PRECONDITION, details)
            self.assertIn(f"read-write by VM {first.vm_id}", details)
