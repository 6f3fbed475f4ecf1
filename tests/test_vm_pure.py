"""Pure parts of the VM box: state/usage mapping, what DeleteVM removes, log tails, media XML."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import libvirt
from twisted.trial import unittest

from quantix.hypervisor import consoles, devices, snapshots, vms
from quantix.proto import node_pb2

NS = "https://quantix.dev/xmlns/node/1.0"
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "node.xml")


def domain_with_disk(chain: list[str], created: str | None, iso: str = "") -> str:
    """A domain whose vda has the backing chain ``chain`` (active image first)."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = "d"
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{NS}}}vm")
    if created:
        ET.SubElement(meta, "device", kind="disk", id="root", dev="vda", path=created, created="yes")
    if iso:
        ET.SubElement(meta, "cloud-init", path=iso)
    disk = ET.SubElement(ET.SubElement(dom, "devices"), "disk", type="file", device="disk")
    el = disk
    for i, path in enumerate(chain):
        if i:
            el = ET.SubElement(el, "backingStore", type="file")
        ET.SubElement(el, "source", file=path)
    ET.SubElement(disk, "target", dev="vda", bus="virtio")
    return ET.tostring(dom, encoding="unicode")


class LeftoverTests(unittest.TestCase):
    def test_snapshot_overlays_go_but_never_the_shared_backing_image(self):
        xml = domain_with_disk(
            ["/v/root.s2", "/v/root.s1", "/v/root.qcow2", "/images/ubuntu.qcow2"], "/v/root.qcow2"
        )
        self.assertEqual(vms.leftovers(xml), ["/v/root.s2", "/v/root.s1", "/v/root.qcow2"])

    def test_disks_given_by_path_are_kept(self):
        self.assertEqual(vms.leftovers(domain_with_disk(["/data/given.qcow2"], None)), [])

    def test_cloud_init_seed_goes(self):
        xml = domain_with_disk(["/v/root.qcow2"], "/v/root.qcow2", iso="/v/vm-cloud-init.iso")
        self.assertEqual(vms.leftovers(xml), ["/v/root.qcow2", "/v/vm-cloud-init.iso"])


class StatsTests(unittest.TestCase):
    def test_power_states(self):
        self.assertEqual(vms.power_state(libvirt.VIR_DOMAIN_RUNNING), node_pb2.POWER_STATE_RUNNING)
        self.assertEqual(vms.power_state(libvirt.VIR_DOMAIN_SHUTOFF), node_pb2.POWER_STATE_STOPPED)
        self.assertEqual(vms.power_state(libvirt.VIR_DOMAIN_PMSUSPENDED), node_pb2.POWER_STATE_SUSPENDED)
        self.assertEqual(vms.power_state(99), node_pb2.POWER_STATE_UNKNOWN)

    def test_usage_sums_devices_and_prefers_guest_memory(self):
        stats = {
            "cpu.time": 5,
            "balloon.maximum": 1024,
            "balloon.current": 1024,
            "balloon.available": 1000,
            "balloon.unused": 400,
            "balloon.rss": 900,
            "block.count": 2,
            "block.0.rd.bytes": 10,
            "block.1.rd.bytes": 5,
            "block.0.wr.bytes": 1,
            "net.count": 1,
            "net.0.rx.bytes": 7,
            "net.0.tx.bytes": 3,
        }
        u = vms.usage_from_stats(stats, 12.5)
        self.assertEqual((u.memory_total_bytes, u.memory_used_bytes), (1024 * 1024, 600 * 1024))
        self.assertEqual((u.disk_read_bytes, u.disk_write_bytes), (15, 1))
        self.assertEqual((u.network_rx_bytes, u.network_tx_bytes, u.cpu_time_ns), (7, 3, 5))
        del stats["balloon.available"]
        self.assertEqual(vms.usage_from_stats(stats).memory_used_bytes, 900 * 1024)
        self.assertEqual(vms.usage_from_stats({}).memory_used_bytes, 0)

    def test_usage_left_at_zero_is_the_same_as_reported_zero(self):
        zeros = {"cpu.time": 0, "balloon.maximum": 0, "balloon.current": 0, "block.count": 0, "net.count": 0}
        self.assertEqual(vms.usage_from_stats(zeros), vms.usage_from_stats({}))
        self.assertEqual(vms.usage_from_stats({"balloon.current": -1}).memory_used_bytes, 0)

    def test_list_response_from_the_test_driver(self):
        conn = libvirt.open(f"test://{FIXTURE}")
        self.addCleanup(conn.close)
        now = [100.0]
        sampler = vms.CpuSampler(clock=lambda: now[0])
        sampler.percent("gone", 0, 1)
        resp = vms.list_response(conn, sampler)
        states = {m.name: m.state for m in resp.vms}
        self.assertEqual(
            states, {"vm-running": node_pb2.POWER_STATE_RUNNING, "vm-stopped": node_pb2.POWER_STATE_STOPPED}
        )
        self.assertTrue(all(m.HasField("resource_usage") for m in resp.vms))
        self.assertTrue(all(m.resource_usage.memory_total_bytes for m in resp.vms))  # from info()
        again = vms.list_vms(conn, sampler)
        for m in [*resp.vms, *again]:
            m.resource_usage.ClearField("cpu_time_ns")  # the test driver's clock moves on
        self.assertEqual(list(resp.vms), again)
        now[0] += 1.0
        self.assertEqual(sampler.percent("gone", 10**9, 1), 0.0)  # forgotten: not listed any more

    def test_cpu_percent_from_two_samples(self):
        now = [100.0]
        sampler = vms.CpuSampler(clock=lambda: now[0])
        self.assertEqual(sampler.percent("a", 0, 2), 0.0)
        now[0] += 1.0
        self.assertEqual(sampler.percent("a", 1_000_000_000, 2), 50.0)
        now[0] += 1.0
        self.assertEqual(sampler.percent("a", 10, 2), 0.0)  # counter reset (VM restarted)
        sampler.forget([])
        self.assertEqual(sampler.percent("a", 10, 2), 0.0)


