"""Migration decisions without a second host: target parsing, flags, progress, tokens."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import libvirt
from twisted.trial import unittest

from quantix import errors
from quantix.hypervisor import migration as m
from quantix.hypervisor.migration_target import Tokens
from tests.support import TEST_NODE_XML

TEMPLATE = "qemu+tls://{host}/system"
BASE = (
    libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
)
LIVE = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_AUTO_CONVERGE


class TargetTests(unittest.TestCase):
    def test_bare_hosts_fill_the_template_and_drop_the_port(self):
        for value, uri, host in (
            ("node2", "qemu+tls://node2/system", "node2"),
            ("node2.example.com:9090", "qemu+tls://node2.example.com/system", "node2.example.com"),
            ("10.0.0.2", "qemu+tls://10.0.0.2/system", "10.0.0.2"),
            ("[fd00::2]:9090", "qemu+tls://[fd00::2]/system", "fd00::2"),
            ("fd00::2", "qemu+tls://[fd00::2]/system", "fd00::2"),
        ):
            target = m.parse_target(value, TEMPLATE)
            self.assertEqual((target.uri, target.host, target.port), (uri, host, 16514), value)
        self.assertEqual(m.parse_target("[fd00::2]", TEMPLATE).data_uri, "tcp://[fd00::2]")

    def test_uris_are_kept(self):
        target = m.parse_target("qemu+ssh://root@node2/system", TEMPLATE)
        self.assertEqual((target.host, target.port), ("node2", 22))
        self.assertEqual(target.uri, "qemu+ssh://root@node2/system")
        target = m.parse_target("qemu+tcp://node2:16600/system", TEMPLATE)
        self.assertEqual((target.port, target.data_uri), (16600, "tcp://node2"))
        self.assertEqual(m.parse_target("n2", "qemu+tcp://{host}/system").port, 16509)

    def test_bad_targets(self):
        for value in (
            "",
            " ",
            "qemu:///system",
            "qemu+unix:///system",
            "test:///default",
            "qemu+tcp:///system",
            "qemu+tcp://node2/session",
            "http://node2/system",
            "qemu+tcp://[::1/system",
            "node 2",
            "-node2",
            "n" * 2000,
            "node\x002",
        ):
            with self.assertRaises(errors.Invalid, msg=repr(value)):
                m.parse_target(value, TEMPLATE)

    def test_own_addresses_are_refused(self):
        own = m.own_addresses(["node1.example.com", "192.0.2.7"])
        for value in ("127.0.0.1", "localhost", "192.0.2.7", "node1.example.com", "::1", "0.0.0.0"):
            with self.assertRaises(errors.Invalid, msg=value):
                m.refuse_self(m.parse_target(value, TEMPLATE), own)
        m.refuse_self(m.parse_target("192.0.2.8", TEMPLATE), own)


def _domain(conn, name: str, *devices: ET.Element) -> libvirt.virDomain:
    dom = ET.Element("domain", type="test")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory").text = "65536"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type").text = "hvm"
    ET.SubElement(dom, "devices").extend(devices)
    return conn.defineXML(ET.tostring(dom, encoding="unicode"))


def _disk(path: str, dev: str, device: str = "disk", readonly: bool = False) -> ET.Element:
    el = ET.Element("disk", type="file", device=device)
    ET.SubElement(el, "source", file=path)
    ET.SubElement(el, "target", dev=dev, bus="virtio" if device == "disk" else "sata")
    if readonly:
        ET.SubElement(el, "readonly")
    return el


class PlanTests(unittest.TestCase):
    def setUp(self):
        self.conn = libvirt.open(f"test://{TEST_NODE_XML}")
        self.addCleanup(self.conn.close)
        self.target = m.parse_target("10.0.0.2", TEMPLATE)

    def plan(self, dom, **kw):
        args = {"live": True, "storage": False, "shared_dirs": ["/shared"], **kw}
        return m.plan(self.conn, dom, self.target, **args)

    def test_live_on_shared_storage(self):
        dom = _domain(self.conn, "shared", _disk("/shared/vm/disk.qcow2", "vda"))
        dom.create()
        plan = self.plan(dom, bandwidth_mib=50)
        self.assertEqual(plan.flags, BASE | LIVE | libvirt.VIR_MIGRATE_UNSAFE)
        want = {libvirt.VIR_MIGRATE_PARAM_URI: "tcp://10.0.0.2", libvirt.VIR_MIGRATE_PARAM_BANDWIDTH: 50}
        self.assertEqual(plan.params, want)
        self.assertEqual(self.plan(dom, live=False).flags, BASE | libvirt.VIR_MIGRATE_UNSAFE)
        self.assertFalse(plan.offline)

    def test_storage_copies_writable_local_disks_only(self):
        dom = _domain(
            self.conn,
            "local",
            _disk("/var/lib/vms/a.qcow2", "vda"),
            _disk("/shared/b.qcow2", "vdb"),
            _disk("/var/lib/vms/ro.img", "vdc", readonly=True),
            _disk("/var/lib/vms/x-cloud-init.iso", "sda", device="cdrom", readonly=True),
        )
        dom.create()
        with self.assertRaises(errors.WrongState) as caught:
            self.plan(dom)
        self.assertIn("not on shared storage", str(caught.exception))
        plan = self.plan(dom, storage=True, tls=True)
        self.assertEqual(plan.copied_disks, ("vda",))
        self.assertEqual(plan.params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS], ["vda"])
        want = BASE | LIVE | libvirt.VIR_MIGRATE_NON_SHARED_DISK | libvirt.VIR_MIGRATE_UNSAFE
        want |= libvirt.VIR_MIGRATE_TLS
        self.assertEqual(plan.flags, want)

    def test_stopped_vm_moves_offline(self):
        dom = _domain(self.conn, "stopped", _disk("/shared/s.qcow2", "vda"))
        plan = self.plan(dom, tls=True)
        self.assertTrue(plan.offline)
        self.assertEqual(plan.flags, BASE | libvirt.VIR_MIGRATE_OFFLINE | libvirt.VIR_MIGRATE_UNSAFE)
        self.assertEqual(plan.params, {})
        with self.assertRaises(errors.Invalid):
            self.plan(dom, storage=True)

    def test_host_devices_refuse(self):
        hostdev = ET.Element("hostdev", mode="subsystem", type="pci", managed="yes")
        source = ET.SubElement(hostdev, "source")
        ET.SubElement(source, "address", domain="0x0000", bus="0x01", slot="0x00", function="0x0")
        dom = _domain(self.conn, "passthrough", hostdev)
        dom.create()
        with self.assertRaises(errors.WrongState) as caught:
            self.plan(dom)
        self.assertIn("host devices", str(caught.exception))

    def test_a_job_cancelled_before_it_starts_never_runs(self):
        dom = _domain(self.conn, "early", _disk("/shared/e.qcow2", "vda"))
        dom.create()
        job = m.MigrationJob(dom, self.plan(dom))
        job.cancel()
        job.start()
        self.assertTrue(job.done.is_set())
        self.assertEqual(job.final().phase, m.FAILED)
        self.assertIn("cancelled", job.final().error)
        self.assertEqual(dom.state()[0], libvirt.VIR_DOMAIN_RUNNING)


class ProgressTests(unittest.TestCase):
    def test_phases_from_job_stats(self):
        self.assertIsNone(m.progress_from_stats({"type": libvirt.VIR_DOMAIN_JOB_NONE}))
        running = {
            "type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED,
            "data_total": 400,
            "data_processed": 100,
            "data_remaining": 300,
            "memory_total": 400,
            "memory_processed": 100,
            "memory_remaining": 300,
        }
        self.assertEqual(m.progress_from_stats(running), m.Progress(m.TRANSFERRING, 25, 100, 300))
        last = {**running, "data_processed": 400, "data_remaining": 0, "memory_remaining": 0}
        self.assertEqual(m.progress_from_stats(last), m.Progress(m.SWITCHING, 99, 400, 0))
        disks_first = {"type": libvirt.VIR_DOMAIN_JOB_UNBOUNDED, "memory_total": 400, "memory_remaining": 0}
        self.assertEqual(m.progress_from_stats(disks_first).phase, m.TRANSFERRING)


class FailureTests(unittest.TestCase):
    def test_cpu_incompatibility_says_so(self):
        libvirt.virResetLastError()
        exc = libvirt.libvirtError("the CPU is incompatible with host CPU: Host CPU does not provide avx512f")
        text = m.describe_failure(exc, m.parse_target("10.0.0.2", TEMPLATE))
        self.assertIn("avx512f", text)
        self.assertIn("identical CPUs", text)


class TokenTests(unittest.TestCase):
    def setUp(self):
        self.now = 1000.0
        self.tokens = Tokens(clock=lambda: self.now)

    def test_one_use(self):
        token, expires = self.tokens.issue("vm1")
        self.assertEqual(expires, 1600.0)
        self.assertGreaterEqual(len(token), 20)
        self.tokens.receive(token, "vm1")
        self.assertIn("vm1", self.tokens.expected)
        with self.assertRaises(errors.WrongState):
            self.tokens.receive(token, "vm1")

    def test_expired_unknown_and_other_vm(self):
        token, _ = self.tokens.issue("vm1")
        with self.assertRaises(errors.NotFound):
            self.tokens.receive(token + "x", "vm1")
        with self.assertRaises(errors.Invalid):
            self.tokens.receive(token, "vm2")
        with self.assertRaises(errors.Invalid):
            self.tokens.receive("", "vm1")
        self.now += 600
        with self.assertRaises(errors.WrongState) as caught:
            self.tokens.receive(token, "vm1")
        self.assertIn("expired", str(caught.exception))
