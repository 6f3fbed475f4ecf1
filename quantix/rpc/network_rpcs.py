"""The Open vSwitch / OVN port RPCs: thin wire mapping over :class:`quantix.network.NetworkPorts`."""

from __future__ import annotations

import grpc
from google.protobuf import empty_pb2

from quantix.network import ports
from quantix.network.service import NetworkPorts, OvsStatus
from quantix.proto import node_pb2
from quantix.rpc.registry import rpc

_EMPTY = empty_pb2.Empty()


def port_message(st: ports.PortStatus) -> node_pb2.NetworkPortInfo:
    b = st.binding
    return node_pb2.NetworkPortInfo(
        port_id=b.port_id,
        vm_id=b.vm_id,
        network_id=b.network_id,
        mac_address=b.mac,
        ip_addresses=list(b.ip_addresses),
        phase=node_pb2.NetworkPortPhase.ValueType(st.phase),
        error_message=st.error_message,
        ovs_port_name=st.ovs_port_name,
        ovn_port_name=b.ovn_port_name,
        interface_xml=st.interface_xml,
        rx_bytes=st.rx_bytes,
        tx_bytes=st.tx_bytes,
        rx_packets=st.rx_packets,
        tx_packets=st.tx_packets,
    )


def ovs_status_message(st: OvsStatus) -> node_pb2.OVSStatusResponse:
    return node_pb2.OVSStatusResponse(
        available=st.available,
        ovs_version=st.ovs_version,
        ovn_controller_connected=st.ovn_controller_connected,
        integration_bridge=st.integration_bridge,
        encap_type=st.encap_type,
        encap_ip=st.encap_ip,
        chassis_id=st.chassis_id,
    )


class NetworkRpcs:
    """Handlers; each runs in a gRPC worker thread and calls one :class:`NetworkPorts` method."""

    def __init__(self, network: NetworkPorts) -> None:
        self.network = network

    @rpc("GetOVSStatus")
    def get_ovs_status(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> node_pb2.OVSStatusResponse:
        return ovs_status_message(self.network.ovs_status())

    @rpc("ConfigureNetworkPort")
    def configure_network_port(
        self, request: node_pb2.ConfigureNetworkPortRequest, context: grpc.ServicerContext
    ) -> node_pb2.NetworkPortInfo:
        return port_message(self.network.configure(request))

    @rpc("DeleteNetworkPort")
    def delete_network_port(
        self, request: node_pb2.DeleteNetworkPortRequest, context: grpc.ServicerContext
    ) -> empty_pb2.Empty:
        self.network.delete(request.port_id)
        return _EMPTY

    @rpc("GetNetworkPortStatus")
    def get_network_port_status(
        self, request: node_pb2.GetNetworkPortStatusRequest, context: grpc.ServicerContext
    ) -> node_pb2.NetworkPortInfo:
        return port_message(self.network.status(request.port_id))

    @rpc("ListNetworkPorts")
    def list_network_ports(
        self, request: empty_pb2.Empty, context: grpc.ServicerContext
    ) -> node_pb2.ListNetworkPortsResponse:
        return node_pb2.ListNetworkPortsResponse(ports=[port_message(s) for s in self.network.list_ports()])
