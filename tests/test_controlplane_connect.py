"""The Connect-JSON client: encoding, error mapping, and real HTTP(S) against the fake control plane."""

from __future__ import annotations

import datetime
import email.utils
import json
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.trial import unittest

from quantix.controlplane.connect import (
    ConnectClient,
    ConnectError,
    decode,
    encode,
    error_from_response,
    parse_retry_after,
)
from quantix.proto import compute_pb2, storage_pb2
from tests.certs import server_tls
from tests.fakecp import FakeControlPlane, FakeCPServer, listen_silent

NODE = "limiquantix.compute.v1.NodeService"


class Encoding(unittest.TestCase):
    def test_request_is_camel_case_protojson(self) -> None:
        req = compute_pb2.RegisterNodeRequest(
            hostname="h1",
            management_ip="10.0.0.5",
            role=compute_pb2.NodeRole(compute=True),
            cpu_info=compute_pb2.CpuInfo(cores_per_socket=8, frequency_mhz=2400),
            memory_info=compute_pb2.MemoryInfo(total_bytes=1 << 34),
        )
        doc = json.loads(encode(req))
        self.assertEqual(doc["managementIp"], "10.0.0.5")
        self.assertEqual(doc["role"], {"compute": True})
        self.assertEqual(doc["cpuInfo"]["coresPerSocket"], 8)
        self.assertEqual(int(doc["memoryInfo"]["totalBytes"]), 1 << 34)
        self.assertNotIn("management_ip", doc)

    def test_decode_accepts_strings_enum_names_and_unknown_fields(self) -> None:
        body = json.dumps(
            {
                "id": "n-1",
                "status": {"phase": "READY", "futurePhaseDetail": 3},
                "spec": {"memory": {"totalBytes": "17179869184"}},
                "someNewField": {"x": 1},
            }
        ).encode()
        node = decode(body, compute_pb2.Node)
        self.assertEqual(node.id, "n-1")
        self.assertEqual(node.status.phase, compute_pb2.NodeStatus.READY)
        self.assertEqual(node.spec.memory.total_bytes, 17179869184)

    def test_decode_garbage_is_internal(self) -> None:
        exc = self.assertRaises(ConnectError, decode, b"<html>", compute_pb2.Node)
        self.assertEqual(exc.code, "internal")


class ErrorMapping(unittest.TestCase):
    def test_json_code_wins_over_status(self) -> None:
        err = error_from_response(404, b'{"code":"unimplemented","message":"nope"}')
        self.assertEqual((err.code, err.message, err.http_status), ("unimplemented", "nope", 404))
        err = error_from_response(501, b'{"code":"unimplemented","message":"x"}')
        self.assertEqual(err.code, "unimplemented")
        err = error_from_response(404, b'{"code":"not_found","message":"node not found"}')
        self.assertEqual(err.code, "not_found")

    def test_status_fallback_without_connect_body(self) -> None:
        self.assertEqual(error_from_response(404, b"404 page not found\n").code, "unimplemented")
        self.assertEqual(error_from_response(502, b"").code, "unavailable")
        self.assertEqual(error_from_response(401, b"").code, "unauthenticated")
        self.assertEqual(error_from_response(418, b"").code, "unknown")
        err = error_from_response(503, b'{"error":"updating","maintenance":true}', "5")
        self.assertEqual((err.code, err.message, err.retry_after), ("unavailable", "updating", 5.0))

    def test_retry_after(self) -> None:
        self.assertEqual(parse_retry_after("120"), 120.0)
        self.assertIsNone(parse_retry_after(""))
        self.assertIsNone(parse_retry_after("soon"))
        self.assertEqual(parse_retry_after("999999"), 3600.0)
        now = time.time()
        when = email.utils.format_datetime(
            datetime.datetime.fromtimestamp(now + 30, tz=datetime.UTC), usegmt=True
        )
        self.assertTrue(29 <= parse_retry_after(when, now=now) <= 31)


