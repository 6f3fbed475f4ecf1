"""The NoCloud seed ISO, read back with pycdlib as the guest would see it."""

from __future__ import annotations

import io
import os
import stat
import tempfile

import pycdlib
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from quantix.errors import Invalid
from quantix.hypervisor import cloudinit
from quantix.proto import node_pb2

VM_ID = "6f1c2a9e-0d4b-4c55-9a57-3b8e2f1d7c01"


def read_iso(path: str) -> tuple[bytes, dict[str, bytes], dict[str, bytes]]:
    """(volume label, files by Rock Ridge name, files by Joliet name)."""
    iso = pycdlib.PyCdlib()
    iso.open(path)
    try:
        label = iso.pvd.volume_identifier.rstrip(b" ")
        rr, joliet = {}, {}
        for child in iso.list_children(rr_path="/"):
            if child.is_dot() or child.is_dotdot():
                continue
            name = child.rock_ridge.name().decode()
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path=f"/{name}")
            rr[name] = buf.getvalue()
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, joliet_path=f"/{name}")
            joliet[name] = buf.getvalue()
        return label, rr, joliet
    finally:
        iso.close()


class SeedIsoTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="qtx-test-ci-")
        self.addCleanup(self._rmtree)

    def _rmtree(self) -> None:
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)

    def test_label_and_all_four_files(self) -> None:
        cfg = node_pb2.CloudInitConfig(
            user_data="#cloud-config\npackages: [htop]\n",
            meta_data="instance-id: abc\nlocal-hostname: web\n",
            network_config="version: 2\nethernets: {}\n",
            vendor_data="#cloud-config\nruncmd: [true]\n",
        )
        path = cloudinit.write_nocloud_iso(os.path.join(self.dir, "seed.iso"), VM_ID, "web", cfg)
        label, rr, joliet = read_iso(path)
        self.assertEqual(label, b"cidata")
        expected = {
            "user-data": cfg.user_data.encode(),
            "meta-data": cfg.meta_data.encode(),
            "network-config": cfg.network_config.encode(),
            "vendor-data": cfg.vendor_data.encode(),
        }
        self.assertEqual(rr, expected)
        self.assertEqual(joliet, expected)

    def test_meta_data_defaults_to_instance_id_and_hostname(self) -> None:
        cfg = node_pb2.CloudInitConfig(user_data="#cloud-config\n")
        path = cloudinit.write_nocloud_iso(os.path.join(self.dir, "seed.iso"), VM_ID, "db-1", cfg)
        _, rr, _ = read_iso(path)
        self.assertEqual(set(rr), {"user-data", "meta-data"})
        self.assertEqual(yaml.safe_load(rr["meta-data"]), {"instance-id": VM_ID, "local-hostname": "db-1"})

    def test_only_present_optional_files(self) -> None:
        cfg = node_pb2.CloudInitConfig(meta_data="instance-id: x\n", vendor_data="v")
        path = cloudinit.write_nocloud_iso(os.path.join(self.dir, "seed.iso"), VM_ID, "n", cfg)
        _, rr, _ = read_iso(path)
        # NoCloud needs user-data even when empty; network-config was not given.
        self.assertEqual(rr, {"meta-data": b"instance-id: x\n", "user-data": b"", "vendor-data": b"v"})

    def test_hostname_is_sanitized(self) -> None:
        self.assertEqual(cloudinit.hostname_for("web-01", VM_ID), "web-01")
        self.assertEqual(cloudinit.hostname_for("My VM_1 (prod)", VM_ID), "my-vm-1-prod")
        self.assertEqual(cloudinit.hostname_for("日本", VM_ID), "vm-6f1c2a9e")
        self.assertEqual(len(cloudinit.hostname_for("a" * 100, VM_ID)), 63)
        meta = yaml.safe_load(cloudinit.default_meta_data(VM_ID, "x: y # z"))
        self.assertEqual(meta["local-hostname"], "x-y-z")

    def test_replaces_atomically_and_privately(self) -> None:
        path = os.path.join(self.dir, "seed.iso")
        cloudinit.write_nocloud_iso(path, VM_ID, "a", node_pb2.CloudInitConfig(user_data="one"))
        cloudinit.write_nocloud_iso(path, VM_ID, "a", node_pb2.CloudInitConfig(user_data="two"))
        _, rr, _ = read_iso(path)
        self.assertEqual(rr["user-data"], b"two")
        self.assertEqual(os.listdir(self.dir), ["seed.iso"])
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_failed_write_leaves_no_temp_file(self) -> None:
        target = os.path.join(self.dir, "is-a-dir")
        os.mkdir(target)
        self.addCleanup(os.rmdir, target)
        with self.assertRaises(OSError):
            cloudinit.write_nocloud_iso(target, VM_ID, "a", node_pb2.CloudInitConfig(user_data="x"))
        self.assertEqual(os.listdir(self.dir), ["is-a-dir"])

    def test_creates_parent_directory(self) -> None:
        sub = os.path.join(self.dir, "vm")
        self.addCleanup(os.rmdir, sub)
        path = os.path.join(sub, "cloud-init.iso")
        self.addCleanup(os.unlink, path)
        cloudinit.write_nocloud_iso(path, VM_ID, "a", node_pb2.CloudInitConfig())
        self.assertEqual(read_iso(path)[0], b"cidata")

    def test_oversized_file_is_invalid(self) -> None:
        cfg = node_pb2.CloudInitConfig(user_data="x" * (cloudinit.MAX_FILE_BYTES + 1))
        self.assertRaises(Invalid, cloudinit.nocloud_files, VM_ID, "a", cfg)

    def test_wants_cloud_init(self) -> None:
        self.assertFalse(cloudinit.wants_cloud_init(node_pb2.CloudInitConfig()))
        for field in ("user_data", "meta_data", "network_config", "vendor_data"):
            self.assertTrue(cloudinit.wants_cloud_init(node_pb2.CloudInitConfig(**{field: "x"})))

    @settings(max_examples=25, deadline=None)
    @given(user_data=st.text(), vendor=st.text())
    def test_any_text_round_trips(self, user_data: str, vendor: str) -> None:
        cfg = node_pb2.CloudInitConfig(user_data=user_data, vendor_data=vendor)
        path = os.path.join(self.dir, "seed.iso")
        cloudinit.write_nocloud_iso(path, VM_ID, "p", cfg)
        _, rr, joliet = read_iso(path)
        self.assertEqual(rr["user-data"].decode("utf-8"), user_data)
        self.assertEqual(rr.get("vendor-data", b"").decode("utf-8"), vendor)
        self.assertEqual(rr, joliet)
