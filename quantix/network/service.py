"""The network box: Open vSwitch status and OVN port bindings for the VMs of this node.

Every public method of :class:`NetworkPorts` runs in a worker thread (a gRPC handler's): libvirt
lookups block there, and each OVSDB request crosses to the reactor, where the
:class:`~quantix.network.ovsdb.OvsdbClient` owns the connection, and waits for its answer there
(bounded by the client's timeout).
"""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import libvirt
from twisted.logger import Logger

from quantix.bridge import call_on_reactor
from quantix.errors import NotFound, Unavailable
from quantix.hypervisor import vms
from quantix.network import ports
from quantix.network.ovsdb import OvsdbClient, from_map, omap, oset, scalar
from quantix.util.reactor import INodeReactor

if TYPE_CHECKING:
    from quantix.proto import node_pb2

log = Logger(namespace="quantix.network")

#: external_ids keys this node sets on a bound Interface (and removes on delete).
_BINDING_KEYS = ("iface-id", "attached-mac", "iface-status", "vm-id")
#: The children of an <interface> that say where it is plugged.
_PLUG_TAGS = ("source", "virtualport", "bandwidth")
_INTERFACE_COLUMNS = ["name", "link_state", "external_ids", "statistics"]


@attrs.frozen
class OvsStatus:
    available: bool
    ovs_version: str = ""
    ovn_controller_connected: bool = False
    integration_bridge: str = ""
    encap_type: str = ""
    encap_ip: str = ""
    chassis_id: str = ""


class NetworkPorts:
    """Worker-thread facade; ``conn`` returns the live libvirt connection (or raises)."""

    def __init__(
        self,
        reactor: INodeReactor,
        conn: Callable[[], libvirt.virConnect],
        ovsdb: OvsdbClient,
        store: ports.PortStore,
        default_bridge: str = "br-int",
    ) -> None:
        self._reactor = reactor
        self._conn = conn
        self.ovsdb = ovsdb
        self.store = store
        self._default_bridge = default_bridge

    # -- OVSDB, from a worker thread ---------------------------------------------------------------

    def _transact(self, *ops: dict) -> list:
        return call_on_reactor(self._reactor, self.ovsdb.transact, *ops)

    def _switch(self, *columns: str) -> dict:
        """The ``Open_vSwitch`` row (one per database; empty before ``ovs-vsctl init``)."""
        select = {"op": "select", "table": "Open_vSwitch", "where": [], "columns": list(columns)}
        rows = self._transact(select)[0]["rows"]
        return rows[0] if rows else {}

    def _interfaces(self, where: list) -> list[dict]:
        rows = self._transact(
            {"op": "select", "table": "Interface", "where": where, "columns": _INTERFACE_COLUMNS}
        )
        return [_interface(r) for r in rows[0]["rows"]]

    # -- the RPCs --------------------------------------------------------------------------------

    def ovs_status(self) -> OvsStatus:
        """Never an error: OVS missing or unreachable is ``available=False``."""
        try:
            row = self._switch("ovs_version", "external_ids")
        except Unavailable as exc:
            log.debug("GetOVSStatus: {err}", err=exc)
            return OvsStatus(available=False)
        ext = from_map(row.get("external_ids"))
        return OvsStatus(
            available=True,
            ovs_version=scalar(row.get("ovs_version"), ""),
            ovn_controller_connected=_ovn_controller_connected(self.ovsdb.timeout),
            integration_bridge=ext.get("ovn-bridge", self._default_bridge),
            encap_type=ext.get("ovn-encap-type", ""),
            encap_ip=ext.get("ovn-encap-ip", ""),
            chassis_id=ext.get("system-id", ""),
        )

    def configure(self, request: node_pb2.ConfigureNetworkPortRequest) -> ports.PortStatus:
        """Persist the binding; if the VM runs with a NIC of that MAC, bind its OVS Interface."""
        binding = ports.binding_from_request(request, self._default_bridge)
        conn = self._conn()
        dom = vms.lookup(conn, binding.vm_id)  # VMNotFound before anything is kept
        binding = attrs.evolve(binding, bridge=self._integration_bridge())
        self.store.put(binding)
        xml = ports.interface_xml(binding)
        # The definition follows too, so the next boot plugs the NIC into OVS as this port.
        defined = _bind_definition(conn, dom, binding)
        if dom.state()[0] not in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED):
            note = "" if defined else f"VM has no NIC with MAC {binding.mac} yet"
            return ports.PortStatus(binding, ports.PENDING, error_message=note, interface_xml=xml)
        return self._bind_live(dom, binding, xml)

    def vm_started(self, vm_id: str) -> None:
        """The VM runs: bind the OVS Interfaces of its ports (libvirt binds only UUID-named ones)."""
        bindings = [b for b in self.store.all() if b.vm_id == vm_id]
        if not bindings:
            return
        dom = vms.lookup(self._conn(), vm_id)
        for binding in bindings:
            st = self._bind_live(dom, binding, ports.interface_xml(binding))
            if st.phase == ports.ERROR:
                log.warn(
                    "port {port} of VM {vm_id}: {err}",
                    port=binding.port_id,
                    vm_id=vm_id,
                    err=st.error_message,
                )

    def _bind_live(self, dom: libvirt.virDomain, binding: ports.Binding, xml: str) -> ports.PortStatus:
        tap = _tap_for_mac(dom, binding.mac)
        if tap is None:
            return ports.PortStatus(
                binding, ports.ERROR, error_message=f"VM has no NIC with MAC {binding.mac}", interface_xml=xml
            )
        qos = binding.qos
        where = [["name", "==", tap]]
        ids = {"iface-id": binding.ovn_port_name, "attached-mac": binding.mac, "iface-status": "active"}
        result = self._transact(
            {
                "op": "mutate",
                "table": "Interface",
                "where": where,
                "mutations": [
                    ["external_ids", "delete", oset(list(_BINDING_KEYS))],
                    ["external_ids", "insert", omap({**ids, "vm-id": binding.vm_id})],
                ],
            },
            {
                "op": "update",
                "table": "Interface",
                "where": where,
                "row": {
                    "ingress_policing_rate": qos.ingress_rate_kbps,
                    "ingress_policing_burst": qos.ingress_burst_kb,
                },
            },
        )
        if not result[0].get("count"):
            return ports.PortStatus(
                binding,
                ports.ERROR,
                error_message=f"NIC {binding.mac} ({tap}) is not on Open vSwitch",
                interface_xml=xml,
            )
        rows = self._interfaces(where)
        return self._status(binding, rows[0] if rows else None, xml)

    def delete(self, port_id: str) -> None:
        """Forget the port and unbind its Interface; unknown ports are already deleted."""
        binding = self.store.remove(port_id)
        if binding is None:
            return
        try:
            self._transact(
                {
                    "op": "mutate",
                    "table": "Interface",
                    "where": [_bound_to(binding)],
                    "mutations": [["external_ids", "delete", oset(list(_BINDING_KEYS))]],
                }
            )
        except Unavailable as exc:
            log.warn(
                "port {port} forgotten; its OVS Interface keeps its binding: {err}", port=port_id, err=exc
            )

    def status(self, port_id: str) -> ports.PortStatus:
        binding = self.store.get(port_id)
        if binding is None:
            raise NotFound(f"network port not found: {port_id}")
        return self._live([binding])[0]

    def list_ports(self) -> list[ports.PortStatus]:
        return self._live(self.store.all())

    # -- helpers ---------------------------------------------------------------------------------

    def _live(self, bindings: list[ports.Binding]) -> list[ports.PortStatus]:
        """Each binding with its Interface row, from one OVSDB select."""
        if not bindings:
            return []
        try:
            rows = self._interfaces([])  # a node has few Interfaces; one select serves every port
        except Unavailable as exc:
            return [ports.PortStatus(b, ports.ERROR, error_message=str(exc)) for b in bindings]
        by_port = {r["external_ids"].get("iface-id"): r for r in rows}
        return [self._status(b, by_port.get(b.ovn_port_name)) for b in bindings]

    @staticmethod
    def _status(binding: ports.Binding, row: dict | None, xml: str = "") -> ports.PortStatus:
        phase, message = ports.phase_of(row)
        stats = row["statistics"] if row else {}
        return ports.PortStatus(
            binding,
            phase,
            error_message=message,
            ovs_port_name=row["name"] if row else "",
            interface_xml=xml or ports.interface_xml(binding),
            rx_bytes=int(stats.get("rx_bytes", 0)),
            tx_bytes=int(stats.get("tx_bytes", 0)),
            rx_packets=int(stats.get("rx_packets", 0)),
            tx_packets=int(stats.get("tx_packets", 0)),
        )

    def _integration_bridge(self) -> str:
        """OVN's ``external_ids:ovn-bridge`` when OVSDB answers, else the configured default."""
        try:
            row = self._switch("external_ids")
        except Unavailable:
            return self._default_bridge
        return from_map(row.get("external_ids")).get("ovn-bridge", self._default_bridge)


