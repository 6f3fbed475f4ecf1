"""A pool out of space answers RESOURCE_EXHAUSTED naming the pool and the sizes, never INTERNAL:
refused up front when libvirt's figures already say it will not fit (test driver), and when the
write itself fails with ENOSPC on a real directory pool (a 1.5 GiB tmpfs that only a private
libvirtd sees, filled behind its back so its figures are stale)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import uuid

import grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.proto import node_pb2 as pb
from tests.privlibvirtd import PrivateLibvirtd
from tests.support import Daemon, rpc_error

RAW = 1  # DiskFormat: raw volumes are allocated whole


def raw_vm(pool_id: str, size_gib: int) -> pb.CreateVMOnNodeRequest:
    vm_id = str(uuid.uuid4())
    disk = pb.DiskSpec(id="d0", size_gib=size_gib, format=RAW, pool_id=pool_id)
    return pb.CreateVMOnNodeRequest(
        vm_id=vm_id, name=f"qtx-space-{vm_id[:8]}", spec=pb.VMSpec(cpu_cores=1, memory_mib=64, disks=[disk])
    )


class UpFrontTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_raw_disk_larger_than_the_pool(self):
        daemon = yield Daemon(self).start()
        code, details = yield rpc_error(daemon.call("CreateVM", raw_vm("", 1 << 20)))  # 1 PiB
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        pool = daemon.node.storage.vm_pool_name
        self.assertRegex(
            details, rf"^storage pool {pool} is out of space: {1 << 50} bytes needed, \d+ of \d+ bytes free$"
        )


class EnospcTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_enospc_from_a_real_dir_pool(self):
        tiny = tempfile.mkdtemp(prefix="qtx-tiny-")
        self.addCleanup(os.rmdir, tiny)
        plv = PrivateLibvirtd(prelude=f"mount -t tmpfs -o size=1536m qtxtiny {tiny}")
        self.addCleanup(plv.stop)
        yield threads.deferToThread(plv.start)
        daemon = yield Daemon(self, **{"hypervisor.uri": plv.uri, "hypervisor.domain_type": "qemu"}).start()
        pool_id = f"tiny-{uuid.uuid4().hex[:8]}"
        local = pb.StoragePoolConfig(local=pb.LocalDirPoolConfig(path=tiny))
        yield daemon.call(
            "InitStoragePool",
            pb.InitStoragePoolRequest(pool_id=pool_id, type=pb.STORAGE_POOL_TYPE_LOCAL_DIR, config=local),
        )
        # Fill 1 of the 1.5 GiB inside libvirtd's namespace, without libvirt knowing.
        with open(os.path.join(plv.dir, "pid")) as fh:
            pid = fh.read().strip()
        subprocess.run(
            ["nsenter", "-t", pid, "-m", "dd", "if=/dev/zero", f"of={tiny}/filler", "bs=1M", "count=1024"],
            check=True,
            capture_output=True,
        )
        # A 1 GiB raw disk: libvirt's stale figures say 1.5 GiB free, the allocation hits ENOSPC.
        code, details = yield rpc_error(daemon.call("CreateVM", raw_vm(pool_id, 1)))
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED, details)
        match = re.match(
            rf"^storage pool {pool_id} is out of space: {1 << 30} bytes needed, (\d+) of \d+ bytes free$",
            details,
        )
        self.assertIsNotNone(match, details)
        # Free space as refreshed after the failure: the up-front check saw the stale 1.5 GiB.
        self.assertLess(int(match.group(1)), 1 << 30)
