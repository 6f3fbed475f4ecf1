"""Network-port bindings: the validated request, the libvirt interface XML, the phase (pure), and
the small persistent store that keeps bindings across restarts.

A binding ties a VM NIC (by MAC) to an OVN logical switch port (``ovn_port_name``): libvirt
plugs the tap into the integration bridge with ``interfaceid`` set, and ovn-controller claims the
OVS Interface whose ``external_ids:iface-id`` names the port.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
from twisted.logger import Logger

from quantix import state
from quantix.errors import Invalid, ResourceExhausted
from quantix.hypervisor.domainxml import NicSource, check_text, nic_element, validate_mac
from quantix.util.files import atomic_write

if TYPE_CHECKING:
    from quantix.proto import node_pb2

log = Logger(namespace="quantix.network.ports")

#: QoS bounds: 100 Gbit/s and 10 GB of burst are beyond any NIC this node drives.
MAX_RATE_KBPS = 100_000_000
MAX_BURST_KB = 10_000_000
MAX_IDS = 64
MAX_PORTS = 4096
MAX_NAME = 255

# binding_type numbers of the contract (NetworkPortBindingType)
BINDING_NORMAL = 0
_BINDING_NAMES = {1: "DIRECT", 2: "MACVTAP", 3: "VHOST_USER"}

# phases of the contract (NetworkPortPhase)
PENDING, BUILDING, ACTIVE, DOWN, ERROR = 1, 2, 3, 4, 5


@attrs.frozen
class QoS:
    ingress_rate_kbps: int = 0
    egress_rate_kbps: int = 0
    ingress_burst_kb: int = 0
    egress_burst_kb: int = 0


@attrs.frozen
class Binding:
    port_id: str
    vm_id: str
    mac: str
    ovn_port_name: str
    network_id: str = ""
    ip_addresses: tuple[str, ...] = ()
    qos: QoS = QoS()
    bridge: str = "br-int"


@attrs.frozen
class PortStatus:
    """What the node can say of a binding now; counters from the OVS Interface's statistics."""

    binding: Binding
    phase: int
    error_message: str = ""
    ovs_port_name: str = ""
    interface_xml: str = ""
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0


def _text(what: str, value: str, *, required: bool = True) -> str:
    check_text(what, value, max_len=MAX_NAME)
    if required and not value.strip():
        raise Invalid(f"{what} is required")
    return value


def _bounded(what: str, value: int, limit: int) -> int:
    if value > limit:
        raise Invalid(f"{what} {value} is out of range (at most {limit})")
    return int(value)


def binding_from_request(req: node_pb2.ConfigureNetworkPortRequest, bridge: str) -> Binding:
    """Validate a ``ConfigureNetworkPortRequest``; every refusal names the field."""
    if req.binding_type != BINDING_NORMAL:
        name = _BINDING_NAMES.get(req.binding_type, str(req.binding_type))
        raise Invalid(f"binding_type {name} is not supported by this node (only NORMAL: a tap on {bridge})")
    for what, items in (("ip_addresses", req.ip_addresses), ("security_group_ids", req.security_group_ids)):
        if len(items) > MAX_IDS:
            raise Invalid(f"{what} has {len(items)} entries (at most {MAX_IDS})")
    ips = []
    for ip in req.ip_addresses:
        try:
            ips.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            raise Invalid(f"ip_addresses: invalid address {ip!r}") from None
    if not req.mac_address:
        raise Invalid("mac_address is required")
    try:
        mac = validate_mac(req.mac_address)
    except Invalid as exc:
        raise Invalid(f"mac_address: {exc}") from None
    q = req.qos
    qos = QoS(
        ingress_rate_kbps=_bounded("qos.ingress_rate_kbps", q.ingress_rate_kbps, MAX_RATE_KBPS),
        egress_rate_kbps=_bounded("qos.egress_rate_kbps", q.egress_rate_kbps, MAX_RATE_KBPS),
        ingress_burst_kb=_bounded("qos.ingress_burst_kb", q.ingress_burst_kb, MAX_BURST_KB),
        egress_burst_kb=_bounded("qos.egress_burst_kb", q.egress_burst_kb, MAX_BURST_KB),
    )
    for direction in ("ingress", "egress"):
        if getattr(qos, f"{direction}_burst_kb") and not getattr(qos, f"{direction}_rate_kbps"):
            raise Invalid(f"qos.{direction}_burst_kb needs qos.{direction}_rate_kbps")
    return Binding(
        port_id=_text("port_id", req.port_id),
        vm_id=_text("vm_id", req.vm_id),
        mac=mac,
        ovn_port_name=_text("ovn_port_name", req.ovn_port_name),
        network_id=_text("network_id", req.network_id, required=False),
        ip_addresses=tuple(ips),
        qos=qos,
        bridge=bridge,
    )


