"""Facts about this host: CPU, memory, disks, NICs, management IP, hypervisor capabilities.

Collected in a worker thread (psutil and libvirt calls block); the result is a plain attrs value
used by both ``GetNodeInfo`` and control-plane registration.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from pathlib import Path
from xml.etree import ElementTree as ET

import attrs
import libvirt
import psutil

from quantix.proto import node_pb2

#: Interface name prefixes that never carry the management address.
_VIRTUAL_PREFIXES = ("lo", "virbr", "vnet", "tap", "docker", "veth", "br-", "qtx")


@attrs.frozen
class CpuFacts:
    model: str
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    total_threads: int
    mhz: int
    features: tuple[str, ...] = ()


@attrs.frozen
class DiskFacts:
    device: str
    mount_point: str
    filesystem: str
    total_bytes: int
    used_bytes: int
    available_bytes: int


@attrs.frozen
class NicFacts:
    name: str
    mac: str
    ips: tuple[str, ...]
    speed_mbps: int
    up: bool


@attrs.frozen
class CapabilityFacts:
    live_migration: bool
    snapshots: bool
    hotplug: bool
    gpu_passthrough: bool
    nested: bool
    max_vcpus: int


@attrs.frozen
class HostFacts:
    hostname: str
    management_ip: str
    cpu: CpuFacts
    memory_total: int
    memory_available: int
    disks: tuple[DiskFacts, ...]
    nics: tuple[NicFacts, ...]
    capabilities: CapabilityFacts
    os_name: str
    kernel: str


def _cpu_model_from_caps(caps_xml: str) -> tuple[str, tuple[str, ...]]:
    root = ET.fromstring(caps_xml)
    cpu = root.find("host/cpu")
    if cpu is None:
        return "", ()
    model = cpu.findtext("model") or ""
    features = tuple(sorted(f.get("name", "") for f in cpu.findall("feature") if f.get("name")))
    return model, features


def _proc_cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_facts(conn: libvirt.virConnect) -> CpuFacts:
    """Topology from libvirt's node info (what the hypervisor schedules on); model from /proc."""
    _arch, _mem_mb, cpus, mhz, nodes, sockets, cores, threads = conn.getInfo()
    caps_model, features = _cpu_model_from_caps(conn.getCapabilities())
    model = _proc_cpu_model() or caps_model
    sockets_total = max(1, sockets * max(nodes, 1))
    return CpuFacts(
        model=model,
        sockets=sockets_total,
        cores_per_socket=max(1, cores),
        threads_per_core=max(1, threads),
        total_threads=max(1, cpus),
        mhz=int(mhz),
        features=features,
    )


def _default_route_interface() -> str | None:
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None


def _usable(ip: str, iface: str) -> bool:
    if iface.startswith(_VIRTUAL_PREFIXES):
        return False
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return False
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified)


def management_ip(addrs: dict | None = None, default_iface: str | None = None) -> str:
    """The address the control plane should dial: the default-route NIC first, IPv4 preferred."""
    addrs = psutil.net_if_addrs() if addrs is None else addrs
    default_iface = _default_route_interface() if default_iface is None else default_iface
    candidates: list[tuple[int, int, str]] = []
    for iface, entries in addrs.items():
        for entry in entries:
            if entry.family not in (socket.AF_INET, socket.AF_INET6) or not _usable(entry.address, iface):
                continue
            rank = (0 if iface == default_iface else 1, 0 if entry.family == socket.AF_INET else 1)
            candidates.append((*rank, entry.address.split("%")[0]))
    return min(candidates)[2] if candidates else "127.0.0.1"


def disk_facts() -> tuple[DiskFacts, ...]:
    out = []
    for part in psutil.disk_partitions(all=False):
        try:
            usage = psutil.disk_usage(part.mountpoint)
        except OSError:
            continue
        out.append(DiskFacts(part.device, part.mountpoint, part.fstype, usage.total, usage.used, usage.free))
    return tuple(out)


def nic_facts() -> tuple[NicFacts, ...]:
    stats = psutil.net_if_stats()
    out = []
    for name, entries in sorted(psutil.net_if_addrs().items()):
        if name == "lo":
            continue
        mac = next((e.address for e in entries if e.family == psutil.AF_LINK), "")
        ips = tuple(e.address.split("%")[0] for e in entries if e.family in (socket.AF_INET, socket.AF_INET6))
        st = stats.get(name)
        out.append(NicFacts(name, mac, ips, int(st.speed) if st else 0, bool(st and st.isup)))
    return tuple(out)


def _nested_enabled() -> bool:
    for mod in ("kvm_intel", "kvm_amd"):
        try:
            if Path(f"/sys/module/{mod}/parameters/nested").read_text().strip() in ("Y", "1"):
                return True
        except OSError:
            continue
    return False


def capability_facts(conn: libvirt.virConnect) -> CapabilityFacts:
    try:
        max_vcpus = int(conn.getMaxVcpus(None))
    except libvirt.libvirtError:
        max_vcpus = os.cpu_count() or 1
    iommu = Path("/sys/kernel/iommu_groups")
    return CapabilityFacts(
        live_migration=conn.getType() != "TEST",
        snapshots=True,
        hotplug=True,
        gpu_passthrough=iommu.is_dir() and any(iommu.iterdir()),
        nested=_nested_enabled(),
        max_vcpus=max_vcpus,
    )


def collect(
    conn: libvirt.virConnect, *, hostname: str | None = None, mgmt_ip: str | None = None
) -> HostFacts:
    """Blocking: gather every fact. Configured hostname/IP win over detection."""
    mem = psutil.virtual_memory()
    uname = os.uname()
    return HostFacts(
        hostname=hostname or socket.gethostname(),
        management_ip=mgmt_ip or management_ip(),
        cpu=cpu_facts(conn),
        memory_total=mem.total,
        memory_available=mem.available,
        disks=disk_facts(),
        nics=nic_facts(),
        capabilities=capability_facts(conn),
        os_name=uname.sysname,
        kernel=uname.release,
    )


class HostBox:
    """The host-facts box: the node's id and start time, and the host facts with the configured
    hostname and management IP applied."""

    def __init__(self, hostname: str = "", management_ip: str = "") -> None:
        self.hostname = hostname
        self.configured_ip = management_ip
        #: Set once the node service has read (or created) its persisted id, at start.
        self.node_id = ""
        #: ``time.monotonic()`` when the daemon (re)started.
        self.started_at = time.monotonic()

    def uptime(self) -> float:
        """From every thread: seconds since the daemon started."""
        return time.monotonic() - self.started_at

    def facts(self, conn: libvirt.virConnect) -> HostFacts:
        """Worker (libvirt, psutil, sysfs): the current facts, configured values winning."""
        return collect(conn, hostname=self.hostname or None, mgmt_ip=self.configured_ip or None)

    def management_ip(self) -> str:
        """Worker (may read the routing table): the configured management IP, else detected."""
        return self.configured_ip or management_ip()


# -- protobuf mapping (pure) --------------------------------------------------------------------


def node_info_message(
    node_id: str, facts: HostFacts, hv_name: str, hv_version: str
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