class LogTailTests(unittest.TestCase):
    def write(self, text: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as fh:
            fh.write(text)
        return path

    def test_tail_of_big_file_reads_backwards(self):
        path = self.write(b"".join(b"%07d\n" % i for i in range(100_000)))
        t = consoles.tail(path, 3)
        self.assertEqual(t.text, "0099997\n0099998\n0099999")
        self.assertEqual((t.lines, t.truncated, t.size), (3, True, os.path.getsize(path)))

    def test_no_trailing_newline_and_invalid_utf8(self):
        t = consoles.tail(self.write(b"a\nb\xff"), 10)
        self.assertEqual((t.text, t.lines, t.truncated), ("a\nb\ufffd", 2, False))

    def test_missing_file_is_empty(self):
        t = consoles.tail("/nonexistent/x.log", 0)
        self.assertEqual((t.text, t.lines, t.modified), ("", 0, None))

    def test_log_path_stays_in_the_directory(self):
        base = os.path.realpath(self.mktemp())
        self.assertEqual(consoles.log_path(base, "vm1"), os.path.join(base, "vm1.log"))
        for bad in ("../etc/passwd", "a/b", ""):
            self.assertRaises(vms.errors.NotFound, consoles.log_path, base, bad)


class MediaAndSnapshotXmlTests(unittest.TestCase):
    CDROM = (
        "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/old.iso'/>"
        "<target dev='sda' bus='sata'/><readonly/><alias name='sata0-0-0'/></disk>"
    )

    def test_insert_and_eject(self):
        inserted = ET.fromstring(devices.media_xml(self.CDROM, "/new.iso"))
        self.assertEqual([c.tag for c in inserted], ["driver", "source", "target", "readonly"])
        self.assertEqual(inserted.find("source").get("file"), "/new.iso")
        self.assertIsNone(ET.fromstring(devices.media_xml(self.CDROM, None)).find("source"))

    def test_snapshot_message(self):
        xml = (
            "<domainsnapshot><name>s2</name><description>d</description><state>disk-snapshot</state>"
            "<parent><name>s1</name></parent><creationTime>1700000000</creationTime></domainsnapshot>"
        )
        m = snapshots.snapshot_message(xml)
        self.assertEqual((m.snapshot_id, m.parent_id, m.description), ("s2", "s1", "d"))
        self.assertEqual((m.created_at.seconds, m.vm_state), (1700000000, node_pb2.POWER_STATE_RUNNING))


class ConsoleHostTests(unittest.TestCase):
    """GetConsole's host is what the control plane dials as ``host:port`` (research note D)."""

    def info(self, listen: str | None):
        from quantix.hypervisor import domaininfo

        graphics = (
            f"<graphics type='vnc' port='5901' autoport='yes' listen='{listen}'/>"
            if listen
            else ("<graphics type='vnc' port='5901' autoport='yes'/>")
        )
        uuid = "11111111-2222-3333-4444-555555555555"
        xml = f"<domain type='kvm'><name>v</name><uuid>{uuid}</uuid><devices>{graphics}</devices></domain>"
        return domaininfo.parse_domain(xml)

    def test_unreachable_listen_becomes_the_management_ip(self):
        for listen in (None, "0.0.0.0", "127.0.0.1", "::"):
            msg = consoles.console_message(self.info(listen), lambda: "192.0.2.10")
            self.assertEqual((msg.host, msg.port), ("192.0.2.10", 5901), listen)

    def test_ipv6_hosts_are_bracketed(self):
        msg = consoles.console_message(self.info("0.0.0.0"), lambda: "2001:db8::5")
        self.assertEqual(msg.host, "[2001:db8::5]")
        msg = consoles.console_message(self.info("2001:db8::7"), lambda: "192.0.2.10")
        self.assertEqual(msg.host, "[2001:db8::7]")
        self.assertEqual(consoles.dialable("node-a.example"), "node-a.example")
