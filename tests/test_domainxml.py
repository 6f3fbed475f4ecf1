"""Domain XML from VMSpec: structure, validation, round trips, and acceptance by real libvirt."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unicodedata
import uuid
import xml.etree.ElementTree as ET

import libvirt
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from quantix.errors import Invalid
from quantix.hypervisor import cloudinit, domaininfo, domainxml
from quantix.hypervisor.domainxml import DiskSource, DomainContext, NicSource
from quantix.proto import node_pb2
from tests.libvirtd import NAME_PREFIX, real_libvirt_uri

VM_ID = "0b7e4d1c-5f3a-4e2b-9c8d-1a2b3c4d5e6f"
SOCK_DIR = "/var/run/quantix-kvm/vms"


def spec(**kw) -> node_pb2.VMSpec:
    kw.setdefault("cpu_cores", 1)
    kw.setdefault("memory_mib", 128)
    return node_pb2.VMSpec(**kw)


def ctx(**kw) -> DomainContext:
    kw.setdefault("vm_id", VM_ID)
    kw.setdefault("name", "vm1")
    kw.setdefault("agent_socket_dir", SOCK_DIR)
    return DomainContext(**kw)


def build(s: node_pb2.VMSpec | None = None, **kw) -> ET.Element:
    """Build, serialize and parse again, so every test also checks the text is well-formed."""
    return ET.fromstring(domainxml.domain_xml(s or spec(), ctx(**kw)))


def disks(root: ET.Element, device: str = "disk") -> list[ET.Element]:
    return [d for d in root.iter("disk") if d.get("device") == device]


def targets(root: ET.Element, device: str = "disk") -> list[tuple[str, str]]:
    return [(d.find("target").get("dev"), d.find("target").get("bus")) for d in disks(root, device)]


def boot_orders(root: ET.Element) -> dict[str, int]:
    """Boot order keyed by disk target dev or interface MAC."""
    out = {}
    for el in root.find("devices"):
        boot = el.find("boot")
        if boot is None:
            continue
        key = el.find("target").get("dev") if el.tag == "disk" else el.find("mac").get("address")
        out[key] = int(boot.get("order"))
    return out


class BasicsTests(unittest.TestCase):
    def test_identity_and_type(self) -> None:
        root = build(domain_type="qemu")
        self.assertEqual(root.tag, "domain")
        self.assertEqual(root.get("type"), "qemu")
        self.assertEqual(root.findtext("name"), "vm1")
        self.assertEqual(root.findtext("uuid"), VM_ID)

    def test_uuid_is_canonicalized(self) -> None:
        root = build(vm_id=VM_ID.upper().replace("-", ""))
        self.assertEqual(root.findtext("uuid"), VM_ID)

    def test_cpu_topology(self) -> None:
        root = build(spec(cpu_cores=4, cpu_sockets=2, cpu_threads_per_core=2))
        self.assertEqual(root.findtext("vcpu"), "16")
        topo = root.find("cpu/topology").attrib
        self.assertEqual(topo, {"sockets": "2", "cores": "4", "threads": "2"})

    def test_zero_sockets_and_threads_mean_one(self) -> None:
        root = build(spec(cpu_cores=3))
        self.assertEqual(root.findtext("vcpu"), "3")
        self.assertEqual(root.find("cpu/topology").attrib, {"sockets": "1", "cores": "3", "threads": "1"})

    def test_cpu_mode_by_domain_type(self) -> None:
        self.assertEqual(build(domain_type="kvm").find("cpu").get("mode"), "host-passthrough")
        self.assertIsNone(build(domain_type="qemu").find("cpu").get("mode"))
        self.assertEqual(build(domain_type="qemu", cpu_mode="maximum").find("cpu").get("mode"), "maximum")

    def test_memory(self) -> None:
        root = build(spec(memory_mib=2048))
        self.assertEqual((root.findtext("memory"), root.find("memory").get("unit")), ("2048", "MiB"))
        self.assertEqual(root.findtext("currentMemory"), "2048")
        self.assertIsNone(root.find("memoryBacking"))

    def test_hugepages(self) -> None:
        root = build(spec(memory_hugepages=True))
        self.assertIsNotNone(root.find("memoryBacking/hugepages"))

    def test_lifecycle_actions(self) -> None:
        root = build()
        self.assertEqual(
            [root.findtext(t) for t in ("on_poweroff", "on_reboot", "on_crash")],
            ["destroy", "restart", "destroy"],
        )

    def test_machine_and_arch(self) -> None:
        t = build().find("os/type")
        self.assertEqual((t.text, t.get("arch"), t.get("machine")), ("hvm", "x86_64", "q35"))
        t = build(arch=None, machine=None).find("os/type")
        self.assertEqual(t.attrib, {})

    def test_emulator_only_when_given(self) -> None:
        self.assertIsNone(build().find("devices/emulator"))
        root = build(emulator="/usr/bin/qemu-system-x86_64")
        self.assertEqual(root.findtext("devices/emulator"), "/usr/bin/qemu-system-x86_64")


class FirmwareTests(unittest.TestCase):
    def test_bios_by_default(self) -> None:
        os_el = build().find("os")
        self.assertIsNone(os_el.get("firmware"))
        self.assertIsNone(os_el.find("loader"))
        self.assertIsNone(os_el.find("nvram"))

    def test_uefi_autoselect_with_per_vm_nvram(self) -> None:
        root = build(spec(firmware=node_pb2.FIRMWARE_UEFI), nvram_dir="/var/lib/quantix/nvram/")
        os_el = root.find("os")
        self.assertEqual(os_el.get("firmware"), "efi")
        nvram = f"/var/lib/quantix/nvram/{VM_ID}_VARS.fd"
        self.assertEqual(os_el.findtext("nvram"), nvram)
        self.assertEqual(domaininfo.parse_domain(ET.tostring(root)).meta.nvram, nvram)

    def test_uefi_explicit_loader(self) -> None:
        root = build(spec(firmware=node_pb2.FIRMWARE_UEFI), uefi_loader="/usr/share/OVMF/OVMF_CODE.fd")
        loader = root.find("os/loader")
        self.assertEqual(loader.text, "/usr/share/OVMF/OVMF_CODE.fd")
        self.assertEqual((loader.get("readonly"), loader.get("type")), ("yes", "pflash"))
        self.assertIsNone(root.find("os").get("firmware"))

    def test_unknown_firmware_is_bios(self) -> None:
        self.assertIsNone(build(spec(firmware=7)).find("os").get("firmware"))


class DiskTests(unittest.TestCase):
    def test_buses_formats_and_names(self) -> None:
        s = spec()
        s.disks.add(path="/d/a.qcow2")  # virtio
        s.disks.add(path="/d/b.raw", bus=node_pb2.DISK_BUS_SCSI, format=node_pb2.DISK_FORMAT_RAW)
        s.disks.add(path="/d/c", bus=node_pb2.DISK_BUS_SATA)
        s.disks.add(path="/d/d", bus=node_pb2.DISK_BUS_VIRTIO)
        s.disks.add(path="/d/e", bus=4, format=9)  # out-of-range numbers from the control plane
        root = build(s)
        self.assertEqual(
            targets(root),
            [("vda", "virtio"), ("sda", "scsi"), ("sdb", "sata"), ("vdb", "virtio"), ("vdc", "virtio")],
        )
        self.assertEqual(
            [d.find("driver").get("type") for d in disks(root)], ["qcow2", "raw", "qcow2", "qcow2", "qcow2"]
        )
        self.assertEqual(
            [d.find("source").get("file") for d in disks(root)],
            ["/d/a.qcow2", "/d/b.raw", "/d/c", "/d/d", "/d/e"],
        )
        scsi = [c for c in root.iter("controller") if c.get("type") == "scsi"]
        self.assertEqual([c.get("model") for c in scsi], ["virtio-scsi"])

    def test_no_scsi_controller_without_scsi_disks(self) -> None:
        s = spec()
        s.disks.add(path="/d/a")
        self.assertEqual([c for c in build(s).iter("controller") if c.get("type") == "scsi"], [])

    def test_ide_becomes_sata_on_q35_only(self) -> None:
        s = spec()
        s.disks.add(path="/d/a", bus=node_pb2.DISK_BUS_IDE)
        self.assertEqual(targets(build(s)), [("sda", "sata")])
        self.assertEqual(targets(build(s, machine="pc")), [("hda", "ide")])

    def test_readonly_ata_disk_moves_to_virtio(self) -> None:
        s = spec()
        s.disks.add(path="/d/a", bus=node_pb2.DISK_BUS_SATA, readonly=True)
        s.disks.add(path="/d/b", bus=node_pb2.DISK_BUS_SCSI, readonly=True)
        root = build(s)
        self.assertEqual(targets(root), [("vda", "virtio"), ("sda", "scsi")])
        self.assertTrue(all(d.find("readonly") is not None for d in disks(root)))

    def test_iotune(self) -> None:
        s = spec()
        s.disks.add(path="/d/a", iops_limit=500, throughput_mbps=100)
        s.disks.add(path="/d/b", iops_limit=7)
        s.disks.add(path="/d/c")
        tunes = [d.find("iotune") for d in disks(build(s))]
        self.assertEqual(tunes[0].findtext("total_iops_sec"), "500")
        self.assertEqual(tunes[0].findtext("total_bytes_sec"), "100000000")
        self.assertEqual([c.tag for c in tunes[1]], ["total_iops_sec"])
        self.assertIsNone(tunes[2])

    def test_absurd_iotune_is_invalid(self) -> None:
        s = spec()
        s.disks.add(path="/d/a", throughput_mbps=2**63)
        self.assertRaises(Invalid, build, s)

    def test_cache_and_io(self) -> None:
        s = spec()
        s.disks.add(path="/d/a")
        drv = disks(build(s))[0].find("driver")
        self.assertEqual((drv.get("cache"), drv.get("io")), ("none", "native"))
        drv = disks(build(s, disk_cache="writeback"))[0].find("driver")
        self.assertEqual((drv.get("cache"), drv.get("io")), ("writeback", None))

    def test_context_sources_override_spec(self) -> None:
        s = spec()
        s.disks.add(id="root", path="", size_gib=10, format=node_pb2.DISK_FORMAT_RAW)
        s.disks.add(id="data", path="/given/data.raw", format=node_pb2.DISK_FORMAT_RAW)
        root = build(s, disks=(DiskSource("/pool/vm/root.qcow2", "qcow2", created=True),))
        self.assertEqual(
            [(d.find("source").get("file"), d.find("driver").get("type")) for d in disks(root)],
            [("/pool/vm/root.qcow2", "qcow2"), ("/given/data.raw", "raw")],
        )
        info = domaininfo.parse_domain(ET.tostring(root))
        self.assertEqual([(d.id, d.created) for d in info.disks], [("root", True), ("data", False)])

    def test_unresolved_or_relative_path_is_invalid(self) -> None:
        for path in ("", "volume-1234", "rel/x.qcow2"):
            s = spec()
            s.disks.add(path=path)
            self.assertRaises(Invalid, build, s)
        s = spec()
        s.disks.add(path="/d/a")
        self.assertRaises(Invalid, build, s, disks=(DiskSource("/d/a", "vmdk"),))

    def test_many_disks_get_libvirt_names(self) -> None:
        self.assertEqual(domainxml.disk_dev_name("vd", 0), "vda")
        self.assertEqual(domainxml.disk_dev_name("vd", 25), "vdz")
        self.assertEqual(domainxml.disk_dev_name("vd", 26), "vdaa")
        self.assertEqual(domainxml.disk_dev_name("sd", 27), "sdab")
        self.assertEqual(domainxml.disk_dev_name("vd", 26 + 26 * 26), "vdaaa")
        self.assertEqual(domainxml.next_dev_name("vd", ["vda", "vdc"]), "vdb")

    def test_duplicate_ids_are_invalid(self) -> None:
        s = spec()
        s.disks.add(id="x", path="/d/a")
        s.cdroms.add(id="x")
        self.assertRaises(Invalid, build, s)
        s = spec()
        s.disks.add(path="/d/a")
        s.disks.add(id="disk0", path="/d/b")
        self.assertRaises(Invalid, build, s)


class CdromTests(unittest.TestCase):
    def test_cdroms_follow_disks_on_sata(self) -> None:
        s = spec()
        s.disks.add(path="/d/a", bus=node_pb2.DISK_BUS_SATA)
        s.cdroms.add(id="install", iso_path="/iso/debian.iso")
        s.cdroms.add()
        root = build(s, cloud_init_iso="/vms/x/cloud-init.iso")
        self.assertEqual(targets(root, "cdrom"), [("sdb", "sata"), ("sdc", "sata"), ("sdd", "sata")])
        srcs = [d.find("source") for d in disks(root, "cdrom")]
        self.assertEqual(srcs[0].get("file"), "/iso/debian.iso")
        self.assertIsNone(srcs[1])  # empty tray
        self.assertEqual(srcs[2].get("file"), "/vms/x/cloud-init.iso")
        self.assertTrue(all(d.find("readonly") is not None for d in disks(root, "cdrom")))
        info = domaininfo.parse_domain(ET.tostring(root))
        self.assertEqual(
            [d.id for d in info.disks if d.device == "cdrom"], ["install", "cdrom-1", "cloud-init"]
        )
        self.assertEqual(info.meta.cloud_init_iso, "/vms/x/cloud-init.iso")
        self.assertTrue(info.disk("cloud-init").created)

    def test_resolved_cdrom_path(self) -> None:
        s = spec()
        s.cdroms.add(iso_path="debian.iso")
        self.assertRaises(Invalid, build, s)
        root = build(s, cdrom_paths=("/pool/isos/debian.iso",))
        self.assertEqual(disks(root, "cdrom")[0].find("source").get("file"), "/pool/isos/debian.iso")


class BootTests(unittest.TestCase):
    def make(self, **kw) -> node_pb2.VMSpec:
        s = spec(**kw)
        s.disks.add(path="/d/a")
        s.disks.add(path="/d/b")
        s.cdroms.add(iso_path="/iso/x.iso")
        s.nics.add(id="n0", mac_address="52:54:00:00:00:01")
        return s

    def test_default_disk_cdrom_network(self) -> None:
        self.assertEqual(boot_orders(build(self.make())), {"vda": 1, "sda": 2, "52:54:00:00:00:01": 3})

    def test_bootable_cdrom_goes_first(self) -> None:
        s = self.make()
        s.cdroms[0].bootable = True
        self.assertEqual(boot_orders(build(s)), {"sda": 1, "vda": 2, "52:54:00:00:00:01": 3})

    def test_bootable_disk_flag_picks_the_disk(self) -> None:
        s = self.make()
        s.disks[1].bootable = True
        self.assertEqual(boot_orders(build(s)), {"vdb": 1, "sda": 2, "52:54:00:00:00:01": 3})

    def test_explicit_boot_order_and_unknown_entries(self) -> None:
        s = self.make(boot_order=[node_pb2.BOOT_DEVICE_NETWORK, 9, node_pb2.BOOT_DEVICE_DISK, 0])
        self.assertEqual(boot_orders(build(s)), {"52:54:00:00:00:01": 1, "vda": 2})

    def test_cloud_init_cdrom_never_boots(self) -> None:
        s = spec()
        s.disks.add(path="/d/a")
        root = build(s, cloud_init_iso="/vms/ci.iso")
        self.assertEqual(boot_orders(root), {"vda": 1})

    def test_no_os_boot_elements(self) -> None:
        # libvirt refuses per-device boot order mixed with <os><boot>.
        self.assertEqual(build(self.make()).findall("os/boot"), [])


class NicTests(unittest.TestCase):
    def test_bridge_network_and_default(self) -> None:
        s = spec()
        s.nics.add(bridge="br0", network="ignored")
        s.nics.add(network="prod")
        s.nics.add()
        ifaces = build(s, default_network="lan").findall("devices/interface")
        self.assertEqual(
            [(i.get("type"), i.find("source").attrib) for i in ifaces],
            [
                ("bridge", {"bridge": "br0"}),
                ("network", {"network": "prod"}),
                ("network", {"network": "lan"}),
            ],
        )

    def test_context_source_wins(self) -> None:
        s = spec()
        s.nics.add(network="2f0c6a0e-cp-network-uuid")
        iface = build(s, nics=(NicSource("bridge", "br-prod"),)).find("devices/interface")
        self.assertEqual((iface.get("type"), iface.find("source").get("bridge")), ("bridge", "br-prod"))

    def test_models_with_unknown_falling_back_to_virtio(self) -> None:
        s = spec()
        for model in (0, 1, 2, 3, 99):
            s.nics.add(model=model)
        models = [i.find("model").get("type") for i in build(s).findall("devices/interface")]
        self.assertEqual(models, ["virtio", "e1000", "rtl8139", "virtio", "virtio"])

    def test_bandwidth_in_kilobytes(self) -> None:
        s = spec()
        s.nics.add(bandwidth_mbps=100)
        s.nics.add()
        ifaces = build(s).findall("devices/interface")
        bw = ifaces[0].find("bandwidth")
        self.assertEqual(bw.find("inbound").get("average"), "12500")
        self.assertEqual(bw.find("outbound").get("average"), "12500")
        self.assertIsNone(ifaces[1].find("bandwidth"))

    def test_given_mac_is_normalized(self) -> None:
        s = spec()
        s.nics.add(mac_address="52-54-00-AB-CD-EF")
        self.assertEqual(build(s).find("devices/interface/mac").get("address"), "52:54:00:ab:cd:ef")

    def test_bad_macs_are_invalid(self) -> None:
        for mac in ("nonsense", "52:54:00:ab:cd", "01:00:5e:00:00:01"):  # last one is multicast
            s = spec()
            s.nics.add(mac_address=mac)
            self.assertRaises(Invalid, build, s)

    def test_derived_mac_is_stable_and_distinct(self) -> None:
        s = spec()
        s.nics.add(id="a")
        s.nics.add(id="b")
        macs = [i.find("mac").get("address") for i in build(s).findall("devices/interface")]
        again = [i.find("mac").get("address") for i in build(s).findall("devices/interface")]
        self.assertEqual(macs, again)
        self.assertNotEqual(macs[0], macs[1])
        self.assertTrue(all(m.startswith("52:54:00:") for m in macs))
        info = domaininfo.parse_domain(ET.tostring(build(s)))
        self.assertEqual([(n.id, n.mac) for n in info.nics], [("a", macs[0]), ("b", macs[1])])
        self.assertEqual(info.nic("b").mac, macs[1])
        self.assertEqual(info.nic(macs[0].upper()).id, "a")

    def test_no_nics_stays_no_nics(self) -> None:
        self.assertEqual(build().findall("devices/interface"), [])


class ConsoleTests(unittest.TestCase):
    def graphics(self, console: node_pb2.ConsoleSpec | None = None, **kw) -> list[ET.Element]:
        s = spec()
        if console is not None:
            s.console.CopyFrom(console)
        return build(s, **kw).findall("devices/graphics")

    def test_vnc_by_default_on_configured_address(self) -> None:
        (g,) = self.graphics(console_listen="10.0.0.5")
        self.assertEqual((g.get("type"), g.get("port"), g.get("autoport")), ("vnc", "-1", "yes"))
        self.assertEqual(g.get("listen"), "10.0.0.5")
        self.assertEqual(g.find("listen").attrib, {"type": "address", "address": "10.0.0.5"})

    def test_empty_console_spec_still_gets_vnc(self) -> None:
        (g,) = self.graphics(node_pb2.ConsoleSpec())
        self.assertEqual(g.get("type"), "vnc")

    def test_empty_listen_is_left_to_libvirt(self) -> None:
        (g,) = self.graphics(console_listen="")
        self.assertIsNone(g.get("listen"))
        self.assertIsNone(g.find("listen"))

    def test_fixed_port_and_password(self) -> None:
        (g,) = self.graphics(node_pb2.ConsoleSpec(vnc_enabled=True, vnc_port=5911, vnc_password="s3<&>"))
        self.assertEqual((g.get("port"), g.get("autoport"), g.get("passwd")), ("5911", "no", "s3<&>"))

    def test_bad_vnc_port(self) -> None:
        self.assertRaises(Invalid, self.graphics, node_pb2.ConsoleSpec(vnc_enabled=True, vnc_port=22))

    def test_spice_only_and_both(self) -> None:
        (g,) = self.graphics(node_pb2.ConsoleSpec(spice_enabled=True, spice_port=5930))
        self.assertEqual((g.get("type"), g.get("port"), g.get("autoport")), ("spice", "5930", "no"))
        both = self.graphics(node_pb2.ConsoleSpec(vnc_enabled=True, spice_enabled=True))
        self.assertEqual([g.get("type") for g in both], ["vnc", "spice"])


class GuestProfileTests(unittest.TestCase):
    def timers(self, root: ET.Element) -> dict[str, dict[str, str]]:
        return {t.get("name"): t.attrib for t in root.findall("clock/timer")}

    def test_windows_enlightenments(self) -> None:
        root = build(spec(guest_os="windows_server"))
        hv = root.find("features/hyperv")
        self.assertEqual(
            {c.tag for c in hv},
            set(domainxml.HYPERV_FEATURES) | {"spinlocks"},
        )
        self.assertEqual(hv.find("spinlocks").get("retries"), "8191")
        self.assertTrue(all(c.get("state") == "on" for c in hv))
        timers = self.timers(root)
        self.assertEqual(timers["hypervclock"]["present"], "yes")
        self.assertNotIn("kvmclock", timers)
        self.assertEqual(root.find("clock").get("offset"), "localtime")
        self.assertEqual(root.find("devices/video/model").get("type"), "qxl")

    def test_linux_profiles(self) -> None:
        root = build(spec(guest_os="ubuntu"))
        self.assertIsNone(root.find("features/hyperv"))
        timers = self.timers(root)
        self.assertEqual(timers["rtc"]["tickpolicy"], "catchup")
        self.assertEqual(timers["pit"]["tickpolicy"], "delay")
        self.assertEqual(timers["hpet"]["present"], "yes")
        self.assertEqual(timers["kvmclock"]["present"], "yes")
        self.assertEqual(root.find("clock").get("offset"), "utc")
        self.assertEqual(root.find("devices/video/model").get("type"), "virtio")
        rhel = build(spec(guest_os="rhel"))
        self.assertEqual(self.timers(rhel)["hpet"]["present"], "no")
        self.assertEqual(rhel.find("devices/video/model").attrib["type"], "vga")

    def test_profile_names(self) -> None:
        gp = domainxml.guest_profile
        self.assertEqual(gp("").family, "generic_linux")
        self.assertEqual(gp("something-else").family, "generic_linux")
        self.assertEqual(gp("Windows-Server-2022").family, "windows_server")
        self.assertEqual(gp("win11").family, "windows_desktop")
        self.assertEqual(gp("windows_legacy").family, "windows_legacy")
        self.assertEqual(gp("FreeBSD").family, "bsd")
        self.assertEqual(gp("rocky").family, "rhel")

    def test_tcg_drops_kvm_only_features(self) -> None:
        root = build(spec(guest_os="windows_desktop"), domain_type="qemu")
        self.assertIsNone(root.find("features/hyperv"))
        self.assertFalse({"hypervclock", "kvmclock"} & set(self.timers(root)))


class DeviceBoilerplateTests(unittest.TestCase):
    def test_agent_channel(self) -> None:
        root = build()
        chans = {c.find("target").get("name"): c for c in root.findall("devices/channel")}
        agent = chans[domainxml.AGENT_CHANNEL]
        self.assertEqual(agent.get("type"), "unix")
        self.assertEqual(
            agent.find("source").attrib, {"mode": "bind", "path": f"{SOCK_DIR}/{VM_ID}.agent.sock"}
        )
        self.assertEqual(agent.find("target").get("type"), "virtio")
        self.assertIn(domainxml.QEMU_GA_CHANNEL, chans)
        self.assertIn("virtio-serial", [c.get("type") for c in root.findall("devices/controller")])
        self.assertEqual(
            domaininfo.parse_domain(ET.tostring(root)).agent_socket, f"{SOCK_DIR}/{VM_ID}.agent.sock"
        )

    def test_hotplug_root_ports_only_on_q35(self) -> None:
        ports = [c for c in build().iter("controller") if c.get("model") == "pcie-root-port"]
        self.assertGreaterEqual(len(ports), 4)
        self.assertEqual([c for c in build(machine="pc").iter("controller") if c.get("type") == "pci"], [])


class MetadataTests(unittest.TestCase):
    def test_labels_under_our_namespace(self) -> None:
        text = domainxml.domain_xml(spec(), ctx(labels={"env": "prod", "a<b": 'x"&y'}))
        root = ET.fromstring(text)
        vm = root.find(f"metadata/{{{domainxml.NS}}}vm")
        self.assertIsNotNone(vm)
        self.assertEqual(
            {el.get("key"): el.get("value") for el in vm.findall("label")}, {"env": "prod", "a<b": 'x"&y'}
        )
        # The namespace is declared on the metadata element itself, not on <domain>.
        self.assertIn('<quantix:vm xmlns:quantix="https://quantix.dev/xmlns/node/1.0"', text)
        self.assertTrue(text.startswith("<domain "))
        self.assertNotIn("xmlns", text[: text.index("<metadata")])

    def test_digest_tracks_the_request(self) -> None:
        def digest(s, **kw) -> str:
            return domaininfo.parse_domain(domainxml.domain_xml(s, ctx(**kw))).meta.digest

        base = digest(spec())
        self.assertEqual(base, digest(spec()))
        self.assertNotEqual(base, digest(spec(memory_mib=256)))
        self.assertNotEqual(base, digest(spec(), name="other"))
        self.assertNotEqual(base, digest(spec(), labels={"k": "v"}))
        self.assertEqual(base, digest(spec(), console_listen="1.2.3.4"))  # host facts are not the request

    def test_hotplug_bookkeeping(self) -> None:
        meta = domainxml.VMMeta(devices=(domainxml.DeviceRef("nic", "a", mac="52:54:00:00:00:01"),))
        b = domainxml.DeviceRef("nic", "b", mac="52:54:00:00:00:02")
        meta2 = meta.with_device(b).with_device(b)
        self.assertEqual([r.id for r in meta2.devices], ["a", "b"])
        self.assertEqual(meta2.device("nic", "b"), b)
        self.assertEqual(meta2.without_device("nic", "a").devices, (b,))
        self.assertEqual(meta.devices[0].id, "a")  # frozen: the original is untouched

    def test_metadata_element_round_trip(self) -> None:
        meta = domainxml.VMMeta(
            labels={"k": "v\nw"},
            devices=(domainxml.DeviceRef("disk", "d0", dev="vda", path="/x", created=True),),
            digest="abc",
            guest_os="debian",
            cloud_init_iso="/ci.iso",
            nvram="/nv.fd",
        )
        el = ET.fromstring(domainxml.element_xml(domainxml.metadata_element(meta)))
        self.assertEqual(domaininfo.parse_meta(el), meta)


class ValidationTests(unittest.TestCase):
    def test_free_text_takes_exactly_what_xml_can_carry(self) -> None:
        """Every code point of the BMP, and a few above it: accepted in free text iff XML 1.0's
        Char production allows it and it is no C0/C1 control character but tab, LF and CR."""

        def xml_char(c: int) -> bool:
            return c in (0x9, 0xA, 0xD) or 0x20 <= c <= 0xD7FF or 0xE000 <= c <= 0xFFFD or c >= 0x10000

        for c in [*range(0x10010), 0x1F600, 0x10FFFF]:
            ok = xml_char(c) and not (0x7F <= c <= 0x9F)
            try:
                domainxml.check_text("description", chr(c), allow_newlines=True)
                accepted = True
            except Invalid:
                accepted = False
            self.assertEqual(accepted, ok, f"U+{c:04X}")

    def test_vm_id(self) -> None:
        for bad in ("", "vm-1", "not-a-uuid-at-all-xxxxxxxxxxxxxxxxxxx", "0b7e4d1c-5f3a-4e2b-9c8d"):
            self.assertRaises(Invalid, build, vm_id=bad)
        self.assertEqual(domainxml.validate_vm_id("{" + VM_ID.upper() + "}"), VM_ID)

    def test_names(self) -> None:
        for bad in (
            "",
            " lead",
            "trail ",
            "a/b",
            "a\nb",
            "a\x00b",
            "bell\x07",
            "x" * 201,
            "é" * 101,
            "\ufffe",
        ):
            self.assertRaises(Invalid, build, name=bad)
        for good in ("a", "web server 01", "数据库", "x" * 200, "<&>'\"", "emoji 🎉"):
            self.assertEqual(build(name=good).findtext("name"), good)

    def test_cpu_and_memory_bounds(self) -> None:
        self.assertRaises(Invalid, build, spec(cpu_cores=0))
        self.assertRaises(Invalid, build, spec(cpu_cores=64, cpu_sockets=32))
        self.assertRaises(Invalid, build, spec(memory_mib=0))
        self.assertRaises(Invalid, build, spec(memory_mib=domainxml.MAX_MEMORY_MIB + 1))

    def test_labels(self) -> None:
        self.assertRaises(Invalid, build, labels={"": "v"})
        self.assertRaises(Invalid, build, labels={"k\x01": "v"})
        self.assertRaises(Invalid, build, labels={"k": "v\x1b"})
        self.assertRaises(Invalid, build, labels={"k": "\ud800"})
        self.assertRaises(Invalid, build, labels={"k": "c1\x85"})
        info = domaininfo.parse_domain(ET.tostring(build(labels={"k": "a\tb\r\nc"})))
        self.assertEqual(info.meta.labels, {"k": "a\tb\r\nc"})
        self.assertRaises(Invalid, build, labels={"k": "v" * (domainxml.MAX_LABEL_VALUE + 1)})

    def test_other_strings(self) -> None:
        self.assertRaises(Invalid, build, console_listen="0.0.0.0\x00")
        self.assertRaises(Invalid, build, agent_socket_dir="relative/dir")
        s = spec()
        s.nics.add(bridge="br\x00")
        self.assertRaises(Invalid, build, s)


LIVE_XML = """<domain type='kvm' id='7'>
  <name>web</name>
  <uuid>0b7e4d1c-5f3a-4e2b-9c8d-1a2b3c4d5e6f</uuid>
  <metadata>
    <quantix:vm xmlns:quantix="https://quantix.dev/xmlns/node/1.0" digest="d1">
      <label key="env" value="prod"/>
      <device kind="disk" id="root" dev="vda" path="/p/root.qcow2" created="yes"/>
      <device kind="nic" id="eth0" mac="52:54:00:0a:0b:0c"/>
    </quantix:vm>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <vcpu placement='static'>2</vcpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/p/root.qcow2' index='1'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/p/hotplugged.raw'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <interface type='bridge'>
      <mac address='52:54:00:0A:0B:0C'/>
      <source bridge='br0'/>
      <target dev='vnet3'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:99:98:97'/>
      <source network='default' portid='x' bridge='virbr0'/>
      <model type='e1000'/>
    </interface>
    <channel type='unix'>
      <source mode='bind' path='/run/q/0b7e.agent.sock'/>
      <target type='virtio' name='org.quantix.agent.0' state='disconnected'/>
    </channel>
    <graphics type='spice' port='5930' autoport='yes' listen='0.0.0.0'>
      <listen type='address' address='0.0.0.0'/>
    </graphics>
    <graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1' passwd='pw'>
      <listen type='network' address='192.0.2.10' network='mgmt'/>
    </graphics>
  </devices>
