"""HealthCheck and GetNodeInfo: what the control plane asks a node before anything else."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from quantix import __version__, versions
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
        context.send_initial_metadata(build_metadata(ident.libvirt_version if ident else ""))
        return hostinfo.node_info_message(self.host.node_id, facts, name, version)


def build_metadata(libvirt_version: str) -> tuple[tuple[str, str], ...]:
    """What the daemon is built from, as ``GetNodeInfo`` response metadata: the contract's
    ``NodeInfoResponse`` has no field for it (``capabilities.version`` is the hypervisor's)."""
    return (
        (versions.VERSION_KEY, __version__),
        (versions.PROTO_KEY, _FINGERPRINT),
        (versions.LIBVIRT_KEY, libvirt_version),
    )


_FINGERPRINT = versions.proto_fingerprint()
