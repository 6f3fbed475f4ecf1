"""Storage definitions and file views without libvirt: pool XML, planning, confinement, scans."""

from __future__ import annotations

import os
import re
import tempfile
import xml.etree.ElementTree as ET

from twisted.trial import unittest

from quantix import errors
from quantix.hypervisor.storage import files
from quantix.hypervisor.storage import manager as sm
from quantix.hypervisor.storage import xml as sxml

ROOT = "/srv/qtx"
FS = "{" + sxml.FS_NS + "}"


class PlanTests(unittest.TestCase):
    def test_local_without_path_lives_under_pools(self):
        plan = sm.plan_pool(sm.PoolRequest("p1", sm.LOCAL_DIR), ROOT)
        self.assertEqual(plan.kind, "dir")
        self.assertEqual(plan.target_path, "/srv/qtx/pools/p1")
        root = ET.fromstring(plan.xml)
        self.assertEqual(root.get("type"), "dir")
        self.assertEqual(root.findtext("name"), "p1")
        self.assertEqual(root.findtext("target/path"), "/srv/qtx/pools/p1")
        self.assertIsNone(root.find("uuid"))

    def test_local_with_path_and_uuid_id(self):
        pid = "0f8e7a52-6c1d-4d1e-9a3b-2b9f5d1c0a11"
        plan = sm.plan_pool(sm.PoolRequest(pid, sm.LOCAL_DIR, local_path="/data/vms/"), ROOT)
        root = ET.fromstring(plan.xml)
        self.assertEqual(root.findtext("target/path"), "/data/vms")
        self.assertEqual(root.findtext("uuid"), pid)

    def test_relative_local_path_is_invalid(self):
        self.assertRaises(
            errors.Invalid, sm.plan_pool, sm.PoolRequest("p", sm.LOCAL_DIR, local_path="x"), ROOT
        )

    def test_nfs_default_mount_point_and_options(self):
        req = sm.PoolRequest(
            "n1",
            sm.NFS,
            nfs_server="10.0.0.5",
            nfs_export="/export/vms",
            nfs_version="4.1",
            nfs_options="soft, ro",
        )
        plan = sm.plan_pool(req, ROOT)
        self.assertEqual(plan.kind, "netfs")
        self.assertEqual(plan.target_path, "/srv/qtx/mnt/nfs-n1")
        root = ET.fromstring(plan.xml)
        self.assertEqual(root.get("type"), "netfs")
        self.assertEqual(root.find("source/host").get("name"), "10.0.0.5")
        self.assertEqual(root.find("source/dir").get("path"), "/export/vms")
        self.assertEqual(root.find("source/format").get("type"), "nfs")
        self.assertEqual(root.findtext("target/path"), "/srv/qtx/mnt/nfs-n1")
        opts = [o.get("name") for o in root.findall(f"{FS}mount_opts/{FS}option")]
        self.assertEqual(opts, ["vers=4.1", "soft", "ro"])

    def test_nfs_given_mount_point_no_options(self):
        req = sm.PoolRequest("n2", sm.NFS, nfs_server="h", nfs_export="/e", nfs_mount_point="/mnt/x")
        root = ET.fromstring(sm.plan_pool(req, ROOT).xml)
        self.assertEqual(root.findtext("target/path"), "/mnt/x")
        self.assertIsNone(root.find(f"{FS}mount_opts"))

    def test_nfs_needs_server_and_export(self):
        self.assertRaises(errors.Invalid, sm.plan_pool, sm.PoolRequest("n", sm.NFS, nfs_server="h"), ROOT)

    def test_ceph_with_keyring_gets_a_secret(self):
        req = sm.PoolRequest(
            "c1", sm.CEPH_RBD, ceph_pool="rbd", ceph_monitors=("10.0.0.1", "10.0.0.2:3300", "[fd00::1]:6789")
        )
        plan = sm.plan_pool(req, ROOT, keyring=b"k" * 16)
        root = ET.fromstring(plan.xml)
        self.assertEqual(root.get("type"), "rbd")
        self.assertEqual(root.findtext("source/name"), "rbd")
        hosts = [(h.get("name"), h.get("port")) for h in root.findall("source/host")]
        self.assertEqual(hosts, [("10.0.0.1", "6789"), ("10.0.0.2", "3300"), ("fd00::1", "6789")])
        auth = root.find("source/auth")
        self.assertEqual((auth.get("type"), auth.get("username")), ("ceph", "admin"))
        self.assertEqual(auth.find("secret").get("uuid"), plan.secret.uuid)
        self.assertEqual(plan.secret.uuid, sm.secret_uuid("c1", "ceph"))  # stable across calls
        self.assertEqual(plan.secret.value, b"k" * 16)
        secret = ET.fromstring(sxml.secret_xml(plan.secret.uuid, "ceph", "quantix-c1", "d"))
        self.assertEqual(secret.find("usage").get("type"), "ceph")
        self.assertEqual(secret.findtext("usage/name"), "quantix-c1")
        self.assertEqual(secret.get("private"), "yes")

    def test_ceph_with_existing_secret_and_without_auth(self):
        req = sm.PoolRequest("c2", sm.CEPH_RBD, ceph_pool="p", ceph_monitors=("m",), ceph_secret_uuid="u-1")
        plan = sm.plan_pool(req, ROOT, keyring=None)
        self.assertIsNone(plan.secret)
        self.assertEqual(ET.fromstring(plan.xml).find("source/auth/secret").get("uuid"), "u-1")
        req = sm.PoolRequest("c3", sm.CEPH_RBD, ceph_pool="p", ceph_monitors=("m",))
        self.assertIsNone(ET.fromstring(sm.plan_pool(req, ROOT).xml).find("source/auth"))

    def test_iscsi_with_chap(self):
        req = sm.PoolRequest(
            "i1",
            sm.ISCSI,
            iscsi_portal="192.168.1.10",
            iscsi_target="iqn.2024-01.io.example:t1",
            iscsi_chap=True,
            iscsi_chap_user="u",
            iscsi_chap_password="pw",
        )
        plan = sm.plan_pool(req, ROOT)
        root = ET.fromstring(plan.xml)
        self.assertEqual(root.get("type"), "iscsi")
        host = root.find("source/host")
        self.assertEqual((host.get("name"), host.get("port")), ("192.168.1.10", "3260"))
        self.assertEqual(root.find("source/device").get("path"), "iqn.2024-01.io.example:t1")
        self.assertEqual(root.find("source/auth").get("type"), "chap")
        self.assertEqual(root.find("source/auth").get("username"), "u")
        self.assertEqual(root.findtext("target/path"), "/dev/disk/by-path")
        self.assertEqual((plan.secret.usage, plan.secret.value), ("iscsi", b"pw"))
        self.assertEqual(ET.fromstring(sxml.secret_xml("x", "iscsi", "t", "d")).findtext("usage/target"), "t")

    def test_iscsi_portal_port_and_bad_portal(self):
        req = sm.PoolRequest("i2", sm.ISCSI, iscsi_portal="127.0.0.1:1", iscsi_target="iqn.x:y")
        self.assertEqual(ET.fromstring(sm.plan_pool(req, ROOT).xml).find("source/host").get("port"), "1")
        bad = sm.PoolRequest("i3", sm.ISCSI, iscsi_portal="h:99999", iscsi_target="t")
        self.assertRaises(errors.Invalid, sm.plan_pool, bad, ROOT)

    def test_bad_pool_ids(self):
        for pid in ("", "a/b", "..", ".hidden", "x@y"):
            self.assertRaises(errors.Invalid, sm.plan_pool, sm.PoolRequest(pid, sm.LOCAL_DIR), ROOT)

    def test_unsupported_type(self):
        with self.assertRaises(errors.Invalid) as cm:
            sm.plan_pool(sm.PoolRequest("p", "ceph_fs"), ROOT)
        self.assertIn("ceph_fs", str(cm.exception))

    def test_same_backend(self):
        a = sxml.parse_pool(sxml.netfs_pool_xml("n", "h", "/e", "/m"))
        b = sxml.parse_pool(sxml.netfs_pool_xml("n", "h", "/e/", "/m/", version="3"))
        c = sxml.parse_pool(sxml.netfs_pool_xml("n", "other", "/e", "/m"))
        self.assertTrue(a.same_backend(b))
        self.assertFalse(a.same_backend(c))

    def test_keyring(self):
        text = '[client.admin]\n\tkey = QUJDREVGR0hJSktMTU5PUA==\n\tcaps mon = "allow *"\n'
        self.assertEqual(sm.keyring_key(text, "admin"), b"ABCDEFGHIJKLMNOP")
        self.assertEqual(sm.keyring_key(text, "other"), b"ABCDEFGHIJKLMNOP")  # the only key
        self.assertRaises(errors.Invalid, sm.keyring_key, "[client.a]\n", "a")


