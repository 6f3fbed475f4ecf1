"""Download jobs end to end: a real daemon, its 8080 listener, a real image server, qemu-img."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time

import treq
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool

from quantix.node import NodeService
from tests.imageserver import ImageServer, sha256
from tests.support import Daemon, wait_for

FAST = {
    "http.listen": "127.0.0.1:0",
    "downloads.idle_timeout": 1.0,
    "downloads.retry_initial_delay": 0.05,
    "downloads.retry_max_delay": 0.2,
}


def payload(size: int, seed: bytes = b"q") -> bytes:
    """Deterministic bytes that are not a known image format (qemu-img sees raw)."""
    out = bytearray()
    block = hashlib.sha512(seed).digest()
    while len(out) < size:
        block = hashlib.sha512(block).digest()
        out += block * 64
    return bytes(out[:size])


class DownloadTestCase(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.server = ImageServer().start(self)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.daemon = yield self.start_daemon()

    @defer.inlineCallbacks
    def start_daemon(self, **overrides):
        daemon = Daemon(self, **{**FAST, **overrides})
        yield daemon.start()
        self.images = daemon.config.storage.cloud_images
        self.base = f"http://127.0.0.1:{daemon.node.http.port}"
        return daemon

    @defer.inlineCallbacks
    def post(self, body, raw=None):
        data = raw if raw is not None else json.dumps(body).encode()
        response = yield treq.post(self.base + "/api/v1/images/download", data=data, pool=self.pool)
        text = yield response.content()
        return response.code, json.loads(text)

    @defer.inlineCallbacks
    def status(self, job_id):
        response = yield treq.get(self.base + f"/api/v1/images/download/{job_id}", pool=self.pool)
        text = yield response.content()
        return response.code, json.loads(text)

    def start(self, path, target_dir=None, **extra):
        body = {
            "url": self.server.url(path),
            "imageId": "img-1",
            "catalogId": "cat-1",
            "targetDir": target_dir or self.images,
            "checksum": "",
            **extra,
        }
        return self.post(body)

    @defer.inlineCallbacks
    def finish(self, job_id, timeout=60):
        """Poll like the control plane until the job has ended; the last body."""
        last = {}

        @defer.inlineCallbacks
        def poll():
            code, body = yield self.status(job_id)
            self.assertEqual(code, 200, body)
            last.update(body)

        deadline = reactor.seconds() + timeout
        while True:
            yield poll()
            if last["status"] in ("completed", "failed") or reactor.seconds() > deadline:
                return last
            yield wait_for(lambda: True, interval=0.05)
            from twisted.internet import task

            yield task.deferLater(reactor, 0.1, lambda: None)

    def assertNoPartials(self, directory=None):
        leftovers = [n for n in os.listdir(directory or self.images) if ".part" in n]
        self.assertEqual(leftovers, [])


class DownloadTests(DownloadTestCase):
    @defer.inlineCallbacks
    def test_download_shapes_file_and_mode(self):
        data = payload(3 * 1024 * 1024 + 17)
        self.server.add("/images/disk.raw", data)
        code, body = yield self.start("/images/disk.raw", filename="disk.raw")
        self.assertEqual(code, 200)
        self.assertEqual(set(body), {"jobId", "imageId", "targetPath", "message"})
        self.assertEqual(body["targetPath"], os.path.join(self.images, "disk.raw"))
        final = yield self.finish(body["jobId"])
        self.assertEqual(final["status"], "completed", final)
        self.assertEqual(
            set(final),
            {
                "jobId", "imageId", "catalogId", "url", "targetPath", "poolId", "status",
                "progressPercent", "bytesDownloaded", "bytesTotal", "errorMessage", "startedAt",
                "completedAt",
            },
        )  # fmt: skip
        self.assertEqual(final["bytesDownloaded"], len(data))
        self.assertIs(type(final["bytesDownloaded"]), int)
        self.assertEqual((final["bytesTotal"], final["progressPercent"]), (len(data), 100))
        self.assertIsNone(final["poolId"])
        self.assertIsNone(final["errorMessage"])
        self.assertRegex(final["completedAt"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        with open(body["targetPath"], "rb") as fh:
            self.assertEqual(sha256(fh.read()), sha256(data))
        self.assertEqual(os.stat(body["targetPath"]).st_mode & 0o777, 0o644)
        self.assertNoPartials()

    @defer.inlineCallbacks
    def test_redirect_is_followed(self):
        data = payload(200_000)
        self.server.add("/real/x.raw", data)
        self.server.add("/latest/x.raw", redirect=self.server.url("/real/x.raw"))
        _, body = yield self.start("/latest/x.raw", filename="x.raw")
        final = yield self.finish(body["jobId"])
        self.assertEqual(final["status"], "completed", final)
        self.assertEqual(final["bytesDownloaded"], len(data))

    @defer.inlineCallbacks
    def test_dropped_connection_resumes_with_range(self):
        data = payload(2 * 1024 * 1024)
        self.server.add("/d.raw", data, drop_after=700_000, drops=2)
        _, body = yield self.start("/d.raw", filename="d.raw")
        final = yield self.finish(body["jobId"])
        self.assertEqual(final["status"], "completed", final)
        ranges = [h.get("range") for h in self.server.seen("/d.raw")]
        self.assertEqual(ranges[0], None)
        self.assertEqual(len(ranges), 3, ranges)
        self.assertTrue(all(r and r.startswith("bytes=") for r in ranges[1:]), ranges)
        self.assertEqual([h.get("if-range") for h in self.server.seen("/d.raw")[1:]], ['"v1"', '"v1"'])
        with open(body["targetPath"], "rb") as fh:
            self.assertEqual(sha256(fh.read()), sha256(data))

    @defer.inlineCallbacks
    def test_stalled_server_times_out_and_resumes(self):
        data = payload(1024 * 1024)
        self.server.add("/s.raw", data, stall_after=300_000, stalls=1)
        _, body = yield self.start("/s.raw", filename="s.raw")
        final = yield self.finish(body["jobId"])
        self.assertEqual(final["status"], "completed", final)
        self.assertEqual(self.server.seen("/s.raw")[1].get("range"), "bytes=300000-")
        with open(body["targetPath"], "rb") as fh:
            self.assertEqual(sha256(fh.read()), sha256(data))

    @defer.inlineCallbacks
    def test_changed_file_restarts_from_zero(self):
        data = payload(1024 * 1024)
        entry = self.server.add("/c.raw", payload(1024 * 1024, b"old"), drop_after=500_000, drops=1)
        _, body = yield self.start("/c.raw", filename="c.raw")
        yield wait_for(lambda: len(self.server.seen("/c.raw")) >= 1)
        entry.data, entry.etag = data, '"v2"'  # If-Range no longer matches: 200 from byte 0
        final = yield self.finish(body["jobId"])
        self.assertEqual(final["status"], "completed", final)
        with open(body["targetPath"], "rb") as fh:
            self.assertEqual(sha256(fh.read()), sha256(data))

    @defer.inlineCallbacks
    def test_checksum_from_request_and_mismatch(self):
        data = payload(300_000)
        self.server.add("/ok.raw", data)
        self.server.add("/bad.raw", data)
        _, good = yield self.start("/ok.raw", filename="ok.raw", checksum="sha256:" + sha256(data))
        _, bad = yield self.start("/bad.raw", filename="bad.raw", checksum="0" * 64)
        final = yield self.finish(good["jobId"])
        self.assertEqual(final["status"], "completed", final)
        final = yield self.finish(bad["jobId"])
        self.assertEqual(final["status"], "failed")
        self.assertIn("checksum mismatch", final["errorMessage"])
        self.assertFalse(os.path.exists(bad["targetPath"]))
        self.assertNoPartials()

    @defer.inlineCallbacks
    def test_sums_file_beside_the_url(self):
        data = payload(300_000)
        self.server.add("/rel/good.img", data)
        self.server.add("/rel/evil.img", data)
        sums = f"{sha256(data)}  good.img\n{'1' * 64} *evil.img\n".encode()
        self.server.add("/rel/SHA256SUMS", sums, content_type="text/plain")
        _, good = yield self.start("/rel/good.img")
        _, evil = yield self.start("/rel/evil.img")
        final = yield self.finish(good["jobId"])
        self.assertEqual(final["status"], "completed", final)
        final = yield self.finish(evil["jobId"])
        self.assertEqual(final["status"], "failed")
        self.assertIn("checksum mismatch", final["errorMessage"])

    @defer.inlineCallbacks
    def test_bsd_checksum_file_and_no_sums_at_all(self):
        data = payload(100_000)
        self.server.add("/f/Fedora.qcow2", data)
        self.server.add("/f/CHECKSUM", f"SHA256 (Fedora.qcow2) = {'2' * 64}\n".encode())
        self.server.add("/n/plain.raw", data)
        _, fed = yield self.start("/f/Fedora.qcow2")
        _, plain = yield self.start("/n/plain.raw", filename="plain.raw")
        final = yield self.finish(fed["jobId"])
        self.assertIn("checksum mismatch", final["errorMessage"])
        final = yield self.finish(plain["jobId"])
        self.assertEqual(final["status"], "completed", final)  # no sums file: never a failure
        self.assertEqual(len(self.server.seen("/n/SHA256SUMS")), 1)

    @defer.inlineCallbacks
    def test_qemu_img_converts_raw_named_qcow2(self):
        tmp = self.mktemp()
        os.makedirs(tmp)
        raw, qcow = os.path.join(tmp, "a.raw"), os.path.join(tmp, "b.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", raw, "8M"], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "64M"], check=True)
        for name, path in (("cloud.img", raw), ("native.qcow2", qcow)):
            with open(path, "rb") as fh:
                self.server.add(f"/q/{name}", fh.read())
        seen = []
        _, conv = yield self.start("/q/cloud.img")
        self.daemon.node.downloads.watch(conv["jobId"], lambda job: seen.append(job.status))
        _, native = yield self.start("/q/native.qcow2")
        self.assertTrue(conv["targetPath"].endswith("/cloud.qcow2"))
        for job in (conv, native):
            final = yield self.finish(job["jobId"])
            self.assertEqual(final["status"], "completed", final)
            out = subprocess.run(
                ["qemu-img", "info", "--output=json", job["targetPath"]], capture_output=True, check=True
            )
            self.assertEqual(json.loads(out.stdout)["format"], "qcow2")
        self.assertIn("converting", seen)
        with open(native["targetPath"], "rb") as fh, open(qcow, "rb") as orig:
            self.assertEqual(fh.read(), orig.read())  # already qcow2: untouched

    @defer.inlineCallbacks
    def test_idempotent_while_active_and_when_present(self):
        data = payload(600_000)
        self.server.add("/i.raw", data, rate=1_000_000)
        _, first = yield self.start("/i.raw", filename="i.raw")
        _, again = yield self.start("/i.raw", filename="i.raw")
        self.assertEqual(again["jobId"], first["jobId"])
        yield self.finish(first["jobId"])
        code, present = yield self.start("/i.raw", filename="i.raw")
        self.assertEqual(code, 200)
        self.assertNotEqual(present["jobId"], first["jobId"])
        self.assertEqual(present["message"], "image already present")
        _, body = yield self.status(present["jobId"])
        self.assertEqual((body["status"], body["bytesDownloaded"]), ("completed", len(data)))
        self.assertEqual(len(self.server.seen("/i.raw")), 1)

    @defer.inlineCallbacks
    def test_at_most_max_concurrent_transfers(self):
        for n in range(3):
            self.server.add(f"/m{n}.raw", payload(400_000), rate=400_000)
        jobs = []
        for n in range(3):
            _, body = yield self.start(f"/m{n}.raw", filename=f"m{n}.raw")
            jobs.append(body["jobId"])
        yield wait_for(lambda: len(self.server.seen("/m0.raw")) and len(self.server.seen("/m1.raw")))
        _, third = yield self.status(jobs[2])
        self.assertEqual(third["status"], "pending")
        self.assertEqual(self.server.seen("/m2.raw"), [])
        for job_id in jobs:
            final = yield self.finish(job_id)
            self.assertEqual(final["status"], "completed")


class RestartTests(DownloadTestCase):
    @defer.inlineCallbacks
    def test_restart_mid_download_resumes_to_identical_file(self):
        data = payload(3 * 1024 * 1024, b"restart")
        self.server.add("/r/big.raw", data, rate=1_500_000)
        _, body = yield self.start("/r/big.raw", filename="big.raw")
        job_id = body["jobId"]
        engine = self.daemon.node.downloads
        yield wait_for(lambda: engine.jobs[job_id].bytes_downloaded > 500_000, timeout=30)
        yield self.daemon.node.stopService()
        part = body["targetPath"] + ".part"
        self.assertTrue(os.path.exists(part))
        kept = os.path.getsize(part)
        self.assertGreater(kept, 0)
        # A new daemon process state: a new service tree on the same state and storage dirs.
        node = NodeService(self.daemon.config, reactor)
        node.startService()
        self.addCleanup(lambda: node.stopService() if node.running else None)
        self.base = f"http://127.0.0.1:{node.http.port}"
        final = yield self.finish(job_id)
        self.assertEqual(final["status"], "completed", final)
        with open(body["targetPath"], "rb") as fh:
            self.assertEqual(sha256(fh.read()), sha256(data))
        resumed = self.server.seen("/r/big.raw")[-1]
        self.assertEqual(resumed.get("range"), f"bytes={kept}-")
        self.assertNoPartials()
        # Finished jobs are kept across restarts too.
        yield node.stopService()
        node = NodeService(self.daemon.config, reactor)
        node.startService()
        self.addCleanup(node.stopService)
        self.base = f"http://127.0.0.1:{node.http.port}"
        yield node.downloads.ready()
        code, again = yield self.status(job_id)
        self.assertEqual((code, again["status"]), (200, "completed"))


class BadInputTests(DownloadTestCase):
    @defer.inlineCallbacks
    def expect(self, code, error, body=None, raw=None):
        got_code, got = yield self.post(body, raw=raw)
        self.assertEqual((got_code, got.get("error")), (code, error), got)
        self.assertTrue(got.get("message"))

    def good(self, **changes):
        body = {"url": self.server.url("/x.raw"), "imageId": "i", "targetDir": self.images}
        body.update(changes)
        return {k: v for k, v in body.items() if v is not None}

    @defer.inlineCallbacks
    def test_bad_requests(self):
        yield self.expect(400, "invalid_request", self.good(url="ftp://example.com/x.img"))
        yield self.expect(400, "invalid_request", self.good(url="file:///etc/passwd"))
        yield self.expect(400, "invalid_request", self.good(url="http:///nohost"))
        for missing in ("url", "imageId", "targetDir"):
            yield self.expect(400, "invalid_request", self.good(**{missing: None}))
        yield self.expect(400, "invalid_request", self.good(imageId=7))
        yield self.expect(400, "invalid_json", raw=b"{not json")
        yield self.expect(400, "invalid_json", raw=b"[]")
        yield self.expect(413, "body_too_large", raw=b" " * (1024 * 1024 + 1))
        yield self.expect(400, "invalid_request", self.good(checksum="xyz"))
        yield self.expect(400, "invalid_request", self.good(filename="../x"))

    @defer.inlineCallbacks
    def test_target_confinement(self):
        root = self.daemon.config.storage.root
        yield self.expect(400, "invalid_target", self.good(targetDir="relative/dir"))
        yield self.expect(400, "invalid_target", self.good(targetDir=f"{root}/../escape"))
        yield self.expect(400, "invalid_target", self.good(targetDir="/etc"))
        outside = self.mktemp()
        os.makedirs(outside)
        os.makedirs(root, exist_ok=True)
        os.symlink(os.path.abspath(outside), os.path.join(root, "link-out"))
        yield self.expect(400, "invalid_target", self.good(targetDir=f"{root}/link-out/images"))
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(self.server.requests, [])

    @defer.inlineCallbacks
    def test_failing_servers(self):
        self.server.add("/page.img", b"<html>login</html>", content_type="text/html; charset=utf-8")
        self.server.add("/huge.raw", b"x", declared_length=2**60)
        self.server.add("/gone.raw", status=410)
        cases = {
            "/page.img": "HTML",
            "/missing.img": "HTTP 404",
            "/gone.raw": "HTTP 410",
            "/huge.raw": "insufficient space",
        }
        for path, text in cases.items():
            _, body = yield self.start(path, filename=path.strip("/") + ".x")
            final = yield self.finish(body["jobId"])
            self.assertEqual(final["status"], "failed", path)
            self.assertIn(text, final["errorMessage"], (path, final))
        self.assertNoPartials()
        self.assertEqual(len(self.server.seen("/huge.raw")), 1)

    @defer.inlineCallbacks
    def test_unknown_job(self):
        code, body = yield self.status("no-such-job")
        self.assertEqual((code, body["error"]), (404, "job_not_found"))


class GrpcTests(DownloadTestCase):
    """The same engine through gRPC: a real grpcio client against the daemon's port."""

    def stream(self, **fields):
        from quantix.proto import node_pb2 as pb

        request = pb.DownloadImageOnNodeRequest(**fields)
        call = self.daemon.stub.DownloadImage(request)
        return call, threads.deferToThread(list, call)

    @defer.inlineCallbacks
    def test_stream_reports_every_status_until_completed(self):
        from quantix.proto import node_pb2 as pb

        data = payload(1024 * 1024, b"grpc")
        self.server.add("/g/cloud.img", data, rate=700_000)
        began = time.monotonic()
        _, messages = self.stream(url=self.server.url("/g/cloud.img"), image_id="img-g", job_id="job-g")
        messages = yield messages
        elapsed = time.monotonic() - began
        S = pb.DownloadProgress.Status
        statuses = [m.status for m in messages]
        self.assertEqual(statuses[-1], S.STATUS_COMPLETED, messages[-1])
        self.assertIn(S.STATUS_DOWNLOADING, statuses)
        self.assertIn(S.STATUS_CONVERTING, statuses)  # raw bytes under a .qcow2 name
        last = messages[-1]
        self.assertEqual((last.job_id, last.image_id, last.progress_percent), ("job-g", "img-g", 100))
        self.assertEqual(last.path, os.path.join(self.images, "cloud.qcow2"))
        # At most one progress message a second while downloading (plus the status change).
        downloading = [m for m in messages if m.status == S.STATUS_DOWNLOADING]
        self.assertLessEqual(len(downloading), elapsed + 2, downloading)
        status = yield self.daemon.call("GetDownloadStatus", pb.GetDownloadStatusRequest(job_id="job-g"))
        self.assertEqual(status.status, S.STATUS_COMPLETED)
        code, rest = yield self.status("job-g")
        self.assertEqual((code, rest["status"]), (200, "completed"))

    @defer.inlineCallbacks
    def test_client_going_away_does_not_cancel_and_cancel_is_idempotent(self):
        from quantix.proto import node_pb2 as pb

        data = payload(2 * 1024 * 1024)
        self.server.add("/g/slow.raw", data, rate=500_000)
        call, done = self.stream(url=self.server.url("/g/slow.raw"), filename="slow.raw", job_id="job-s")
        engine = self.daemon.node.downloads
        yield wait_for(lambda: "job-s" in engine.jobs and engine.jobs["job-s"].bytes_downloaded > 100_000)
        call.cancel()
        yield self.assertFailure(done, Exception)
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(engine.jobs["job-s"].status, "downloading")
        yield self.daemon.call("CancelDownload", pb.CancelDownloadRequest(job_id="job-s"))
        self.assertNoPartials()
        _, rest = yield self.status("job-s")
        self.assertEqual((rest["status"], rest["errorMessage"]), ("failed", "cancelled"))
        yield self.daemon.call("CancelDownload", pb.CancelDownloadRequest(job_id="job-s"))
        status = yield self.daemon.call("GetDownloadStatus", pb.GetDownloadStatusRequest(job_id="job-s"))
        self.assertEqual(status.status, pb.DownloadProgress.Status.STATUS_CANCELLED)
        self.assertFalse(os.path.exists(os.path.join(self.images, "slow.raw")))

    @defer.inlineCallbacks
    def test_same_job_from_http_and_grpc(self):
        data = payload(600_000)
        self.server.add("/g/both.raw", data, rate=1_000_000)
        _, body = yield self.start("/g/both.raw", filename="both.raw")
        _, messages = self.stream(
            url=self.server.url("/g/both.raw"), filename="both.raw", target_dir=self.images
        )
        messages = yield messages
        self.assertEqual({m.job_id for m in messages}, {body["jobId"]})
        self.assertEqual(len(self.server.seen("/g/both.raw")), 1)


