"""HealthCheck and GetNodeInfo: what the control plane asks a node before anything else."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from quantix import __version__
from quantix.facades import VmHost
from quantix.hypervisor import hostinfo
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc


class NodeRpcs:
    """Reads the host-facts box and the hypervisor box; never hops to the reactor."""

    def __init__(self, host: hostinfo.HostBox, hypervisor: VmHost) -> None:
        self.host = host
        self.hypervisor = hypervisor

    @rpc("HealthCheck")
    def health_check(
        self, request: node_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> node_pb2.HealthCheckResponse:
        hv = self.hypervisor
        ident = hv.identity
        return node_pb2.HealthCheckResponse(
            healthy=hv.connected,
            version=__version__,
            hypervisor=ident.name if ident else "",
            hypervisor_version=ident.version if ident else "",
            uptime_seconds=int(self.host.uptime()),
        )

    @rpc("GetNodeInfo")
    def get_node_info(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> node_pb2.NodeInfoResponse:
        hv = self.hypervisor
        facts = self.host.facts(hv.conn())
        ident = hv.identity
        name, version = (ident.name, ident.version) if ident else ("", "")
        return hostinfo.node_info_message(self.host.node_id, facts, name, version)