class VolumeXmlTests(unittest.TestCase):
    def test_names(self):
        self.assertEqual(sm.volume_name("dir", "v1", "qcow2"), "v1.qcow2")
        self.assertEqual(sm.volume_name("dir", "v1.raw", "qcow2"), "v1.raw")
        self.assertEqual(sm.volume_name("rbd", "v1", "raw"), "v1")
        self.assertEqual(sm.snapshot_name("v1.qcow2", "s1"), "v1@s1.qcow2")
        self.assertEqual(sm.volume_stem("v1@s1.qcow2"), "v1@s1")

    def test_volume_xml_with_backing(self):
        root = ET.fromstring(
            sxml.volume_xml("v.qcow2", 1024, "qcow2", backing_path="/i/b.img", backing_format="raw")
        )
        self.assertEqual(root.findtext("capacity"), "1024")
        self.assertEqual(root.find("capacity").get("unit"), "bytes")
        self.assertEqual(root.find("target/format").get("type"), "qcow2")
        self.assertEqual(root.findtext("backingStore/path"), "/i/b.img")
        self.assertEqual(root.find("backingStore/format").get("type"), "raw")

    def test_disk_xml_per_backend(self):
        vol = sxml.VolumeDef("v.qcow2", "/p/v.qcow2", "file", 1, "qcow2")
        disk = ET.fromstring(sxml.disk_xml(sxml.PoolDef("dir", "p", "/p"), vol))
        self.assertEqual((disk.get("type"), disk.get("device")), ("file", "disk"))
        self.assertEqual(disk.find("source").get("file"), "/p/v.qcow2")
        self.assertEqual(disk.find("driver").get("type"), "qcow2")
        self.assertEqual(disk.find("target").get("bus"), "virtio")
        rbd = sxml.PoolDef("rbd", "c", source_hosts=(("m1", "6789"),), source_name="rbd", auth_secret="s")
        disk = ET.fromstring(sxml.disk_xml(rbd, sxml.VolumeDef("v", "rbd/v", "network", 1, "raw")))
        self.assertEqual(disk.get("type"), "network")
        self.assertEqual(disk.find("source").get("protocol"), "rbd")
        self.assertEqual(disk.find("source").get("name"), "rbd/v")
        self.assertEqual(disk.find("source/host").get("port"), "6789")
        self.assertEqual(disk.find("auth/secret").get("uuid"), "s")
        lun = sxml.VolumeDef("unit:0:0:1", "/dev/disk/by-path/x", "block", 1, "")
        disk = ET.fromstring(sxml.disk_xml(sxml.PoolDef("iscsi", "i"), lun))
        self.assertEqual(disk.get("type"), "block")
        self.assertEqual(disk.find("source").get("dev"), "/dev/disk/by-path/x")


