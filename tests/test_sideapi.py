"""The 8443 side API end to end: a real daemon on the test driver, a real TLS client (treq trusting
the certificate the daemon generated), the reference guest peer behind the agent routes and the
qemu-ga stand-in behind the QEMU-agent routes."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import time

from twisted.internet import defer, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

import quantix
from quantix.hypervisor import hostinfo
from quantix.ops import regtoken
from quantix.proto import agent_pb2
from tests.guestpeer import GuestPeer
from tests.qgapeer import QemuGuestAgentPeer
from tests.sidehttp import SideClient
from tests.support import Daemon, wait_for

VM = "11111111-2222-3333-4444-555555555555"
STOPPED = "66666666-7777-8888-9999-000000000000"
V = "/api/v1/vms"


def served_cert(daemon: Daemon) -> bytes:
    with open(os.path.join(daemon.config.state_dir, "https", "server.crt"), "rb") as fh:
        return fh.read()


class LogEvents:
    """Collects formatted log lines while a test runs."""

    def __init__(self, testcase: unittest.TestCase) -> None:
        from twisted.logger import formatEvent

        self.lines: list[str] = []
        self._observer = lambda event: self.lines.append(formatEvent(event))
        globalLogPublisher.addObserver(self._observer)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observer)


class SideApiTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.log_dir = os.path.join(base, "qemu-logs")
        self.daemon = Daemon(
            self,
            **{
                "https.listen": "127.0.0.1:0",
                "node.management_ip": "127.0.0.1",
                "node.hostname": "node-a",
                "hypervisor.log_dir": self.log_dir,
                "agent.binary_path": os.path.join(base, "quantix-kvm-agent"),
            },
        )
        os.makedirs(self.log_dir)
        with open(os.path.join(self.log_dir, "vm-running.log"), "w") as fh:
            fh.write("".join(f"line {i}\n" for i in range(1, 6)))
        self.payload = os.urandom(150 * 1024)
        with open(self.daemon.config.agent.binary_path, "wb") as fh:
            fh.write(self.payload)
        socket_dir = self.daemon.config.agent.socket_dir
        os.makedirs(socket_dir)
        self.peer = GuestPeer(reactor)
        port = reactor.listenUNIX(os.path.join(socket_dir, f"{VM}.agent.sock"), self.peer)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.peer.hang_up)
        yield self.daemon.start()
        self.qga = QemuGuestAgentPeer()
        self.daemon.node.https.vm_routes.qga_runner = self.qga
        self.client = SideClient(self, served_cert(self.daemon), "127.0.0.1", self.daemon.node.https.port)
        yield wait_for(lambda: self.daemon.node.agents.info(VM).connected)

    # -- VM routes --------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_logs_by_uuid_and_by_name(self):
        code, body = yield self.client.get(f"{V}/{VM}/logs?lines=2")
        self.assertEqual(code, 200)
        self.assertEqual(
            {k: body[k] for k in ("vmId", "vmName", "qemuLog", "linesReturned", "truncated")},
            {
                "vmId": VM,
                "vmName": "vm-running",
                "qemuLog": "line 4\nline 5",
                "linesReturned": 2,
                "truncated": True,
            },
        )
        self.assertEqual(body["logPath"], os.path.join(os.path.realpath(self.log_dir), "vm-running.log"))
        self.assertIsInstance(body["logSizeBytes"], int)
        self.assertTrue(body["lastModified"].endswith("Z"))
        code, by_name = yield self.client.get(f"{V}/vm-running/logs")
        self.assertEqual((code, by_name["linesReturned"]), (200, 5))
        code, missing = yield self.client.get(f"{V}/vm-stopped/logs")
        self.assertEqual((code, missing["qemuLog"], missing["lastModified"]), (200, "", None))
        for bad in ("0", "1001", "many"):
            code, err = yield self.client.get(f"{V}/{VM}/logs?lines={bad}")
            self.assertEqual((code, err["error"]), (400, "invalid_parameter"))

    @defer.inlineCallbacks
    def test_unknown_vm_is_404_on_every_vm_route(self):
        routes = [
            ("GET", "logs"),
            ("GET", "qemu-agent/ping"),
            ("GET", "agent/ping"),
            ("POST", "agent/refresh"),
            ("GET", "agent/logs"),
            ("POST", "agent/shutdown"),
            ("POST", "agent/reboot"),
            ("GET", "agent/files/list?path=/"),
            ("GET", "agent/files/read?path=/etc/hostname"),
            ("POST", "agent/install"),
            ("POST", "agent/update"),
            ("POST", "cdrom/mount-agent-iso"),
        ]
        for method, route in routes:
            code, body = yield self.client.request(
                method, f"{V}/nope/{route}", body={} if method == "POST" else None
            )
            self.assertEqual(
                (code, body),
                (404, {"error": "vm_not_found", "message": "VM not found: nope"}),
                f"{method} {route}",
            )
        code, body = yield self.client.post(f"{V}/nope/execute", {"command": "true"})
        self.assertEqual((code, body["error"]), (404, "vm_not_found"))

    @defer.inlineCallbacks
    def test_qemu_agent_ping(self):
        code, body = yield self.client.get(f"{V}/{VM}/qemu-agent/ping")
        self.assertEqual((code, body), (200, {"available": True}))
        self.assertEqual(self.qga.timeouts, [5])
        self.qga.absent = True
        code, body = yield self.client.get(f"{V}/vm-running/qemu-agent/ping")
        self.assertEqual((code, body["available"]), (200, False))
        self.assertIn("not connected", body["error"])
        code, body = yield self.client.get(f"{V}/{STOPPED}/qemu-agent/ping")
        self.assertEqual(body, {"available": False, "error": "VM is not running (state: shut off)"})

    @defer.inlineCallbacks
    def test_agent_ping_refresh_and_telemetry(self):
        code, body = yield self.client.get(f"{V}/{VM}/agent/ping")
        self.assertEqual(code, 200)
        self.assertEqual(
            {k: body[k] for k in ("connected", "version", "osName", "hostname", "architecture")},
            {
                "connected": True,
                "version": "0.1.27-peer",
                "osName": "Ubuntu",
                "hostname": "peer-guest",
                "architecture": "x86_64",
            },
        )
        self.assertEqual(body["ipAddresses"], ["10.0.0.5"])
        self.assertIn("execute", body["capabilities"])
        self.assertNotIn("resourceUsage", body)
        self.peer.telemetry_on_refresh = True
        code, body = yield self.client.post(f"{V}/{VM}/agent/refresh")
        self.assertEqual(code, 200)
        self.assertEqual([r.sequence for r in self.peer.requests_of("ping")], [1])
        usage = body["resourceUsage"]
        self.assertEqual((usage["memoryTotalBytes"], usage["processCount"]), (1 << 30, 42))
        self.assertIsInstance(usage["memoryTotalBytes"], int)
        self.assertEqual(usage["disks"][0]["usagePercent"], 25.0)
        code, body = yield self.client.get(f"{V}/{STOPPED}/agent/ping")
        self.assertEqual((code, body["connected"], body["error"]), (200, False, "VM is not running"))

    @defer.inlineCallbacks
    def test_execute(self):
        code, body = yield self.client.post(f"{V}/{VM}/execute", {"command": "uname -a"})
        self.assertEqual((code, body["success"], body["exitCode"], body["timedOut"]), (200, True, 0, False))
        # No args: the agent runs the text with sh -c; 30 s (the default) is clamped to 25.
        self.assertEqual(body["stdout"], "uname -a |cwd=|env=|t=25")
        self.assertIsInstance(body["durationMs"], int)
        code, body = yield self.client.post(f"{V}/{VM}/execute", {"command": "x", "timeoutSeconds": 500})
        self.assertTrue(body["stdout"].endswith("t=25"))
        code, body = yield self.client.post(f"{V}/{VM}/execute", {"command": "x", "timeoutSeconds": 5})
        self.assertTrue(body["stdout"].endswith("t=5"))
        code, body = yield self.client.post(f"{V}/{VM}/execute", {"command": "false"})
        self.assertEqual(
            (code, body["success"], body["exitCode"], body["stderr"]), (200, False, 1, "false failed")
        )
        code, body = yield self.client.post(f"{V}/{VM}/execute", {"command": "explode"})
        self.assertEqual((body["success"], body["error"]), (False, "failed to spawn process: explode"))
        code, body = yield self.client.post(f"{V}/{VM}/execute", {"command": "sleep 9", "waitForExit": False})
        self.assertEqual((code, body["success"]), (200, True))
        code, body = yield self.client.post(f"{V}/{STOPPED}/execute", {"command": "true"})
        self.assertEqual(
            (code, body["success"], body["exitCode"], body["error"]), (200, False, -1, "VM is not running")
        )

    @defer.inlineCallbacks
    def test_execute_when_the_guest_never_answers(self):
        self.peer.silent = True
        started = time.monotonic()
        code, body = yield self.client.post(f"{V}/{VM}/execute", {"command": "true", "timeoutSeconds": 1})
        self.assertEqual(code, 504)
        self.assertEqual(body["error"], "guest_timeout")
        self.assertLess(time.monotonic() - started, 28)
        code, body = yield self.client.post(f"{V}/{VM}/agent/refresh")
        self.assertEqual((code, body["connected"]), (200, False))

    @defer.inlineCallbacks
    def test_agent_logs_shutdown_reboot(self):
        code, body = yield self.client.get(f"{V}/{VM}/agent/logs?lines=7")
        self.assertEqual((code, body["success"]), (200, True))
        self.assertEqual(body["lines"], ["journalctl -u quantix-kvm-agent -n 7 --no-pager|cwd=|env=|t=10"])
        code, body = yield self.client.post(f"{V}/{VM}/agent/shutdown")
        self.assertEqual((code, body["success"]), (200, True))
        code, body = yield self.client.post(f"{V}/{VM}/agent/reboot")
        self.assertEqual((code, body["success"]), (200, True))
        kinds = [s.type for s in self.peer.guest.shutdowns]
        self.assertEqual(kinds, [agent_pb2.SHUTDOWN_TYPE_POWEROFF, agent_pb2.SHUTDOWN_TYPE_REBOOT])
        code, body = yield self.client.post(f"{V}/{STOPPED}/agent/reboot")
        self.assertEqual((code, body["success"], body["error"]), (200, False, "VM is not running"))

    @defer.inlineCallbacks
    def test_guest_files(self):
        guest = self.peer.guest
        guest.files["/etc/hostname"] = b"peer-guest\n"
        guest.files["/etc/.hidden"] = b"x"
        code, body = yield self.client.get(f"{V}/{VM}/agent/files/list?path=/etc")
        self.assertEqual((code, body["success"], body["path"]), (200, True, "/etc"))
        self.assertEqual([e["name"] for e in body["entries"]], ["hostname"])
        entry = body["entries"][0]
        self.assertEqual((entry["isDirectory"], entry["sizeBytes"], entry["owner"]), (False, 11, "root"))
        self.assertTrue(entry["modifiedAt"].endswith("Z"))
        code, body = yield self.client.get(f"{V}/{VM}/agent/files/list?path=/etc&include_hidden=true")
        self.assertEqual([e["name"] for e in body["entries"]], [".hidden", "hostname"])
        code, body = yield self.client.get(f"{V}/{VM}/agent/files/read?path=/etc/hostname")
        self.assertEqual((code, body["success"], body["sizeBytes"]), (200, True, 11))
        self.assertEqual(base64.b64decode(body["content"]), b"peer-guest\n")
        big = os.urandom(200 * 1024)
        guest.files["/tmp/big"] = big
        code, body = yield self.client.get(f"{V}/{VM}/agent/files/read?path=/tmp/big")
        self.assertEqual(base64.b64decode(body["content"]), big)
        code, body = yield self.client.get(f"{V}/{VM}/agent/files/read?path=/nope")
        self.assertEqual((code, body["success"]), (200, False))
        self.assertIn("No such file", body["error"])

    @defer.inlineCallbacks
    def test_guest_file_paths_that_trick_are_refused(self):
        for route in ("read", "list"):
            code, body = yield self.client.get(f"{V}/{VM}/agent/files/{route}")
            self.assertEqual((code, body["error"]), (400, "missing_parameter"))
            for bad in (
                "/etc/../etc/shadow",
                "..%2Fetc",
                "etc/hostname",
                "//etc/hostname",
                "/etc/./x",
                "/a//b",
                "/x%00y",
            ):
                code, body = yield self.client.get(f"{V}/{VM}/agent/files/{route}?path={bad}")
                self.assertEqual((code, body["error"]), (400, "invalid_path"), bad)
        self.assertEqual(self.peer.requests_of("file_read"), [])
        self.assertEqual(self.peer.requests_of("list_directory"), [])

    @defer.inlineCallbacks
    def test_agent_install_and_update(self):
        code, body = yield self.client.post(f"{V}/{VM}/agent/install", {"force": False})
        self.assertEqual((code, body["success"], body["method"]), (200, True, "qemu-guest-agent"))
        self.assertEqual(self.qga.files["/tmp/quantix-kvm-agent"], self.payload)
        self.assertEqual(len(self.qga.execs), 1)
        self.qga.absent = True
        code, body = yield self.client.post(f"{V}/{VM}/agent/install", {"force": False})
        self.assertEqual((code, body["success"]), (200, False))
        self.assertIn("not connected", body["error"])

        code, body = yield self.client.post(f"{V}/{VM}/agent/update", {"targetVersion": "0.2.0"})
        self.assertEqual((code, body["success"], body["newVersion"]), (200, True, "0.2.0"))
        chunks = self.peer.guest.updates
        self.assertEqual(len(chunks), 3)  # 150 KiB in 64 KiB chunks
        self.assertEqual(b"".join(c.binary_data for c in chunks), self.payload)
        self.assertTrue(chunks[-1].is_last_chunk)
        self.assertEqual(chunks[0].total_size, len(self.payload))
        code, body = yield self.client.post(f"{V}/{STOPPED}/agent/update", {})
        self.assertEqual((code, body["success"]), (200, False))

    @defer.inlineCallbacks
    def test_mount_agent_iso(self):
        code, body = yield self.client.post(f"{V}/{VM}/cdrom/mount-agent-iso")
        self.assertEqual((code, body["error"]), (404, "iso_not_found"))
        iso_dir = self.daemon.config.storage.iso_images
        os.makedirs(iso_dir, exist_ok=True)
        for version in ("0.1.9", "0.1.27"):
            with open(os.path.join(iso_dir, f"quantix-kvm-agent-tools-{version}.iso"), "wb") as fh:
                fh.write(b"\0" * 2048)
        code, body = yield self.client.post(f"{V}/{VM}/cdrom/mount-agent-iso")
        self.assertEqual((code, body["success"], body["error"]), (200, False, "the VM has no CD-ROM drive"))

    # -- updates and registration ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_updates(self):
        code, body = yield self.client.get("/api/v1/updates/version")
        self.assertEqual(
            (code, body),
            (200, {"currentVersion": quantix.__version__, "channel": "stable", "hostname": "node-a"}),
        )
        code, body = yield self.client.get("/api/v1/updates/check")
        self.assertEqual((code, body["available"], body["currentVersion"]), (200, False, quantix.__version__))
        self.assertNotIn("latestVersion", body)
        self.assertEqual((body["components"], body["totalDownloadSize"]), ([], 0))
        code, body = yield self.client.get("/api/v1/updates/status")
        self.assertEqual((code, body["status"]), (200, "idle"))
        code, body = yield self.client.post("/api/v1/updates/apply")
        self.assertEqual((code, body["error"]), (501, "not_supported"))
        self.assertIn("package manager", body["message"])

    @defer.inlineCallbacks
    def test_registration_pull_flow(self):
        code, body = yield self.client.get("/api/v1/registration/ping")
        self.assertEqual((code, body["status"], body["version"]), (200, "ok", quantix.__version__))
        self.assertEqual((body["hostname"], body["managementIp"]), ("node-a", "127.0.0.1"))
        state = self.daemon.config.state_dir
        code, body = yield self.client.get("/api/v1/registration/token")
        self.assertEqual((code, body["error"]), (404, "no_token"))
        tok = yield threads.deferToThread(regtoken.mint, state)
        for header in (None, "Bearer QUANTIX-AAAA-BBBB-CCCC", tok.token, f"Basic {tok.token}"):
            headers = {"Authorization": [header]} if header else None
            code, body = yield self.client.get("/api/v1/registration/token", headers=headers)
            self.assertEqual((code, body["error"]), (401, "invalid_token"), header)
        auth = {"Authorization": [f"Bearer {tok.token}"]}
        code, body = yield self.client.get("/api/v1/registration/token", headers=auth)
        self.assertEqual(
            (code, body["token"], body["hostname"], body["managementIp"]),
            (200, tok.token, "node-a", "127.0.0.1"),
        )
        self.assertTrue(0 < body["expiresInSeconds"] <= 3600)
        self.assertTrue(body["expiresAt"].endswith("Z"))
        code, body = yield self.client.get("/api/v1/registration/discovery", headers=auth)
        self.assertEqual(code, 200)
        self.assertEqual((body["hostname"], body["managementIp"]), ("node-a", "127.0.0.1"))
        self.assertEqual((body["cpu"]["sockets"], body["cpu"]["cores"], body["cpu"]["threads"]), (2, 4, 8))
        self.assertEqual(set(body["storage"]), {"local", "nfs", "iscsi"})
        old = yield threads.deferToThread(regtoken.mint, state, lambda: time.time() - 7200)
        for path in ("token", "discovery"):
            code, body = yield self.client.get(
                f"/api/v1/registration/{path}", headers={"Authorization": [f"Bearer {old.token}"]}
            )
            self.assertEqual((code, body["error"]), (401, "token_expired"))
            self.assertIn("expired", body["message"])

    # -- protocol-level bad input ------------------------------------------------------------

    @defer.inlineCallbacks
    def test_bad_requests_get_json_errors(self):
        url = f"{V}/{VM}/execute"
        code, body = yield self.client.request("POST", url, raw=b"{not json")
        self.assertEqual((code, body["error"]), (400, "invalid_json"))
        for bad in (
            {},
            {"command": ""},
            {"command": 5},
            {"command": "x", "timeoutSeconds": "9"},
            {"command": "x", "waitForExit": "yes"},
        ):
            code, body = yield self.client.post(url, bad)
            self.assertEqual((code, body["error"]), (400, "invalid_request"), bad)
        code, body = yield self.client.request(
            "POST", url, raw=b'{"command":"' + b"x" * (1024 * 1024) + b'"}'
        )
        self.assertEqual((code, body["error"]), (413, "body_too_large"))
        code, body = yield self.client.request("POST", f"{V}/{VM}/agent/install", raw=b"[1,2]")
        self.assertEqual((code, body["error"]), (400, "invalid_json"))
        code, body = yield self.client.get("/api/v1/nothing/here")
        self.assertEqual((code, body["error"]), (404, "not_found"))
        code, body = yield self.client.get("/")
        self.assertEqual(code, 404)
        code, body = yield self.client.get(f"{V}/{VM}/execute")
        self.assertEqual((code, body["error"]), (405, "method_not_allowed"))
        self.assertEqual(self.peer.requests_of("execute"), [])

    @defer.inlineCallbacks
    def test_plaintext_http_to_the_tls_port_gets_no_http_answer(self):
        port = self.daemon.node.https.port

        def plain() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /api/v1/registration/ping HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                return data

        data = yield threads.deferToThread(plain)
        self.assertFalse(data.startswith(b"HTTP/"), data[:100])
        # ...and the listener still serves TLS afterwards.
        code, _ = yield self.client.get("/api/v1/registration/ping")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_curl_k(self):
        url = f"https://127.0.0.1:{self.daemon.node.https.port}/api/v1/updates/status"
        proc = yield threads.deferToThread(
            subprocess.run,
            ["curl", "-sk", "-w", "\n%{http_code} %{content_type}", url],
            capture_output=True,
            text=True,
            timeout=20,
        )
        body, status = proc.stdout.rsplit("\n", 1)
        self.assertEqual(status, "200 application/json; charset=utf-8")
        self.assertEqual(json.loads(body)["status"], "idle")


def local_address() -> str | None:
    """A non-loopback address of this host, to be a client the allow-list does not know."""
    ip = hostinfo.management_ip()
    return None if ip.startswith("127.") or ":" in ip else ip


class AccessTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.ip = local_address()
        if self.ip is None:
            raise unittest.SkipTest("this host has no non-loopback IPv4 address")
        self.log = LogEvents(self)

    @defer.inlineCallbacks
    def daemon(self, **overrides):
        values = {"https.listen": "0.0.0.0:0", "node.management_ip": self.ip}
        values.update(overrides)
        daemon = yield Daemon(self, **values).start()
        port = daemon.node.https.port
        cert = served_cert(daemon)
        local = SideClient(self, cert, "127.0.0.1", port, server_name=self.ip)
        return daemon, SideClient(self, cert, self.ip, port), local

    @defer.inlineCallbacks
    def test_default_allows_loopback_only_and_logs_refusals(self):
        _, remote, local = yield self.daemon(**{"node.management_ip": self.ip})
        for method, path in (
            ("POST", f"{V}/{VM}/execute"),
            ("POST", f"{V}/{VM}/agent/install"),
            ("GET", f"{V}/{VM}/agent/files/read?path=/etc/hostname"),
            ("POST", "/api/v1/updates/apply"),
            ("GET", f"{V}/{VM}/logs"),
            ("GET", "/api/v1/updates/status"),
        ):
            code, body = yield remote.request(
                method, path, body={"command": "true"} if method == "POST" else None
            )
            self.assertEqual((code, body["error"]), (403, "forbidden"), path)
            self.assertIn(self.ip, body["message"])
        refusals = [line for line in self.log.lines if line.startswith(f"refused {self.ip}")]
        self.assertEqual(len(refusals), 6)
        self.assertIn("/api/v1/updates/apply", "\n".join(refusals))
        code, _ = yield remote.get("/api/v1/registration/ping")  # open
        self.assertEqual(code, 200)
        code, _ = yield local.get("/api/v1/updates/status")
        self.assertEqual(code, 200)
        code, body = yield local.post("/api/v1/updates/apply")
        self.assertEqual(code, 501)  # loopback passes the list; the route itself refuses

    @defer.inlineCallbacks
    def test_allowed_clients_and_open_read_only(self):
        _, remote, _ = yield self.daemon(**{"https.allowed_clients": [f"{self.ip}/32"]})
        code, _ = yield remote.get("/api/v1/updates/status")
        self.assertEqual(code, 200)
        code, body = yield remote.post("/api/v1/updates/apply")
        self.assertEqual((code, body["error"]), (501, "not_supported"))

        _, remote, _ = yield self.daemon(**{"https.open_read_only": True})
        code, _ = yield remote.get(f"{V}/{VM}/logs")
        self.assertEqual(code, 200)
        code, body = yield remote.post("/api/v1/updates/apply")
        self.assertEqual((code, body["error"]), (403, "forbidden"))

    @defer.inlineCallbacks
    def test_control_plane_address_is_allowed(self):
        daemon, remote, _ = yield self.daemon(control_plane_url=f"http://{self.ip}:8080")
        yield wait_for(lambda: daemon.node.https.access.clients(self.ip))
        code, body = yield remote.post("/api/v1/updates/apply")
        self.assertEqual((code, body["error"]), (501, "not_supported"))

    @defer.inlineCallbacks
    def test_bearer_token_when_configured(self):
        _, _, local = yield self.daemon(**{"https.token": "s3cret"})
        code, body = yield local.get("/api/v1/updates/status")
        self.assertEqual((code, body["error"]), (403, "forbidden"))
        self.assertIn("bearer", body["message"])
        code, _ = yield local.get("/api/v1/updates/status", headers={"Authorization": ["Bearer s3cret"]})
        self.assertEqual(code, 200)
        code, _ = yield local.get("/api/v1/registration/ping")
        self.assertEqual(code, 200)


class ConfiguredTlsTests(unittest.TestCase):
    """``https.cert``/``key`` from config, and the optional client-certificate check."""

    timeout = 60

    @defer.inlineCallbacks
    def test_configured_certificate_and_client_ca(self):
        from tests import certs

        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        ca, other = certs.CA("side-ca"), certs.CA("stranger")
        server_cert, server_key = ca.issue("node", server=True)
        daemon = yield Daemon(
            self,
            **{
                "https.listen": "127.0.0.1:0",
                "https.cert": certs.write(base, "server.crt", server_cert),
                "https.key": certs.write(base, "server.key", server_key),
                "https.client_ca": certs.write(base, "ca.pem", ca.pem),
            },
        ).start()
        self.assertFalse(os.path.exists(os.path.join(daemon.config.state_dir, "https")))  # nothing generated
        port = daemon.node.https.port
        anonymous = SideClient(self, ca.pem, "127.0.0.1", port)
        code, body = yield anonymous.get("/api/v1/updates/status")
        self.assertEqual((code, body["error"]), (403, "forbidden"))
        self.assertIn("client certificate", body["message"])
        code, _ = yield anonymous.get("/api/v1/registration/ping")  # open: no certificate needed
        self.assertEqual(code, 200)
        cert, key = ca.issue("control-plane", server=False)
        trusted = SideClient(self, ca.pem, "127.0.0.1", port, client_pem=cert + key)
        code, _ = yield trusted.get("/api/v1/updates/status")
        self.assertEqual(code, 200)
        cert, key = other.issue("intruder", server=False)
        stranger = SideClient(self, ca.pem, "127.0.0.1", port, client_pem=cert + key)
        yield self.assertFailure(stranger.get("/api/v1/updates/status"), Exception)

    def test_unreadable_certificate_is_a_startup_error(self):
        from quantix.config import ListenError

        daemon = Daemon(
            self,
            **{
                "https.listen": "127.0.0.1:0",
                "https.cert": "/nonexistent/c.pem",
                "https.key": "/nonexistent/k.pem",
            },
        )
        with self.assertRaises(ListenError) as caught:
            daemon.node.https.startService()
        self.assertIn("https.cert /nonexistent/c.pem", str(caught.exception))