</domain>"""


class DomainInfoTests(unittest.TestCase):
    def test_live_xml(self) -> None:
        info = domaininfo.parse_domain(LIVE_XML)
        self.assertEqual((info.uuid, info.name, info.domain_type), (VM_ID, "web", "kvm"))
        self.assertEqual((info.vcpus, info.memory_kib), (2, 2 * 1024 * 1024))
        self.assertEqual(info.meta.labels, {"env": "prod"})
        self.assertEqual(info.meta.digest, "d1")
        self.assertEqual(info.agent_socket, "/run/q/0b7e.agent.sock")

    def test_disks_by_id_or_dev(self) -> None:
        info = domaininfo.parse_domain(LIVE_XML)
        root, hot = info.disks
        self.assertEqual((root.id, root.created, root.format, root.readonly), ("root", True, "qcow2", False))
        self.assertEqual((hot.id, hot.path, hot.readonly), ("vdb", "/p/hotplugged.raw", True))
        self.assertIs(info.disk("vda"), root)
        self.assertIsNone(info.disk("nope"))
        # The element alone, ready for detachDeviceFlags.
        el = ET.fromstring(hot.xml)
        self.assertEqual(el.find("target").get("dev"), "vdb")
        self.assertFalse(hot.xml.endswith("\n"))

    def test_nics_by_id_or_mac(self) -> None:
        info = domaininfo.parse_domain(LIVE_XML)
        eth0, other = info.nics
        self.assertEqual(
            (eth0.id, eth0.mac, eth0.kind, eth0.source), ("eth0", "52:54:00:0a:0b:0c", "bridge", "br0")
        )
        self.assertEqual(eth0.target, "vnet3")
        self.assertEqual(
            (other.id, other.kind, other.source, other.model),
            ("52:54:00:99:98:97", "network", "default", "e1000"),
        )
        self.assertIs(info.nic("52:54:00:99:98:97"), other)
        self.assertIs(info.nic("eth0"), eth0)

    def test_console(self) -> None:
        info = domaininfo.parse_domain(LIVE_XML)
        vnc = info.console()
        self.assertEqual((vnc.type, vnc.port, vnc.listen, vnc.password), ("vnc", 5901, "192.0.2.10", "pw"))
        self.assertEqual(info.console("spice").port, 5930)
        self.assertIsNone(domaininfo.parse_domain(domainxml.domain_xml(spec(), ctx())).console().port)

    def test_foreign_domain_without_our_metadata(self) -> None:
        info = domaininfo.parse_domain("<domain type='kvm'><name>x</name><uuid>u</uuid></domain>")
        self.assertEqual((info.disks, info.nics, info.graphics, info.agent_socket), ((), (), (), None))
        self.assertEqual(info.meta, domainxml.VMMeta())


# --- properties ------------------------------------------------------------------------------

NAMES = st.text(min_size=1, max_size=60)
SAFE_NAMES = st.text(
    st.characters(
        blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs"),
        blacklist_characters="/\ufffe\uffff",
        whitelist_characters=" ",
    ),
    min_size=1,
    max_size=40,
)
LABELS = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=5)
PATHS = st.text(max_size=60).map(lambda s: "/" + s)
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _try_build(**kw) -> domaininfo.DomainInfo | None:
    """The parsed result, or None when the builder refused the input with Invalid."""
    try:
        text = domainxml.domain_xml(kw.pop("spec", None) or spec(), ctx(**kw))
    except Invalid:
        return None
    return domaininfo.parse_domain(text)


def _xml_char(c: str) -> bool:
    o = ord(c)
    return c in "\t\n\r" or 0x20 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or o >= 0x10000


class PropertyTests(unittest.TestCase):
    @PROPS
    @given(name=NAMES)
    def test_any_name_round_trips_or_is_invalid(self, name: str) -> None:
        info = _try_build(name=name)
        if info is not None:
            self.assertEqual(info.name, name)
        if any(not _xml_char(c) or unicodedata.category(c) == "Cc" for c in name):
            self.assertIsNone(info)

    @PROPS
    @given(name=SAFE_NAMES)
    def test_printable_names_are_accepted(self, name: str) -> None:
        assume(name.strip() == name)
        info = _try_build(name=name)
        self.assertIsNotNone(info)
        self.assertEqual(info.name, name)

    @PROPS
    @given(labels=LABELS)
    def test_any_labels_round_trip_or_are_invalid(self, labels: dict[str, str]) -> None:
        info = _try_build(labels=labels)
        bad = any(not _xml_char(c) or unicodedata.category(c) == "Cc" for c in "".join(labels))
        bad |= any(
            not _xml_char(c) or (unicodedata.category(c) == "Cc" and c not in "\t\n\r")
            for c in "".join(labels.values())
        )
        if bad:
            self.assertIsNone(info)
        if info is not None:
            self.assertEqual(dict(info.meta.labels), labels)

    @PROPS
    @given(path=PATHS, iso=PATHS, sock=PATHS)
    def test_any_paths_round_trip_or_are_invalid(self, path: str, iso: str, sock: str) -> None:
        s = spec()
        s.disks.add(id="d", path=path)
        info = _try_build(spec=s, cloud_init_iso=iso, agent_socket_dir=sock)
        if any(not _xml_char(c) or unicodedata.category(c) == "Cc" for c in path + iso + sock):
            self.assertIsNone(info)
            return
        self.assertIsNotNone(info)
        self.assertEqual(info.disk("d").path, path)
        self.assertEqual(info.disk("cloud-init").path, iso)
        self.assertEqual(info.agent_socket, domainxml.agent_socket_path(sock, VM_ID))


# --- real libvirt -----------------------------------------------------------------------------


def _full_spec(guest_os: str = "debian", firmware: int = 0) -> node_pb2.VMSpec:
    s = spec(cpu_cores=2, cpu_sockets=1, memory_mib=128, guest_os=guest_os, firmware=firmware)
    s.disks.add(
        id="root", path="/var/lib/qtx-test/root.qcow2", iops_limit=100, throughput_mbps=10, bootable=True
    )
    s.disks.add(id="data", path="/var/lib/qtx-test/data.raw", bus=1, format=1, readonly=True)
    s.disks.add(id="weird", path="/var/lib/qtx-test/w.raw", bus=4)
    s.cdroms.add(id="inst", iso_path="/var/lib/qtx-test/inst.iso")
    s.cdroms.add(id="tray")
    s.nics.add(id="n0", network="default", model=1, bandwidth_mbps=100)
    s.nics.add(id="n1", bridge="virbr0", model=3)
    s.console.vnc_enabled = True
    s.console.spice_enabled = True
    return s


LABELS_SAMPLE = {"env": "prod", "tricky": "<a & 'b'>\n\ttab", "ユニコード": "値"}


class TestDriverTests(unittest.TestCase):
    """The libvirt test driver parses and stores the XML with libvirt's own parser."""

    def setUp(self) -> None:
        self.conn = libvirt.open("test:///default")
        self.addCleanup(self.conn.close)

    def define(self, s: node_pb2.VMSpec, **kw) -> domaininfo.DomainInfo:
        vm_id = str(uuid.uuid4())
        kw.setdefault("name", f"{NAME_PREFIX}-{vm_id[:8]}")
        c = ctx(vm_id=vm_id, domain_type="test", arch="i686", machine=None, **kw)
        dom = self.conn.defineXML(domainxml.domain_xml(s, c))
        try:
            return domaininfo.parse_domain(dom.XMLDesc(0))
        finally:
            dom.undefine()

    def test_profiles_and_firmwares_are_accepted(self) -> None:
        for guest_os in ("debian", "windows_server", "freebsd", ""):
            for firmware in (0, 1):
                info = self.define(
                    _full_spec(guest_os, firmware),
                    labels=LABELS_SAMPLE,
                    cloud_init_iso="/var/lib/qtx-test/ci.iso",
                    nvram_dir="/var/lib/qtx-test/nvram",
                )
                self.assertEqual(dict(info.meta.labels), LABELS_SAMPLE)
                # libvirt keeps disks sorted by target name, not in spec order.
                self.assertEqual(
                    sorted(d.id for d in info.disks), ["cloud-init", "data", "inst", "root", "tray", "weird"]
                )
                self.assertEqual([n.id for n in info.nics], ["n0", "n1"])
                self.assertEqual([g.type for g in info.graphics], ["vnc", "spice"])

    def test_set_metadata_reads_back_the_same(self) -> None:
        """Hot-plug paths rewrite our block with virDomainSetMetadata; the parser must follow."""
        vm_id = str(uuid.uuid4())
        c = ctx(vm_id=vm_id, name=f"{NAME_PREFIX}-{vm_id[:8]}", domain_type="test", arch="i686", machine=None)
        dom = self.conn.defineXML(domainxml.domain_xml(spec(), c))
        self.addCleanup(dom.undefine)
        meta = domainxml.VMMeta(
            labels={"a": "<1>"}, devices=(domainxml.DeviceRef("nic", "n9", mac="52:54:00:01:02:03"),)
        )
        el = domainxml.metadata_element(meta, for_set_metadata=True)
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            domainxml.element_xml(el),
            domainxml.NS_PREFIX,
            domainxml.NS,
            libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )
        self.assertEqual(domaininfo.parse_domain(dom.XMLDesc(0)).meta, meta)

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(name=st.one_of(NAMES, SAFE_NAMES), labels=LABELS, path=PATHS)
    def test_whatever_we_accept_libvirt_accepts(self, name: str, labels: dict[str, str], path: str) -> None:
        assume(name != "test")  # the test driver's built-in domain
        s = spec()
        s.disks.add(id="d", path=path)
        try:
            domainxml.domain_xml(s, ctx(name=name, labels=labels))
        except Invalid:
            return
        info = self.define(s, name=name, labels=labels)
        self.assertEqual(info.name, name)
        self.assertEqual(dict(info.meta.labels), labels)
        self.assertEqual(info.disk("d").path, path)


