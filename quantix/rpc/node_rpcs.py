"""HealthCheck and GetNodeInfo: what the control plane asks a node before anything else."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from quantix import __version__, versions
from quantix.facades import VmHost
from quantix.hypervisor import hostinfo
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc


def node_info_message(
    node_id: str, facts: hostinfo.HostFacts, hv_name: str, hv_version: str
) -> node_pb2.NodeInfoResponse:
    """Map host facts onto ``NodeInfoResponse`` (pure)."""
    cpu = facts.cpu
    caps = facts.capabilities
    return node_pb2.NodeInfoResponse(
        node_id=node_id,
        hostname=facts.hostname,
        management_ip=facts.management_ip,
        cpu=node_pb2.CpuInfo(
            model=cpu.model,
            sockets=cpu.sockets,
            cores_per_socket=cpu.cores_per_socket,
            threads_per_core=cpu.threads_per_core,
            total_threads=cpu.total_threads,
            frequency_mhz=cpu.mhz,
            features=list(cpu.features),
        ),
        memory=node_pb2.MemoryInfo(
            total_bytes=facts.memory_total,
            available_bytes=facts.memory_available,
            used_bytes=facts.memory_total - facts.memory_available,
        ),
        storage=[
            node_pb2.StorageInfo(
                device=d.device,
                mount_point=d.mount_point,
                total_bytes=d.total_bytes,
                used_bytes=d.used_bytes,
                available_bytes=d.available_bytes,
                filesystem=d.filesystem,
            )
            for d in facts.disks
        ],
        network=[
            node_pb2.NetworkInfo(
                name=n.name, mac_address=n.mac, ip_addresses=list(n.ips), speed_mbps=n.speed_mbps, up=n.up
            )
            for n in facts.nics
        ],
        capabilities=node_pb2.HypervisorCapabilities(
            name=hv_name,
            version=hv_version,
            supports_live_migration=caps.live_migration,
            supports_snapshots=caps.snapshots,
            supports_hotplug=caps.hotplug,
            supports_gpu_passthrough=caps.gpu_passthrough,
            supports_nested_virtualization=caps.nested,
            max_vcpus=caps.max_vcpus,
            max_memory_bytes=facts.memory_total,
        ),
    )


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
        return node_info_message(self.host.node_id, facts, name, version)


def build_metadata(libvirt_version: str) -> tuple[tuple[str, str], ...]:
    """What the daemon is built from, as ``GetNodeInfo`` response metadata: the contract's
    ``NodeInfoResponse`` has no field for it (``capabilities.version`` is the hypervisor's)."""
    return (
        (versions.VERSION_KEY, __version__),
        (versions.PROTO_KEY, _FINGERPRINT),
        (versions.LIBVIRT_KEY, libvirt_version),
    )


_FINGERPRINT = versions.proto_fingerprint()