class NodectlTests(DownloadTestCase):
    def ctl(self, *argv):
        import io

        from quantix.ops import nodectl

        out, err = io.StringIO(), io.StringIO()
        address = f"127.0.0.1:{self.daemon.node.grpc.port}"
        d = threads.deferToThread(nodectl.main, ["--address", address, *argv], out, err)
        return d.addCallback(lambda code: (code, out.getvalue(), err.getvalue()))

    @defer.inlineCallbacks
    def test_download_piped_prints_lines_and_jobs_lists_it(self):
        data = payload(500_000)
        self.server.add("/n/tool.raw", data)
        code, out, err = yield self.ctl(
            "images", "download", self.server.url("/n/tool.raw"), "--filename", "t.raw"
        )
        self.assertEqual((code, err), (0, ""), out)
        self.assertIn("completed 100%", out)
        self.assertTrue(
            out.rstrip().endswith(f"{os.path.join(self.images, 't.raw')} ({len(data)} bytes)"), out
        )
        http = f"127.0.0.1:{self.daemon.node.http.port}"
        code, out, err = yield self.ctl("images", "jobs", "--http", http)
        self.assertEqual((code, err), (0, ""))
        self.assertRegex(out, r"(?m)^JOB\s+STATUS\s+DONE\s+BYTES\s+PATH\s+ERROR$")
        self.assertIn("completed", out)
        code, out, err = yield self.ctl("images", "download", self.server.url("/n/missing.raw"))
        self.assertEqual(code, 1)
        self.assertIn("HTTP 404", err)
