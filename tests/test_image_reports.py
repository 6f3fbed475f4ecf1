"""Local images reported to the (fake) control plane by a real daemon after it registers."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial import unittest

from quantix.images.scan import Scanner
from tests.fakecp import FakeControlPlane, FakeCPServer
from tests.support import Daemon, wait_for


def make_images(directory: str) -> dict[str, str]:
    os.makedirs(os.path.join(directory, "nested"), exist_ok=True)
    paths = {name: os.path.join(directory, name) for name in ("ubuntu.qcow2", "debian.img", "notes.txt")}
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", paths["ubuntu.qcow2"], "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", paths["debian.img"], "1M"], check=True)
    for name in ("notes.txt", "half.qcow2.part", "nested/deep.qcow2"):
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(b"x")
    os.symlink(paths["debian.img"], os.path.join(directory, "link.img"))
    return paths


class ScannerTests(unittest.TestCase):
    def test_only_image_files_at_the_top(self):
        directory = self.mktemp()
        make_images(directory)
        found = {i.filename: i for i in Scanner(directory).scan()}
        self.assertEqual(sorted(found), ["debian.img", "ubuntu.qcow2"])
        self.assertEqual(
            (found["ubuntu.qcow2"].format, found["ubuntu.qcow2"].virtual_size_bytes), ("qcow2", 64 << 20)
        )
        self.assertEqual((found["debian.img"].format, found["debian.img"].size_bytes), ("raw", 1 << 20))
        self.assertRegex(found["debian.img"].modified_at, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertEqual(Scanner(directory + "/missing").scan(), [])

    def test_qemu_img_runs_once_per_file_version(self):
        directory = self.mktemp()
        make_images(directory)
        calls = []

        def info(path):
            calls.append(path)
            raise __import__("quantix.errors").errors.Invalid("no")

        scanner = Scanner(directory, info=info)
        first = scanner.scan()
        self.assertEqual({i.format for i in first}, {"qcow2", "img"})  # the extension when unreadable
        scanner.scan()
        self.assertEqual(len(calls), 2)


class ReportTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.cp = FakeControlPlane()
        self.server = FakeCPServer(reactor, self.cp)
        self.server.start()
        self.addCleanup(self.server.stop)

    @defer.inlineCallbacks
    def start(self, **overrides: Any):
        values = {
            "control_plane_url": self.server.url,
            "auto_register": True,
            "control_plane.heartbeat_interval": 0.2,
            "control_plane.startup_jitter": 0,
            **overrides,
        }
        self.daemon = Daemon(self, **values)
        self.paths = make_images(self.daemon.config.storage.cloud_images)
        yield self.daemon.start()
        return self.daemon

    def scans(self) -> list[dict[str, Any]]:
        return [r.body for r in self.cp.calls("ScanLocalImages")]

    @defer.inlineCallbacks
    def test_scan_after_registration_and_deletions(self):
        daemon = yield self.start()
        yield self.cp.wait_for(lambda: len(self.scans()) == 1)
        body = self.scans()[0]
        self.assertEqual(body["nodeId"], daemon.node.cplink.node_id)
        images = {i["filename"]: i for i in body["images"]}
        self.assertEqual(sorted(images), ["debian.img", "ubuntu.qcow2"])
        ubuntu = images["ubuntu.qcow2"]
        self.assertEqual(ubuntu["path"], self.paths["ubuntu.qcow2"])
        self.assertEqual((ubuntu["format"], ubuntu["virtualSizeBytes"]), ("qcow2", str(64 << 20)))
        self.assertEqual(images["debian.img"]["format"], "raw")
        self.assertEqual(ubuntu["detectedOs"].get("distribution", ""), "")  # the CP guesses then
        self.assertEqual(len(self.cp.images), 2)

        # A file removed is reported as deleted (snake_case); one added goes out on its own.
        os.unlink(self.paths["debian.img"])
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", self.paths["debian.img"] + ".new.qcow2", "8M"],
            check=True,
        )
        reports = daemon.node.image_reports
        done = reports.reports
        reports.rescan()
        yield wait_for(lambda: reports.reports > done and reports.idle())
        notes = [r.body for r in self.cp.calls("notify")]
        self.assertEqual(len(notes), 1)
        note = notes[0]
        self.assertEqual((note["event_type"], note["path"]), ("deleted", self.paths["debian.img"]))
        self.assertEqual(note["node_id"], daemon.node.cplink.node_id)
        self.assertEqual(len(self.scans()), 2)
        self.assertEqual([i["filename"] for i in self.scans()[1]["images"]], ["debian.img.new.qcow2"])
        self.assertEqual(
            sorted(path for _, path in self.cp.images),
            sorted([self.paths["ubuntu.qcow2"], self.paths["debian.img"] + ".new.qcow2"]),
        )

    @defer.inlineCallbacks
    def test_reregistration_reports_again_and_unimplemented_is_tolerated(self):
        self.cp.fail("ScanLocalImages", "unimplemented")
        daemon = yield self.start()
        yield self.cp.wait_for(lambda: len(self.cp.calls("UpdateHeartbeat")) >= 2)
        self.assertEqual(len(self.scans()), 1)
        self.cp.forget_nodes()  # the control plane restarted: the node registers again
        yield self.cp.wait_for(lambda: len(self.cp.calls("RegisterNode")) >= 2 and len(self.scans()) >= 2)
        yield self.cp.wait_for(lambda: len(self.cp.calls("UpdateHeartbeat")) >= 6)
        self.assertEqual(len(self.cp.images), 2)
        self.assertTrue(daemon.node.cplink.registered)
