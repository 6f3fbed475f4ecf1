"""Host discovery for registration/discovery, from a fixture /sys and /proc tree and the real host."""

from __future__ import annotations

import json
import os

import libvirt
from twisted.trial import unittest

from quantix.hypervisor import discovery, hostinfo
from tests.support import TEST_NODE_XML


def write(root: str, rel: str, text: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


class FixtureTreeTests(unittest.TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        sys_root = self.sys = os.path.join(self.root, "sys")
        # a SATA disk with two partitions, an NVMe disk, and devices that must be left out
        write(sys_root, "devices/pci0000:00/ata1/host0/block/sda/size", "2048\n")
        write(sys_root, "devices/pci0000:00/ata1/host0/block/sda/queue/rotational", "1\n")
        write(sys_root, "devices/pci0000:00/ata1/host0/block/sda/device/model", "WDC  \n")
        write(sys_root, "devices/pci0000:00/ata1/host0/block/sda/removable", "0\n")
        write(sys_root, "devices/pci0000:00/ata1/host0/block/sda/sda1/partition", "1\n")
        write(sys_root, "devices/pci0000:00/ata1/host0/block/sda/sda1/size", "1024\n")
        write(sys_root, "devices/pci0000:00/ata1/host0/block/sda/sda2/partition", "2\n")
        write(sys_root, "devices/pci0000:00/ata1/host0/block/sda/sda2/size", "512\n")
        os.makedirs(os.path.join(sys_root, "block"))
        os.symlink(
            os.path.join(sys_root, "devices/pci0000:00/ata1/host0/block/sda"),
            os.path.join(sys_root, "block/sda"),
        )
        write(sys_root, "block/nvme0n1/size", "4096\n")
        write(sys_root, "block/nvme0n1/queue/rotational", "0\n")
        write(sys_root, "block/nvme0n1/device/serial", "S123\n")
        write(sys_root, "block/loop0/size", "4096\n")
        write(sys_root, "block/sr0/size", "0\n")
        # a NIC with SR-IOV on PCI, and a virtual one
        write(sys_root, "devices/pci0000:00/0000:00:03.0/sriov_totalvfs", "8\n")
        write(sys_root, "devices/pci0000:00/0000:00:03.0/sriov_numvfs", "2\n")
        os.makedirs(os.path.join(sys_root, "bus/pci/drivers/ixgbe"))
        os.symlink(
            os.path.join(sys_root, "bus/pci/drivers/ixgbe"),
            os.path.join(sys_root, "devices/pci0000:00/0000:00:03.0/driver"),
        )
        os.makedirs(os.path.join(sys_root, "class/net/eth0"))
        os.symlink(
            os.path.join(sys_root, "devices/pci0000:00/0000:00:03.0"),
            os.path.join(sys_root, "class/net/eth0/device"),
        )
        # a GPU and a non-display device
        write(sys_root, "bus/pci/devices/0000:01:00.0/class", "0x030000\n")
        write(sys_root, "bus/pci/devices/0000:01:00.0/vendor", "0x10de\n")
        write(sys_root, "bus/pci/devices/0000:01:00.0/device", "0x2204\n")
        write(sys_root, "bus/pci/devices/0000:00:1f.0/class", "0x060100\n")
        self.mounts = [
            ("/dev/sda1", "/", "ext4"),
            ("nfs.example:/export/vm store", "/mnt/with space", "nfs4"),
            ("tmpfs", "/run", "tmpfs"),
        ]

    def statvfs(self, path):
        return os.statvfs_result((4096, 4096, 100, 40, 30, 0, 0, 0, 0, 255))

    def test_block_devices(self):
        disks = discovery.block_devices(self.mounts, self.sys, statvfs=self.statvfs)
        self.assertEqual([d["name"] for d in disks], ["nvme0n1", "sda"])
        nvme, sda = disks
        self.assertEqual((nvme["diskType"], nvme["interface"], nvme["serial"]), ("NVMe", "NVMe", "S123"))
        self.assertEqual(nvme["sizeBytes"], 4096 * 512)
        self.assertEqual((sda["diskType"], sda["interface"], sda["model"]), ("HDD", "SATA", "WDC"))
        self.assertEqual(
            sda["partitions"],
            [
                {
                    "name": "sda1",
                    "sizeBytes": 1024 * 512,
                    "mountPoint": "/",
                    "filesystem": "ext4",
                    "usedBytes": 60 * 4096,
                },
                {"name": "sda2", "sizeBytes": 512 * 512},
            ],
        )

    def test_nfs_mounts_and_octal_escapes(self):
        write(
            self.root,
            "proc/mounts",
            "srv:/e\\040x /mnt/a\\040b nfs rw 0 0\nproc /proc proc rw 0 0\nshort line\n",
        )
        mounts = discovery.read_mounts(os.path.join(self.root, "proc"))
        self.assertEqual(mounts[0], ("srv:/e x", "/mnt/a b", "nfs"))
        nfs = discovery.nfs_mounts(self.mounts, statvfs=self.statvfs)
        self.assertEqual(
            nfs,
            [
                {
                    "mountPoint": "/mnt/with space",
                    "server": "nfs.example",
                    "exportPath": "/export/vm store",
                    "sizeBytes": 100 * 4096,
                    "usedBytes": 60 * 4096,
                    "availableBytes": 30 * 4096,
                }
            ],
        )
        # a mount whose server never answers: zero sizes instead of a hung request
        self.assertEqual(discovery.nfs_mounts(self.mounts, statvfs=lambda p: None)[0]["sizeBytes"], 0)

    def test_network(self):
        nics = [
            hostinfo.NicFacts("eth0", "52:54:00:aa:bb:cc", ("10.0.0.2",), 10000, True),
            hostinfo.NicFacts("virbr0", "52:54:00:00:00:01", (), 0, True),
            hostinfo.NicFacts("eth1", "52:54:00:aa:bb:cd", (), -1, False),
        ]
        self.assertEqual(
            discovery.network(nics, self.sys),
            [
                {
                    "name": "eth0",
                    "macAddress": "52:54:00:aa:bb:cc",
                    "speedMbps": 10000,
                    "linkState": "up",
                    "driver": "ixgbe",
                    "pciAddress": "0000:00:03.0",
                    "sriovCapable": True,
                    "sriovVfs": 2,
                },
                {"name": "eth1", "macAddress": "52:54:00:aa:bb:cd", "speedMbps": 0, "linkState": "down"},
            ],
        )

    def test_gpus_with_and_without_pci_ids(self):
        ids = os.path.join(self.root, "pci.ids")
        with open(ids, "w") as fh:
            fh.write(
                "# comment\n10de  NVIDIA Corporation\n\t1234  Other\n"
                "\t2204  GA102 [GeForce RTX 3090]\n1002  AMD\n"
            )
        named = discovery.gpus(self.sys, name_of=lambda v, d: discovery.pci_name(v, d, [ids]))
        self.assertEqual(
            named,
            [
                {
                    "name": "NVIDIA Corporation GA102 [GeForce RTX 3090]",
                    "vendor": "NVIDIA",
                    "pciAddress": "0000:01:00.0",
                }
            ],
        )
        self.assertEqual(discovery.pci_name("10de", "ffff", [ids]), "NVIDIA Corporation")
        self.assertIsNone(discovery.pci_name("abcd", "0001", [ids, "/nonexistent"]))
        plain = discovery.gpus(self.sys, name_of=lambda v, d: None)
        self.assertEqual(plain[0]["name"], "NVIDIA display controller [10de:2204]")

    def test_missing_trees_are_empty(self):
        nowhere = os.path.join(self.root, "nowhere")
        self.assertEqual(discovery.block_devices([], nowhere), [])
        self.assertEqual(discovery.gpus(nowhere), [])
        self.assertEqual(discovery.read_mounts(nowhere), [])


class RealHostTests(unittest.TestCase):
    def test_whole_body_from_this_host_is_json_with_integer_counts(self):
        conn = libvirt.open(f"test://{TEST_NODE_XML}")
        self.addCleanup(conn.close)
        body = discovery.discovery(hostinfo.collect(conn, hostname="h1", mgmt_ip="192.0.2.5"))
        json.dumps(body)
        self.assertEqual((body["hostname"], body["managementIp"]), ("h1", "192.0.2.5"))
        for key in ("cores", "threads", "sockets"):
            self.assertIsInstance(body["cpu"][key], int)
        self.assertGreater(body["memory"]["totalBytes"], 0)
        self.assertEqual(set(body["storage"]), {"local", "nfs", "iscsi"})
        for disk in body["storage"]["local"]:
            self.assertIsInstance(disk["sizeBytes"], int)
        self.assertIsInstance(body["network"], list)
        self.assertIsInstance(body["gpus"], list)
