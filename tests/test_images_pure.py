"""Pure parts of the image box: checksum forms, SUMS files, names, confinement, job shapes."""

from __future__ import annotations

import json
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from quantix import errors
from quantix.images import checksum, jobs, target


class ChecksumTests(unittest.TestCase):
    def test_forms(self):
        self.assertIsNone(checksum.parse(""))
        self.assertEqual(checksum.parse("A" * 64).algorithm, "sha256")
        self.assertEqual(checksum.parse("a" * 128).algorithm, "sha512")
        self.assertEqual(checksum.parse("a" * 40).algorithm, "sha1")
        self.assertEqual(checksum.parse("sha512:" + "b" * 128).hexdigest, "b" * 128)
        self.assertEqual(checksum.parse("c" * 64, "SHA256").algorithm, "sha256")
        for bad in ("xyz", "a" * 63, "md5:" + "a" * 32, "sha256:" + "a" * 128):
            self.assertRaises(errors.Invalid, checksum.parse, bad)
        self.assertRaises(errors.Invalid, checksum.parse, "a" * 64, "sha1")

    def test_sums_layouts(self):
        text = "\n".join(
            [
                "-----BEGIN PGP SIGNED MESSAGE-----",
                "Hash: SHA256",
                "# comment",
                f"{'1' * 64}  other.img",
                f"{'2' * 64} *debian-12.qcow2",
                f"SHA256 (Fedora-41.qcow2) = {'3' * 64}",
                f"SHA512 (big.raw) = {'4' * 128}",
                "garbage line without structure",
            ]
        )
        find = lambda name: checksum.find_in_sums(text, name, "sha256", "u")  # noqa: E731
        self.assertEqual(find("debian-12.qcow2").hexdigest, "2" * 64)
        self.assertEqual(find("Fedora-41.qcow2").hexdigest, "3" * 64)
        self.assertEqual(find("big.raw").algorithm, "sha512")
        self.assertIsNone(find("missing.img"))

    @given(st.text(max_size=2000))
    def test_sums_parser_never_raises(self, text):
        checksum.find_in_sums(text, "x.img", "sha256", "u")


class TargetTests(unittest.TestCase):
    def test_names_follow_upstream(self):
        self.assertEqual(target.local_name("http://h/a/debian.img?x=1"), "debian.qcow2")
        self.assertEqual(target.local_name("http://h/a/ubuntu.qcow2"), "ubuntu.qcow2")
        self.assertEqual(target.local_name("http://h/a/alpine.raw"), "alpine.raw.qcow2")
        self.assertEqual(target.local_name("http://h/a/x", "given.raw"), "given.raw")
        for url, name in (("http://h/", ""), ("http://h/a", "../x"), ("http://h/a", ".hidden")):
            self.assertRaises(errors.Invalid, target.local_name, url, name)
        self.assertRaises(errors.Invalid, target.local_name, "http://h/x", "a.part")

    def test_urls(self):
        target.check_url("https://mirror.example/x.img")
        for bad in ("", "ftp://h/x", "file:///etc/passwd", "http:///x", "javascript:alert(1)"):
            self.assertRaises(errors.Invalid, target.check_url, bad)

    def test_confinement(self):
        root = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(root, "pool"))
        outside = os.path.realpath(self.mktemp())
        os.makedirs(outside)
        os.symlink(outside, os.path.join(root, "out"))
        self.assertEqual(target.confine(root + "/pool/new", [root]), root + "/pool/new")
        self.assertEqual(target.confine(root, [root]), root)
        for bad in ("rel", root + "/../x", root + "/out/x", outside, root + "x", "/"):
            self.assertRaises(target.InvalidTarget, target.confine, bad, [root])
        self.assertEqual(target.prepare_dir(root + "/a/b", ["", root]), root + "/a/b")
        self.assertTrue(os.path.isdir(root + "/a/b"))


class JobTests(unittest.TestCase):
    def test_rest_shape_folds_statuses(self):
        job = jobs.Job("j", "i", "http://h/x", "/t/x", bytes_total=2**40, bytes_downloaded=2**39)
        job.status = jobs.VERIFYING
        rest = job.rest()
        self.assertEqual((rest["status"], rest["progressPercent"]), ("downloading", 50))
        self.assertIsNone(rest["completedAt"])
        self.assertEqual(json.loads(json.dumps(rest))["bytesTotal"], 2**40)
        job.status = jobs.CANCELLED
        self.assertEqual((job.rest()["status"], job.rest()["errorMessage"]), ("failed", "cancelled"))

    def test_store_round_trip_and_damage(self):
        path = self.mktemp()
        job = jobs.Job("j", "i", "http://h/x", "/t/x", pool_id="p")
        with open(path, "w") as fh:
            fh.write(jobs.dump([job]))
        self.assertEqual(jobs.load(path), [job])
        with open(path, "w") as fh:
            fh.write("{broken")
        self.assertEqual(jobs.load(path), [])
        self.assertTrue(os.path.exists(path + ".damaged"))
        self.assertEqual(jobs.load(path), [])

    def test_store_record_with_wrong_types_is_damage(self):
        job = jobs.Job("j", "i", "http://h/x", "/t/x", completed_at=5)
        record = json.loads(jobs.dump([job]))["jobs"][0]
        self.assertEqual(jobs.Job.from_dict(record), job)
        for key, value in (("job_id", 1), ("bytes_total", "10"), ("completed_at", True), ("pool_id", [])):
            path = self.mktemp()
            with open(path, "w") as fh:
                json.dump({"version": 1, "jobs": [{**record, key: value}]}, fh)
            self.assertEqual(jobs.load(path), [], key)
            self.assertTrue(os.path.exists(path + ".damaged"), key)
        path = self.mktemp()
        with open(path, "w") as fh:
            json.dump({"version": 1, "jobs": [{k: v for k, v in record.items() if k != "url"}]}, fh)
        self.assertEqual(jobs.load(path), [])
