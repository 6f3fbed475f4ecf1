"""A real daemon on an ephemeral port, called by a real grpc client."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from twisted.internet import defer, threads
from twisted.trial import unittest

from quantix.proto import node_pb2
from tests.support import Daemon, rpc_error, wait_for


class NodeRpcTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.daemon = yield Daemon(self).start()

    @defer.inlineCallbacks
    def test_health_check(self):
        reply = yield self.daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        self.assertTrue(reply.healthy)
        self.assertEqual(reply.hypervisor, "TEST")
        self.assertRegex(reply.hypervisor_version, r"^\d+\.\d+\.\d+$")
        self.assertTrue(reply.version)

    @defer.inlineCallbacks
    def test_node_info(self):
        reply = yield self.daemon.call("GetNodeInfo", empty_pb2.Empty())
        self.assertEqual(reply.node_id, self.daemon.node.node_id)
        self.assertTrue(reply.hostname)
        self.assertTrue(reply.management_ip)
        self.assertFalse(reply.management_ip.startswith("127."))
        # The private test-driver host declares 2 sockets x 2 cores x 2 threads at 2400 MHz.
        self.assertEqual(
            (reply.cpu.sockets, reply.cpu.cores_per_socket, reply.cpu.threads_per_core), (2, 2, 2)
        )
        self.assertEqual(reply.cpu.frequency_mhz, 2400)
        self.assertGreater(reply.memory.total_bytes, 0)
        self.assertTrue(reply.storage)
        self.assertEqual(reply.capabilities.name, "TEST")
        self.assertNotIn("lo", [n.name for n in reply.network])

    @defer.inlineCallbacks
    def test_node_info_metadata_names_the_build(self):
        """Daemon version, proto fingerprint and libvirt version ride as response metadata: the
        contract's NodeInfoResponse has no field for them."""
        from twisted.internet import threads

        from quantix import __version__, versions
        from quantix.proto import codegen

        stub = self.daemon.stub
        _, call = yield threads.deferToThread(stub.GetNodeInfo.with_call, empty_pb2.Empty(), timeout=10)
        built = dict(call.initial_metadata())
        self.assertEqual(built[versions.VERSION_KEY], __version__)
        self.assertEqual(built[versions.PROTO_KEY], codegen.fingerprint(codegen.source_root()))
        self.assertEqual(built[versions.LIBVIRT_KEY], self.daemon.node.hypervisor.identity.libvirt_version)

    @defer.inlineCallbacks
    def test_node_id_persists_across_restart(self):
        first = self.daemon.node.node_id
        yield self.daemon.stop()
        again = Daemon(self)
        again.config = self.daemon.config
        from twisted.internet import reactor

        from quantix.node import NodeService

        again.node = NodeService(again.config, reactor)
        yield again.start()
        self.assertEqual(again.node.node_id, first)

    def test_unclaimed_rpc_is_unimplemented(self):
        """Every RPC has a handler today; one a build leaves out answers UNIMPLEMENTED, named."""
        from concurrent.futures import ThreadPoolExecutor

        from quantix.proto import node_grpc
        from quantix.rpc.server import build_generic_handler

        server = grpc.server(ThreadPoolExecutor(2))
        server.add_generic_rpc_handlers([build_generic_handler({})])
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.addCleanup(channel.close)
        stub = node_grpc.NodeDaemonServiceStub(channel)
        with self.assertRaises(grpc.RpcError) as caught:
            stub.PrepareMigration(node_pb2.PrepareMigrationRequest(vm_id="x"), timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        self.assertIn("PrepareMigration", caught.exception.details())

    @defer.inlineCallbacks
    def test_health_service(self):
        stub = health_pb2_grpc.HealthStub(self.daemon.channel)
        name = "limiquantix.node.v1.NodeDaemonService"
        yield wait_for(lambda: self.daemon.node.hypervisor.connected)
        for service in ("", name):
            reply = yield threads.deferToThread(stub.Check, health_pb2.HealthCheckRequest(service=service))
            self.assertEqual(reply.status, health_pb2.HealthCheckResponse.SERVING, service)

    @defer.inlineCallbacks
    def test_reflection(self):
        stub = reflection_pb2_grpc.ServerReflectionStub(self.daemon.channel)

        def ask():
            requests = iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="limiquantix.node.v1.NodeDaemonService"
                    ),
                ]
            )
            return list(stub.ServerReflectionInfo(requests))

        listing, files = yield threads.deferToThread(ask)
        names = [s.name for s in listing.list_services_response.service]
        self.assertIn("limiquantix.node.v1.NodeDaemonService", names)
        self.assertIn("grpc.health.v1.Health", names)
        fd = descriptor_pb2.FileDescriptorProto.FromString(
            files.file_descriptor_response.file_descriptor_proto[0]
        )
        self.assertEqual(fd.package, "limiquantix.node.v1")


class HypervisorDownTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_unreachable_libvirt(self):
        """No libvirt: health says so, libvirt-backed RPCs are UNAVAILABLE, never a fake backend."""
        daemon = yield Daemon(
            self, **{"hypervisor.uri": "qemu+unix:///system?socket=/nonexistent/sock"}
        ).start(wait_connected=False)
        reply = yield daemon.call("HealthCheck", node_pb2.HealthCheckRequest())
        self.assertFalse(reply.healthy)
        code, details = yield rpc_error(daemon.call("GetNodeInfo", empty_pb2.Empty()))
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn("hypervisor unavailable", details)