def interface_id(binding: Binding) -> str | None:
    """libvirt's ``interfaceid`` (it sets ``external_ids:iface-id`` from it) must be a UUID: an OVN
    port named by one is bound by libvirt itself; any other name is set by this node once the VM
    runs (:meth:`quantix.network.service.NetworkPorts.vm_started`)."""
    try:
        return str(uuid.UUID(binding.ovn_port_name))
    except ValueError:
        return None


def nic_source(binding: Binding) -> NicSource:
    """How CreateVM plugs a NIC bound to this port."""
    qos = binding.qos
    # OVS "ingress" is traffic from the VM (policed on the Interface); traffic to the VM is
    # libvirt's <inbound>, in kB/s.
    inbound = (qos.egress_rate_kbps // 8, qos.egress_burst_kb) if qos.egress_rate_kbps else None
    return NicSource(
        "bridge",
        binding.bridge,
        virtualport="openvswitch",
        interfaceid=interface_id(binding),
        inbound=inbound,
    )


class _VirtioNic:
    """The NIC spec fields :func:`nic_element` reads, for a port that has no NicSpec."""

    model = 0
    bandwidth_mbps = 0


def interface_xml(binding: Binding) -> str:
    el = nic_element(_VirtioNic(), mac=binding.mac, source=nic_source(binding))
    return ET.tostring(el, encoding="unicode")


def phase_of(row: dict | None) -> tuple[int, str]:
    """Phase of a bound Interface row (``external_ids`` and ``link_state`` as dicts/strings)."""
    if row is None:
        return PENDING, ""
    if row.get("link_state") == "down":
        return DOWN, ""
    if row.get("external_ids", {}).get("ovn-installed") == "true":
        return ACTIVE, ""
    return BUILDING, ""


# -- persistence -----------------------------------------------------------------------------------


def _to_json(b: Binding) -> dict:
    return attrs.asdict(b)


def _from_json(d: dict) -> Binding:
    return Binding(**{**d, "ip_addresses": tuple(d.get("ip_addresses", ())), "qos": QoS(**d.get("qos", {}))})


class PortStore:
    """Bindings by port id, kept in ``<state_dir>/network-ports.json``; thread-safe.

    Loaded on first use (the state dir may not exist before the daemon starts) and rewritten
    atomically on every change, so a crash keeps either the old or the new set.
    """

    def __init__(self, state_dir: str) -> None:
        self._dir = state_dir
        self._lock = threading.Lock()
        self._ports: dict[str, Binding] | None = None

    @property
    def path(self) -> Path:
        return Path(self._dir) / "network-ports.json"

    def _load(self) -> dict[str, Binding]:
        if self._ports is None:
            loaded: dict[str, Binding] = {}
            try:
                raw = json.loads(self.path.read_text())
                loaded = {p["port_id"]: _from_json(p) for p in raw.get("ports", [])}
            except FileNotFoundError:
                pass
            except (ValueError, TypeError, KeyError) as exc:
                log.error("ignoring unreadable {path}: {err}", path=str(self.path), err=exc)
            self._ports = loaded  # published whole: see may_have_ports
        return self._ports

    def may_have_ports(self, vm_id: str) -> bool:
        """Any thread, without the lock (the reactor asks each time a VM runs, resumes
        included): False only when the loaded set has no port of ``vm_id``. The set is replaced
        whole on every change and never mutated after; before the first load it cannot tell."""
        ports = self._ports
        return ports is None or any(b.vm_id == vm_id for b in ports.values())

    def _save(self, ports: dict[str, Binding]) -> None:
        state.ensure_dir(self._dir)
        text = json.dumps({"ports": [_to_json(b) for b in ports.values()]}, indent=1)
        atomic_write(self.path, text + "\n")

    def put(self, binding: Binding) -> None:
        with self._lock:
            ports = dict(self._load())
            if binding.port_id not in ports and len(ports) >= MAX_PORTS:
                raise ResourceExhausted(f"this node keeps at most {MAX_PORTS} network ports")
            ports[binding.port_id] = binding
            self._save(ports)
            self._ports = ports

    def remove(self, port_id: str) -> Binding | None:
        with self._lock:
            ports = dict(self._load())
            gone = ports.pop(port_id, None)
            if gone is not None:
                self._save(ports)
                self._ports = ports
            return gone

    def get(self, port_id: str) -> Binding | None:
        with self._lock:
            return self._load().get(port_id)

    def all(self) -> list[Binding]:
        with self._lock:
            return sorted(self._load().values(), key=lambda b: b.port_id)

    def sources_for(self, vm_id: str) -> dict[str, NicSource]:
        """MAC → NIC source for the VM's bound ports (CreateVM's hook)."""
        with self._lock:
            return {b.mac: nic_source(b) for b in self._load().values() if b.vm_id == vm_id}