def _system_conn() -> libvirt.virConnect:
    return libvirt.open(real_libvirt_uri())


class RealLibvirtTests(unittest.TestCase):
    """Define (never start) against the real libvirtd with QEMU; every domain is undefined again."""

    def setUp(self) -> None:
        self.conn = _system_conn()
        self.addCleanup(self.conn.close)

    def define(self, s: node_pb2.VMSpec, **kw) -> tuple[domaininfo.DomainInfo, str]:
        vm_id = str(uuid.uuid4())
        kw.setdefault("name", f"{NAME_PREFIX}-{vm_id[:8]}")
        kw.setdefault("labels", LABELS_SAMPLE)
        c = ctx(
            vm_id=vm_id,
            domain_type="qemu",
            nvram_dir="/var/lib/qtx-test/nvram",
            cloud_init_iso="/var/lib/qtx-test/ci.iso",
            **kw,
        )
        dom = self.conn.defineXML(domainxml.domain_xml(s, c))
        try:
            return domaininfo.parse_domain(dom.XMLDesc(0)), dom.XMLDesc(0)
        finally:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

    def test_defines_with_every_feature(self) -> None:
        for guest_os, firmware in (("debian", 0), ("windows_server", 1), ("rhel", 1)):
            info, text = self.define(_full_spec(guest_os, firmware))
            self.assertEqual(info.domain_type, "qemu")
            self.assertEqual(dict(info.meta.labels), LABELS_SAMPLE)
            self.assertEqual(
                {d.id: d.bus for d in info.disks},
                {"root": "virtio", "data": "scsi", "weird": "virtio", "inst": "sata", "tray": "sata",
                 "cloud-init": "sata"},
            )  # fmt: skip
            self.assertEqual(info.agent_socket, f"{SOCK_DIR}/{info.uuid}.agent.sock")
            root = ET.fromstring(text)
            ports = {
                int(c.get("index")) for c in root.iter("controller") if c.get("model") == "pcie-root-port"
            }
            buses = {int(a.get("bus"), 16) for a in root.iter("address") if a.get("type") == "pci"}
            self.assertGreaterEqual(len(ports - buses), 4, "spare hot-plug ports")

    def test_cpu_mode_override(self) -> None:
        info, text = self.define(_full_spec("windows_desktop"), cpu_mode="host-model")
        root = ET.fromstring(text)
        self.assertEqual(root.find("cpu").get("mode"), "host-model")
        self.assertIsNone(root.find("features/hyperv"))  # Hyper-V needs KVM; dropped for TCG
        self.assertEqual(info.vcpus, 2)

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(name=SAFE_NAMES, labels=LABELS, path=PATHS)
    def test_qemu_driver_round_trips(self, name: str, labels: dict[str, str], path: str) -> None:
        name = f"{NAME_PREFIX}-{uuid.uuid4().hex[:8]}-{name.strip()}"[:120]
        s = spec()
        s.disks.add(id="d", path=path)
        try:
            domainxml.domain_xml(s, ctx(name=name, labels=labels))
        except Invalid:
            return
        info, _ = self.define(s, name=name, labels=labels)
        self.assertEqual(info.name, name)
        self.assertEqual(dict(info.meta.labels), labels)
        self.assertEqual(info.disk("d").path, path)

    def test_boots_under_tcg(self) -> None:
        """Start the XML for real (no OS; the guest sits in firmware) and read the live XML back."""
        work = tempfile.mkdtemp(prefix="qtx-test-dx-", dir="/var/tmp")
        self.addCleanup(shutil.rmtree, work, True)
        disk = os.path.join(work, "root.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "16M"], check=True)
        iso = os.path.join(work, "cloud-init.iso")
        vm_id = str(uuid.uuid4())
        name = f"{NAME_PREFIX}-{vm_id[:8]}"
        cloudinit.write_nocloud_iso(iso, vm_id, name, node_pb2.CloudInitConfig(user_data="#cloud-config\n"))
        s = spec(cpu_cores=1, memory_mib=64, guest_os="debian")
        s.disks.add(id="root", path=disk, iops_limit=1000)
        s.cdroms.add(id="empty")
        s.console.vnc_enabled = True
        c = ctx(
            vm_id=vm_id,
            name=name,
            domain_type="qemu",
            agent_socket_dir=work,
            console_listen="127.0.0.1",
            cloud_init_iso=iso,
            labels={"purpose": "boot test"},
        )
        dom = self.conn.defineXML(domainxml.domain_xml(s, c))
        self.addCleanup(dom.undefineFlags, libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        dom.create()
        try:
            info = domaininfo.parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
            vnc = info.console("vnc")
            self.assertEqual(vnc.listen, "127.0.0.1")
            self.assertGreaterEqual(vnc.port, 5900)
            self.assertTrue(os.path.exists(info.agent_socket))
            self.assertEqual(info.agent_socket, os.path.join(work, f"{vm_id}.agent.sock"))
            self.assertEqual(info.meta.labels, {"purpose": "boot test"})
            self.assertEqual(info.disk("cloud-init").path, iso)
            self.assertIsNone(info.disk("empty").path)
        finally:
            dom.destroy()
