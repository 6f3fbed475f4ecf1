"""Migration between two real hosts on one machine (see :mod:`tests.twohosts`).

A guest that counts on its serial console moves between host a and host b: with shared storage
and with its disk copied, and back. The count going on from the next number on the other host
proves the guest kept running (its memory and CPU state moved, it did not boot again). A
cancelled migration and an unreachable target leave it running where it was.
"""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
import uuid

import grpc
from google.protobuf import empty_pb2
from twisted.internet import threads
from twisted.trial import unittest

from quantix.ops import nodectl
from quantix.proto import node_pb2 as pb
from tests import counterguest
from tests.twohosts import Host, TwoHosts

P = pb.MigrationPhase
TRANSFERRING = P.Value("MIGRATION_PHASE_TRANSFERRING")
ET = pb.EventType


def virsh(host: Host, *args: str) -> str:
    proc = subprocess.run(["virsh", "-q", "-c", host.uri, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Events:
    """Collects one daemon's event stream in a thread."""

    def __init__(self, host: Host) -> None:
        self.events: list = []
        self._call = host.stub.StreamEvents(empty_pb2.Empty())
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for event in self._call:
                self.events.append(event)
        except grpc.RpcError:
            pass

    def wait_for(self, event_type: int, vm_id: str, timeout: float = 20.0) -> None:
        wait_until(
            lambda: any(e.type == event_type and e.vm_id == vm_id for e in self.events),
            timeout,
            f"event {ET.Name(event_type)} for {vm_id}",
        )

    def types(self, vm_id: str) -> list[str]:
        return [ET.Name(e.type) for e in self.events if e.vm_id == vm_id]

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)


class Guest:
    """The counting guest, defined and started on ``host``."""

    def __init__(self, hosts: TwoHosts, *, shared: bool, disk_mib: int = 1, cdrom: bool = False) -> None:
        self.hosts = hosts
        self.id = str(uuid.uuid4())
        self.name = f"qtx-mig-{self.id[:8]}"
        directory = hosts.shared if shared else hosts.local
        self.disk = os.path.join(directory, f"{self.name}.qcow2")
        self.serial = os.path.join(hosts.local, f"{self.name}.serial")
        self.disk_mib = disk_mib
        #: A read-only image in the hosts' VM-disk directory, like the cloud-init CD-ROM.
        self.cdrom = os.path.join(hosts.local, "vms", f"{self.id}-cloud-init.iso") if cdrom else None

    def start_on(self, host: Host, *, run: bool = True) -> None:
        # The disk is written from outside the namespaces: host a's private "local" directory.
        path = self.disk if self.disk.startswith(self.hosts.shared) else self.on(host, self.disk)
        counterguest.make_disk(path, size_mib=self.disk_mib)
        if self.cdrom is not None:
            os.makedirs(os.path.dirname(self.on(host, self.cdrom)), exist_ok=True)
            with open(self.on(host, self.cdrom), "wb") as fh:
                fh.write(os.urandom(64 * 1024))
            # The daemon's VM-disk pool, as CreateVM would have defined it.
            pool_dir = os.path.dirname(self.cdrom)
            virsh(host, "pool-create-as", f"qtx-vms-{self.id[:8]}", "dir", "--target", pool_dir)
        xml_path = os.path.join(host.dir, f"{self.name}.xml")
        with open(xml_path, "w") as fh:
            xml = counterguest.domain_xml(self.name, self.id, self.disk, self.serial, cdrom=self.cdrom)
            fh.write(xml)
        virsh(host, "define", xml_path)
        if run:
            virsh(host, "start", self.name)
            wait_until(lambda: len(self.counts(host)) >= 3, 30, "the guest to count on its serial port")

    def on(self, host: Host, path: str) -> str:
        """Where a path inside the hosts' shared ``local`` mount is, for ``host``, seen from here."""
        return os.path.join(host.local, os.path.relpath(path, self.hosts.local))

    def counts(self, host: Host) -> list[int]:
        return counterguest.counts(self.on(host, self.serial))

    def state(self, host: Host) -> int | None:
        """PowerState as ``host``'s daemon reports it; None when it does not know the VM."""
        try:
            return host.stub.GetVMStatus(pb.VMIdRequest(vm_id=self.id), timeout=10).state
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise


def migrate(host: Host, vm_id: str, target: str, **kw) -> list:
    request = pb.MigrateVMRequest(vm_id=vm_id, target_node_uri=target, **kw)
    return list(host.stub.MigrateVM(request, timeout=120))


def error_of(func, *args, **kw) -> tuple[grpc.StatusCode, str]:
    try:
        func(*args, **kw)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("expected an RPC error")


class TwoHostTestCase(unittest.TestCase):
    timeout = 150
    overrides: dict = {}

    def setUp(self):
        self.hosts = TwoHosts()
        self.addCleanup(threads.deferToThread, self.hosts.stop)
        d = threads.deferToThread(self.hosts.start, **self.overrides)
        return d

    def in_thread(self, func):
        return threads.deferToThread(func)

    def assert_migrated(self, progress: list, vm_id: str) -> None:
        """A whole stream: PREPARING first, COMPLETE last, phases in order, no error."""
        phases = [m.phase for m in progress]
        self.assertEqual(phases[0], P.Value("MIGRATION_PHASE_PREPARING"), progress)
        self.assertEqual(phases[-1], P.Value("MIGRATION_PHASE_COMPLETE"), progress[-1])
        self.assertEqual(phases, sorted(phases))
        self.assertEqual(progress[-1].percent_complete, 100)
        self.assertEqual(progress[-1].error, "")
        self.assertTrue(all(m.vm_id == vm_id for m in progress))

    def assert_moved(self, guest: Guest, source: Host, target: Host) -> None:
        """Running on the target, gone from the source, and still counting from where it was."""
        self.assertEqual(guest.state(target), pb.PowerState.Value("POWER_STATE_RUNNING"))
        self.assertIsNone(guest.state(source))
        self.assertNotIn(guest.name, virsh(source, "list", "--all", "--name").split())
        self.assertIn(guest.name, virsh(target, "list", "--persistent", "--name").split())
        before = max(guest.counts(source))
        wait_until(lambda: any(c > before + 2 for c in guest.counts(target)), 30, "the count to go on")
        after = [c for c in guest.counts(target) if c > before - 1]
        # The count goes on from the next number: the guest did not restart, nothing was lost.
        self.assertEqual(min(after), before + 1, (before, after[:5]))


class SharedStorageTests(TwoHostTestCase):
    def test_live_migration_and_back_then_offline(self):
        def run():
            a, b = self.hosts.a, self.hosts.b
            guest = Guest(self.hosts, shared=True)
            guest.start_on(a)
            events_a, events_b = Events(a), Events(b)
            self.addCleanup(events_a.close)
            self.addCleanup(events_b.close)

            progress = migrate(a, guest.id, b.address, live=True)
            self.assert_migrated(progress, guest.id)
            self.assert_moved(guest, a, b)
            events_a.wait_for(ET.Value("EVENT_TYPE_VM_MIGRATED_OUT"), guest.id)
            events_b.wait_for(ET.Value("EVENT_TYPE_VM_MIGRATED_IN"), guest.id)
            self.assertNotIn("EVENT_TYPE_VM_MIGRATED_IN", events_a.types(guest.id))

            # Back, with the target as a full libvirt URI this time.
            progress = migrate(b, guest.id, f"qemu+tcp://{a.address}/system", live=True)
            self.assert_migrated(progress, guest.id)
            self.assert_moved(guest, b, a)
            events_a.wait_for(ET.Value("EVENT_TYPE_VM_MIGRATED_IN"), guest.id)

            # A stopped VM moves offline (on the same two hosts: each pair takes seconds to build).
            guest = Guest(self.hosts, shared=True)
            guest.start_on(a, run=False)
            token = b.stub.PrepareMigration(
                pb.PrepareMigrationRequest(vm_id=guest.id, source_node_uri=a.address)
            )
            b.stub.ReceiveMigration(token)
            self.assertEqual(
                error_of(migrate, a, guest.id, b.address, storage=True)[0], grpc.StatusCode.INVALID_ARGUMENT
            )
            progress = migrate(a, guest.id, b.address, live=True)
            self.assert_migrated(progress, guest.id)
            self.assertEqual(guest.state(b), pb.PowerState.Value("POWER_STATE_STOPPED"))
            self.assertIsNone(guest.state(a))
            events_a.wait_for(ET.Value("EVENT_TYPE_VM_MIGRATED_OUT"), guest.id)
            events_b.wait_for(ET.Value("EVENT_TYPE_VM_MIGRATED_IN"), guest.id)  # announced by the token

        return self.in_thread(run)


class StorageCopyTests(TwoHostTestCase):
    def test_storage_copy_and_back(self):
        def run():
            a, b = self.hosts.a, self.hosts.b
            guest = Guest(self.hosts, shared=False, cdrom=True)
            guest.start_on(a)
            code, details = error_of(migrate, a, guest.id, b.address)
            self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)
            self.assertIn("not on shared storage", details)

            # The target prepares: the disk file appears on b, empty, same size.
            self.assertFalse(os.path.exists(guest.on(b, guest.disk)))
            token = b.stub.PrepareMigration(
                pb.PrepareMigrationRequest(vm_id=guest.id, source_node_uri=a.address), timeout=60
            )
            self.assertEqual(token.vm_id, guest.id)
            self.assertTrue(os.path.exists(guest.on(b, guest.disk)))
            with open(guest.on(a, guest.cdrom), "rb") as src, open(guest.on(b, guest.cdrom), "rb") as copy:
                self.assertEqual(src.read(), copy.read())  # the CD-ROM image, copied from a's pool
            self.assertGreater(token.expires_at.seconds, time.time() + 500)
            b.stub.ReceiveMigration(token, timeout=10)
            code, _ = error_of(b.stub.ReceiveMigration, token, timeout=10)
            self.assertEqual(code, grpc.StatusCode.FAILED_PRECONDITION)  # one use

            progress = migrate(a, guest.id, b.address, live=True, storage=True)
            self.assert_migrated(progress, guest.id)
            self.assert_moved(guest, a, b)
            # The copy holds the program: b's disk starts with the boot sector.
            self.assertEqual(_first_sector(guest.on(b, guest.disk)), counterguest.BOOT_SECTOR)

            # Back to a with quantix-nodectl, which prepares a first (a's old copy of the disk is
            # still there: nothing to create), then shows a progress bar. Paused, not live.
            out, err = io.StringIO(), io.StringIO()
            argv = ["--address", b.grpc_address, "migrate", guest.id, "--to", a.address, "--storage"]
            code = nodectl.main([*argv, "--offline", "--target-daemon", a.grpc_address], out, err)
            self.assertEqual(code, 0, err.getvalue())
            self.assertEqual(out.getvalue(), f"VM {guest.id} migrated to {a.address}\n")
            self.assertIn("100%", err.getvalue())
            self.assert_moved(guest, b, a)

        return self.in_thread(run)