def _write(path: str, data: bytes = b"", mode: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)
    if mode is not None:
        os.chmod(path, mode)


class FileBrowserTests(unittest.TestCase):
    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="qtx-fb-")
        self.root = os.path.join(self.base, "pool")
        self.outside = os.path.join(self.base, "outside")
        _write(os.path.join(self.outside, "secret.txt"), b"s")
        _write(os.path.join(self.root, "b.ISO"), b"x" * 10, 0o640)
        _write(os.path.join(self.root, "a-noext"), b"")
        _write(os.path.join(self.root, "Zdir", "inner.qcow2"), b"QFI\xfb")
        os.makedirs(os.path.join(self.root, "adir"))
        os.symlink(self.outside, os.path.join(self.root, "escape"))
        os.symlink(os.path.join(self.outside, "secret.txt"), os.path.join(self.root, "leak.txt"))
        os.symlink(os.path.join(self.root, "Zdir"), os.path.join(self.root, "inside-link"))

    def tearDown(self):
        import shutil

        shutil.rmtree(self.base, ignore_errors=True)

    def test_listing_order_and_fields(self):
        entries = files.list_dir(self.root, "")
        names = [e.name for e in entries]
        self.assertEqual(names, ["adir", "inside-link", "Zdir", "a-noext", "b.ISO"])
        by = {e.name: e for e in entries}
        self.assertTrue(by["Zdir"].is_directory)
        self.assertEqual(by["Zdir"].file_type, "directory")
        self.assertEqual(by["Zdir"].size_bytes, 0)
        self.assertEqual(by["b.ISO"].file_type, "iso")
        self.assertEqual(by["b.ISO"].size_bytes, 10)
        self.assertEqual(by["b.ISO"].permissions, "640")
        self.assertEqual(by["a-noext"].file_type, "file")
        self.assertRegex(by["b.ISO"].modified_at, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")
        self.assertEqual(by["b.ISO"].path, "b.ISO")

    def test_subdirectory_paths(self):
        for rel in ("Zdir", "Zdir/", "/", "inside-link"):
            entries = files.list_dir(self.root, rel)
            if rel == "/":
                continue
            self.assertEqual([e.path for e in entries], [f"{rel.rstrip('/')}/inner.qcow2"])

    def test_escapes_are_invalid(self):
        for rel in (
            "..",
            "../outside",
            "Zdir/../..",
            "/etc",
            "/tmp",
            "escape",
            "escape/secret.txt",
            "a\x00b",
        ):
            self.assertRaises(errors.Invalid, files.list_dir, self.root, rel)

    def test_missing_path_is_not_found(self):
        self.assertRaises(errors.NotFound, files.list_dir, self.root, "nope")

    def test_file_is_not_a_directory(self):
        self.assertRaises(errors.Invalid, files.list_dir, self.root, "b.ISO")


class ImageScanTests(unittest.TestCase):
    def setUp(self):
        self.base = tempfile.mkdtemp(prefix="qtx-img-")
        self.isos = os.path.join(self.base, "isos")
        self.cloud = os.path.join(self.base, "cloud")
        iso = bytearray(0x8006)
        iso[0x8001:0x8006] = b"CD001"
        _write(os.path.join(self.isos, "sub", "deep", "install.iso"), bytes(iso))
        _write(os.path.join(self.cloud, "jammy.img"), b"QFI\xfb" + bytes(20) + (10 << 20).to_bytes(8, "big"))
        _write(os.path.join(self.cloud, "raw.raw"), b"\0" * 512)
        _write(os.path.join(self.cloud, "notes.txt"), b"x")
        _write(os.path.join(self.base, "elsewhere", "hidden.qcow2"), b"QFI\xfb")
        os.symlink(os.path.join(self.base, "elsewhere"), os.path.join(self.cloud, "out-dir"))
        os.symlink(
            os.path.join(self.base, "elsewhere", "hidden.qcow2"), os.path.join(self.cloud, "out.qcow2")
        )
        os.symlink(os.path.join(self.cloud, "jammy.img"), os.path.join(self.cloud, "alias.img"))
        os.symlink(self.cloud, os.path.join(self.cloud, "loop"))

    def tearDown(self):
        import shutil

        shutil.rmtree(self.base, ignore_errors=True)

    def test_scan(self):
        images = files.scan_images([self.cloud, self.isos, os.path.join(self.base, "missing")])
        by = {i.name: i for i in images}
        # alias.img and jammy.img are one file: listed once; links leaving the root are skipped.
        self.assertEqual(
            sorted(by), sorted(["install.iso", "raw.raw", by.get("alias.img", by.get("jammy.img")).name])
        )
        self.assertNotIn("hidden.qcow2", by)
        self.assertNotIn("out.qcow2", by)
        self.assertEqual(by["install.iso"].format, "iso")
        self.assertEqual(by["raw.raw"].format, "raw")
        self.assertEqual(by["raw.raw"].size_bytes, 512)
        qcow = by.get("jammy.img") or by["alias.img"]
        self.assertEqual(qcow.format, "qcow2")
        self.assertTrue(re.fullmatch(r"[0-9a-f]{32}", qcow.image_id))
        again = {i.name: i.image_id for i in files.scan_images([self.cloud, self.isos])}
        self.assertEqual(again[qcow.name], qcow.image_id)
        self.assertEqual(files.virtual_size(os.path.join(self.cloud, "jammy.img")), 10 << 20)