class Transport(unittest.TestCase):
    """Real HTTP over loopback."""

    def serve(self, cp: FakeControlPlane | None = None, tls: object = None) -> FakeCPServer:
        srv = FakeCPServer(reactor, cp or FakeControlPlane(), tls)
        srv.start()
        self.addCleanup(srv.stop)
        return srv

    @defer.inlineCallbacks
    def test_round_trip_and_headers(self) -> None:
        srv = self.serve()
        client = ConnectClient(reactor, srv.url + "/", token="s3cret")
        node = yield client.call(
            NODE,
            "RegisterNode",
            compute_pb2.RegisterNodeRequest(hostname="h1", management_ip="10.0.0.5:9090"),
            compute_pb2.Node,
        )
        self.assertEqual(node.hostname, "h1")
        self.assertEqual(node.management_ip, "10.0.0.5")
        self.assertEqual(node.status.phase, compute_pb2.NodeStatus.READY)
        (rec,) = srv.cp.requests
        self.assertEqual(rec.method, f"{NODE}/RegisterNode")
        self.assertEqual(rec.headers["content-type"], "application/json")
        self.assertEqual(rec.headers["authorization"], "Bearer s3cret")
        self.assertEqual(rec.headers["connect-protocol-version"], "1")

    @defer.inlineCallbacks
    def test_no_token_no_header(self) -> None:
        srv = self.serve()
        client = ConnectClient(reactor, srv.url)
        yield client.call(
            NODE,
            "RegisterNode",
            compute_pb2.RegisterNodeRequest(hostname="h", management_ip="1.2.3.4"),
            compute_pb2.Node,
        )
        self.assertNotIn("authorization", srv.cp.requests[0].headers)

    @defer.inlineCallbacks
    def test_errors(self) -> None:
        srv = self.serve()
        client = ConnectClient(reactor, srv.url)
        req = compute_pb2.UpdateHeartbeatRequest(node_id="nobody")
        err = yield self.assertFailure(
            client.call(NODE, "UpdateHeartbeat", req, compute_pb2.UpdateHeartbeatResponse), ConnectError
        )
        self.assertEqual((err.code, err.http_status), ("not_found", 404))
        err = yield self.assertFailure(
            client.call(
                NODE, "SyncFullState", compute_pb2.SyncFullStateRequest(), compute_pb2.SyncFullStateResponse
            ),
            ConnectError,
        )
        self.assertEqual((err.code, err.http_status), ("unimplemented", 501))
        err = yield self.assertFailure(
            client.call(NODE, "NoSuchMethod", req, compute_pb2.UpdateHeartbeatResponse), ConnectError
        )
        self.assertEqual((err.code, err.http_status), ("unimplemented", 404))
        srv.cp.maintenance = 7
        err = yield self.assertFailure(
            client.call(NODE, "UpdateHeartbeat", req, compute_pb2.UpdateHeartbeatResponse), ConnectError
        )
        self.assertEqual((err.code, err.http_status, err.retry_after), ("unavailable", 503, 7.0))

    @defer.inlineCallbacks
    def test_connection_refused_is_unavailable(self) -> None:
        srv = self.serve()
        yield srv.stop()
        client = ConnectClient(reactor, srv.url)
        err = yield self.assertFailure(
            client.call(NODE, "RegisterNode", compute_pb2.RegisterNodeRequest(), compute_pb2.Node),
            ConnectError,
        )
        self.assertEqual(err.code, "unavailable")
        self.assertIsNone(err.http_status)

    @defer.inlineCallbacks
    def test_timeout_is_deadline_exceeded(self) -> None:
        port, gone = listen_silent(self)
        client = ConnectClient(reactor, f"http://127.0.0.1:{port}", timeout=0.2)
        err = yield self.assertFailure(
            client.call(NODE, "RegisterNode", compute_pb2.RegisterNodeRequest(), compute_pb2.Node),
            ConnectError,
        )
        self.assertEqual(err.code, "deadline_exceeded")
        # Let the server notice the client hung up before the reactor is checked for leftovers.
        yield gone[0].addErrback(lambda _: None)

    def test_rejects_other_schemes(self) -> None:
        self.assertRaises(ValueError, ConnectClient, reactor, "cp.example:8080")

    @defer.inlineCallbacks
    def test_https_with_private_ca(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="qtx-test-tls-"))
        ca_pem, server_options = server_tls(tmp)
        srv = self.serve(tls=server_options)
        self.assertTrue(srv.url.startswith("https://"))
        client = ConnectClient(reactor, srv.url, ca_file=ca_pem, token="t")
        node = yield client.call(
            storage_pb2.DESCRIPTOR.package + ".StoragePoolService",
            "GetPool",
            storage_pb2.GetPoolRequest(id="missing"),
            storage_pb2.StoragePool,
        ).addErrback(lambda f: f.trap(ConnectError) and f.value)
        self.assertEqual(node.code, "not_found")  # the TLS call went through
        node = yield client.call(
            NODE,
            "RegisterNode",
            compute_pb2.RegisterNodeRequest(hostname="h", management_ip="1.2.3.4"),
            compute_pb2.Node,
        )
        self.assertTrue(node.id)

        # Another CA: the handshake must fail, and that is reported as unavailable.
        other_ca, _ = server_tls(tmp / "other")
        stranger = ConnectClient(reactor, srv.url, ca_file=other_ca)
        err = yield self.assertFailure(
            stranger.call(NODE, "RegisterNode", compute_pb2.RegisterNodeRequest(), compute_pb2.Node),
            ConnectError,
        )
        self.assertEqual(err.code, "unavailable")
        self.assertEqual(len(srv.cp.requests), 2)