class CancelTests(TwoHostTestCase):
    #: Slow enough that the disk copy is still under way when the client cancels.
    overrides = {"migration.bandwidth_mib": 1}

    def test_cancel_leaves_vm_on_source_then_target_down(self):
        def run():
            a, b = self.hosts.a, self.hosts.b
            guest = Guest(self.hosts, shared=False, disk_mib=16)
            guest.start_on(a)
            b.stub.PrepareMigration(pb.PrepareMigrationRequest(vm_id=guest.id, source_node_uri=a.address))
            call = a.stub.MigrateVM(
                pb.MigrateVMRequest(vm_id=guest.id, target_node_uri=b.address, live=True, storage=True)
            )
            seen = []
            for message in call:
                seen.append(message)
                if message.phase == TRANSFERRING and message.data_transferred_bytes:
                    call.cancel()
                    break
            self.assertEqual(seen[-1].phase, TRANSFERRING, seen)
            # The job is aborted: nothing is left on b, the guest runs on and counts on a.
            wait_until(lambda: not virsh(b, "list", "--all", "--name").split(), 30, "b to have no domain")
            no_job = lambda: "Unbounded" not in virsh(a, "domjobinfo", guest.name)  # noqa: E731
            wait_until(no_job, 30, "a's job to end")
            self.assertEqual(guest.state(a), pb.PowerState.Value("POWER_STATE_RUNNING"))
            before = max(guest.counts(a))
            wait_until(lambda: max(guest.counts(a)) > before + 2, 30, "the count to go on on a")
            self.assertEqual(guest.counts(b), [])

            # The target's libvirtd goes down: a clear error before any progress message.
            b.stop_libvirtd()
            code, details = error_of(migrate, a, guest.id, b.address, live=True, storage=True)
            self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
            self.assertIn(f"target qemu+tcp://{b.address}/system is unreachable", details)
            self.assertEqual(guest.state(a), pb.PowerState.Value("POWER_STATE_RUNNING"))

        return self.in_thread(run)


def _first_sector(path: str) -> bytes:
    """The image's first 512 bytes (``-U``: the running VM holds the image's lock)."""
    raw = path + ".raw"
    argv = ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, raw]
    subprocess.run(argv, timeout=60, check=True)
    try:
        with open(raw, "rb") as fh:
            return fh.read(512)
    finally:
        os.unlink(raw)
