"""TLS and mutual TLS on the gRPC server: plaintext and wrong client certificates are refused."""

from __future__ import annotations

import os

import grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix import config as cfg
from quantix.proto import node_grpc, node_pb2
from tests.certs import CA, write
from tests.stderr import capture_stderr
from tests.support import Daemon


def health(channel: grpc.Channel):
    return node_grpc.NodeDaemonServiceStub(channel).HealthCheck(node_pb2.HealthCheckRequest(), timeout=5)


class TLSTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        # grpc's core logs each refused handshake these tests provoke ("Handshake failed ...").
        capture_stderr(self)
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ca = CA("quantix-test-ca")
        cert, key = self.ca.issue("node", server=True)
        self.server_cert = write(self.dir, "server.pem", cert)
        self.server_key = write(self.dir, "server.key", key)
        self.ca_file = write(self.dir, "ca.pem", self.ca.pem)

    def call(self, daemon: Daemon, credentials: grpc.ChannelCredentials | None) -> defer.Deferred:
        def run():
            address = f"127.0.0.1:{daemon.node.grpc.port}"
            channel = (
                grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
            )
            with channel:
                return health(channel)

        return threads.deferToThread(run)

    def refused(self, d: defer.Deferred) -> defer.Deferred:
        def ok(result):
            raise AssertionError(f"call unexpectedly succeeded: {result}")

        def err(failure):
            failure.trap(grpc.RpcError)
            self.assertEqual(failure.value.code(), grpc.StatusCode.UNAVAILABLE)

        return d.addCallbacks(ok, err)

    @defer.inlineCallbacks
    def test_tls_server_refuses_plaintext(self):
        daemon = yield Daemon(
            self, **{"server.tls_cert": self.server_cert, "server.tls_key": self.server_key}
        ).start()
        reply = yield self.call(daemon, grpc.ssl_channel_credentials(root_certificates=self.ca.pem))
        self.assertTrue(reply.healthy)
        yield self.refused(self.call(daemon, None))

    @defer.inlineCallbacks
    def test_mtls_requires_a_client_cert_from_the_ca(self):
        daemon = yield Daemon(
            self,
            **{
                "server.tls_cert": self.server_cert,
                "server.tls_key": self.server_key,
                "server.tls_client_ca": self.ca_file,
            },
        ).start()
        good_cert, good_key = self.ca.issue("control-plane", server=False)
        rogue_cert, rogue_key = CA("someone-else").issue("control-plane", server=False)
        ok = grpc.ssl_channel_credentials(self.ca.pem, private_key=good_key, certificate_chain=good_cert)
        reply = yield self.call(daemon, ok)
        self.assertTrue(reply.healthy)
        no_cert = grpc.ssl_channel_credentials(self.ca.pem)
        yield self.refused(self.call(daemon, no_cert))
        wrong = grpc.ssl_channel_credentials(self.ca.pem, private_key=rogue_key, certificate_chain=rogue_cert)
        yield self.refused(self.call(daemon, wrong))
        yield self.refused(self.call(daemon, None))

    def test_half_configured_tls_is_a_config_error(self):
        with self.assertRaises(cfg.ConfigError) as caught:
            cfg.load(None, environ={"QUANTIX_SERVER_TLS_CERT": self.server_cert})
        self.assertIn("tls_key", str(caught.exception))


class MessageLimitTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_oversize_request_is_refused(self):
        from tests.support import rpc_error

        daemon = yield Daemon(self, **{"server.max_message_bytes": 4096}).start()
        code, _ = yield rpc_error(daemon.call("GetVMStatus", node_pb2.VMIdRequest(vm_id="x" * 8192)))
        self.assertEqual(code, grpc.StatusCode.RESOURCE_EXHAUSTED)
        reply = yield daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        self.assertTrue(reply.healthy)