def _interface(row: dict) -> dict:
    return {
        "name": row.get("name", ""),
        "link_state": scalar(row.get("link_state"), ""),
        "external_ids": from_map(row.get("external_ids")),
        "statistics": from_map(row.get("statistics")),
    }


def _bound_to(binding: ports.Binding) -> list:
    return ["external_ids", "includes", omap({"iface-id": binding.ovn_port_name})]


def _bind_definition(conn: libvirt.virConnect, dom: libvirt.virDomain, binding: ports.Binding) -> bool:
    """Make the persistent definition's NIC with the binding's MAC an OVS port (blocking).

    Only the plug changes (type, source, virtualport, bandwidth); model, driver and boot order
    stay. False when the VM has no such NIC.
    """
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE
    root = ET.fromstring(dom.XMLDesc(flags))
    for iface in root.iterfind("devices/interface"):
        mac = iface.find("mac")
        if mac is None or mac.get("address", "").lower() != binding.mac:
            continue
        wanted = ET.fromstring(ports.interface_xml(binding))
        iface.set("type", "bridge")
        for tag in _PLUG_TAGS:
            for old in iface.findall(tag):
                iface.remove(old)
            iface.extend(wanted.findall(tag))
        conn.defineXML(ET.tostring(root, encoding="unicode"))
        return True
    return False


def _tap_for_mac(dom: libvirt.virDomain, mac: str) -> str | None:
    """The live tap device of the domain's NIC with ``mac`` (blocking)."""
    root = ET.fromstring(dom.XMLDesc(0))
    for iface in root.iterfind("devices/interface"):
        m = iface.find("mac")
        target = iface.find("target")
        if m is not None and m.get("address", "").lower() == mac and target is not None:
            return target.get("dev")
    return None


def _ovn_controller_connected(timeout: float) -> bool:
    """``ovn-appctl connection-status`` says so; no ovn-controller (or no OVN) is ``False``."""
    appctl = shutil.which("ovn-appctl")
    if appctl is None:
        return False
    try:
        out = subprocess.run(
            [appctl, "-t", "ovn-controller", "connection-status"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() == "connected"
