"""The rest of the daemon, seen as the control-plane link's data sources.

The link asks for plain facts (:mod:`quantix.controlplane.facts`) and hands back the pools the
control plane assigns. Everything here that touches libvirt, psutil or sysfs runs in a worker
thread and returns a Deferred; the conversions are pure functions next to it.

Choices worth knowing:

* Pool reports in heartbeats cover the pools the control plane knows: those it assigned through
  the link, plus every libvirt pool named by a UUID (the control plane names pools by UUID, both
  for ``InitStoragePool`` and for assignments). The daemon's own VM-disk pool and pools other
  software defined on the host are left out: the control plane would only skip them, or worse,
  match one by name.
* A pool definition from ``GetPool`` becomes the same ``InitStoragePoolRequest`` the control
  plane would send over gRPC, so both paths define identical libvirt pools (a local directory is
  used as given; no path means ``<storage.root>/pools/<pool_id>``). protobuf's JSON leaves out
  enum zero, which is ``CEPH_RBD``: a backend with that type but no Ceph settings is a local
  directory, as the control plane's own node agent reads it.
* A withdrawn pool that a running VM still uses is not released: the release fails, the pool
  stays, and the link tries again after the next heartbeat.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import libvirt
import psutil
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger

from quantix import bridge, errors
from quantix.config import Config
from quantix.controlplane import facts as cf
from quantix.controlplane.connect import ConnectClient
from quantix.controlplane.images import ImageReporter
from quantix.controlplane.link import ControlPlaneLink
from quantix.facades import VmHost
from quantix.hypervisor import hostinfo
from quantix.hypervisor.storage import manager as sm
from quantix.hypervisor.storage import wire as storage_wire
from quantix.images.scan import Scanner
from quantix.proto import node_pb2, storage_pb2
from quantix.util.reactor import INodeReactor

log = Logger(namespace="quantix.controlplane")

MiB = 1 << 20

STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)

#: libvirt domain state → the state text SyncNodeVMs takes (the control plane matches it loosely).
STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",  # shutting down: still running
    libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}

_BACKEND = storage_pb2.StorageBackend
#: The control plane's backend type → the node API's pool type.
BACKEND_POOL_TYPES: dict[int, int] = {
    _BACKEND.CEPH_RBD: node_pb2.STORAGE_POOL_TYPE_CEPH_RBD,
    _BACKEND.CEPH_CEPHFS: node_pb2.STORAGE_POOL_TYPE_CEPH_FS,
    _BACKEND.LOCAL_LVM: node_pb2.STORAGE_POOL_TYPE_LOCAL_LVM,
    _BACKEND.LOCAL_DIR: node_pb2.STORAGE_POOL_TYPE_LOCAL_DIR,
    _BACKEND.NFS: node_pb2.STORAGE_POOL_TYPE_NFS,
    _BACKEND.ISCSI: node_pb2.STORAGE_POOL_TYPE_ISCSI,
}
_CONFIG_TYPES = {
    "ceph": _BACKEND.CEPH_RBD,
    "local_lvm": _BACKEND.LOCAL_LVM,
    "local_dir": _BACKEND.LOCAL_DIR,
    "nfs": _BACKEND.NFS,
    "iscsi": _BACKEND.ISCSI,
}

#: Host-side ends of guest and container networking: not devices the control plane cares about.
_GUEST_NIC_PREFIXES = ("lo", "vnet", "tap", "macvtap", "veth", "virbr", "docker", "br-", "qtx")


# -- pure conversions ---------------------------------------------------------------------------


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, "unknown")


def vm_facts(
    records: Iterable[tuple[str, str, Mapping[str, int | float | str]]],
    fallback: Callable[[str], tuple[int, int]] | None = None,
) -> list[cf.VMFacts]:
    """``(uuid, name, stats)`` from ``getAllDomainStats`` → inventory entries.

    ``fallback(uuid) -> (vcpus, memory_kib)`` fills what a driver without the vCPU or balloon
    stat groups leaves out (libvirt's test driver reports only the state).
    """
    out = []
    for uuid, name, stats in records:
        vcpus = stats.get("vcpu.current", stats.get("vcpu.maximum"))
        mem_kib = stats.get("balloon.maximum", stats.get("balloon.current"))
        if (vcpus is None or mem_kib is None) and fallback is not None:
            fb_vcpus, fb_mem = fallback(uuid)
            vcpus = fb_vcpus if vcpus is None else vcpus
            mem_kib = fb_mem if mem_kib is None else mem_kib
        paths = tuple(
            str(stats[f"block.{i}.path"])
            for i in range(int(stats.get("block.count", 0)))
            if stats.get(f"block.{i}.path")
        )
        out.append(
            cf.VMFacts(
                id=uuid,
                name=name,
                state=state_name(int(stats.get("state.state", libvirt.VIR_DOMAIN_NOSTATE))),
                cpu_cores=int(vcpus or 0),
                memory_mib=int(mem_kib or 0) // 1024,
                disk_paths=paths,
            )
        )
    return out


#: The domain watcher's state names (quantix.events.mapping) → the link's state text.
_WATCHER_STATES = {"pm": "suspended", "other": "unknown"}


def vm_change(vm_id: str, name: str, state: str | None) -> tuple[cf.VMFacts, str]:
    """A watcher state change → ``(VMFacts, event)`` for ``notify_vm_change``; None is a deletion."""
    if state is None:
        return cf.VMFacts(id=vm_id, name=name, state="stopped"), "deleted"
    return cf.VMFacts(id=vm_id, name=name, state=_WATCHER_STATES.get(state, state)), "updated"


def disk_kind(device: str, rotational: str | None) -> str:
    """NVME by name, else SSD/HDD from sysfs ``queue/rotational`` (unknown counts as HDD)."""
    if Path(device).name.startswith("nvme"):
        return "NVME"
    return "SSD" if (rotational or "").strip() == "0" else "HDD"


def storage_devices(
    disks: Iterable[hostinfo.DiskFacts], rotational: Callable[[str], str | None]
) -> tuple[cf.StorageDeviceFacts, ...]:
    """Mounted block devices (one entry per device, the first mount's size)."""
    out: dict[str, cf.StorageDeviceFacts] = {}
    for disk in disks:
        if not disk.device.startswith("/dev/") or disk.device in out:
            continue
        out[disk.device] = cf.StorageDeviceFacts(
            path=disk.device,
            size_bytes=disk.total_bytes,
            kind=disk_kind(disk.device, rotational(disk.device)),
        )
    return tuple(out.values())


def network_devices(
    nics: Iterable[hostinfo.NicFacts],
    mtu: Callable[[str], int | None],
    driver: Callable[[str], str],
    sriov: Callable[[str], bool],
) -> tuple[cf.NetworkDeviceFacts, ...]:
    return tuple(
        cf.NetworkDeviceFacts(
            name=nic.name,
            mac_address=nic.mac,
            driver=driver(nic.name),
            speed_mbps=max(nic.speed_mbps, 0),
            mtu=mtu(nic.name) or 1500,
            sriov_capable=sriov(nic.name),
        )
        for nic in nics
        if not nic.name.startswith(_GUEST_NIC_PREFIXES)
    )


def host_facts(
    info: hostinfo.HostFacts,
    labels: Mapping[str, str],
    storage: tuple[cf.StorageDeviceFacts, ...] = (),
    network: tuple[cf.NetworkDeviceFacts, ...] = (),
) -> cf.HostFacts:
    cpu = info.cpu
    return cf.HostFacts(
        hostname=info.hostname,
        management_ip=info.management_ip,
        cpu=cf.CpuFacts(
            model=cpu.model,
            sockets=cpu.sockets,
            cores_per_socket=cpu.cores_per_socket,
            threads_per_core=cpu.threads_per_core,
            frequency_mhz=cpu.mhz,
            features=cpu.features,
        ),
        # Allocatable: what VMs may take; the host keeps what it uses now.
        memory=cf.MemoryFacts(total_bytes=info.memory_total, allocatable_bytes=info.memory_available),
        labels=dict(labels),
        storage_devices=storage,
        network_devices=network,
    )


def is_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True


def pool_health(info: sm.PoolInfo) -> str:
    if not info.active:
        return "UNMOUNTED"
    if info.available_bytes > 0:
        return "HEALTHY"
    return "DEGRADED" if info.total_bytes > 0 else "ERROR"


def pool_reports(pools: Iterable[sm.PoolInfo], assigned: Iterable[str] = ()) -> list[cf.PoolReport]:
    """Reports for the pools the control plane knows (assigned ones and UUID-named ones)."""
    known = set(assigned)
    return [
        cf.PoolReport(
            pool_id=p.pool_id,
            health=pool_health(p),
            total_bytes=p.total_bytes,
            used_bytes=p.used_bytes,
            available_bytes=p.available_bytes,
            mount_path=p.mount_path or p.device_path,
            volume_count=p.volume_count,
            error_message="" if p.active else "pool is not active on this host",
        )
        for p in pools
        if p.pool_id in known or is_uuid(p.pool_id)
    ]


def backend_type(backend: storage_pb2.StorageBackend) -> int:
    """The backend's type, reading an absent (zero) type from which settings are present."""
    if backend.type != _BACKEND.CEPH_RBD:
        return backend.type
    which = backend.WhichOneof("config")
    return _CONFIG_TYPES.get(which, _BACKEND.LOCAL_DIR) if which else _BACKEND.LOCAL_DIR


def _copy_same_named(src: Message, dst: Message) -> None:
    """Copy every scalar or repeated scalar field ``dst`` has and ``src`` has under the same name."""
    present = src.DESCRIPTOR.fields_by_name
    for field in dst.DESCRIPTOR.fields:
        if field.name not in present:
            continue
        value = getattr(src, field.name)
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        else:
            setattr(dst, field.name, value)


def init_pool_request(pool: storage_pb2.StoragePool) -> node_pb2.InitStoragePoolRequest:
    """``GetPool``'s answer → the ``InitStoragePool`` request the control plane would send."""
    if not pool.id:
        raise errors.Invalid("storage pool from the control plane has no id")
    backend = pool.spec.backend
    req = node_pb2.InitStoragePoolRequest(
        pool_id=pool.id,
        type=node_pb2.StoragePoolType.ValueType(BACKEND_POOL_TYPES.get(backend_type(backend), 0)),
    )
    config = req.config
    if backend.HasField("local_dir"):
        config.local.path = backend.local_dir.path
    # The control plane's NFS/Ceph/iSCSI settings and ours share field names and meanings.
    for kind in ("nfs", "ceph", "iscsi"):
        if backend.HasField(kind):
            _copy_same_named(getattr(backend, kind), getattr(config, kind))
    return req


# -- sysfs / psutil readers (best effort) -------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _rotational(device: str) -> str | None:
    """``queue/rotational`` of the disk holding ``device`` (a partition reads its parent's)."""
    node = Path("/sys/class/block") / Path(device).name
    for candidate in (node, node.resolve().parent):
        value = _read(candidate / "queue" / "rotational")
        if value is not None:
            return value
    return None


def _nic_driver(name: str) -> str:
    link = Path("/sys/class/net") / name / "device" / "driver"
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return ""


def _nic_sriov(name: str) -> bool:
    value = _read(Path("/sys/class/net") / name / "device" / "sriov_totalvfs")
    return bool(value and value.strip().isdigit() and int(value) > 0)


# -- the adapters -------------------------------------------------------------------------------


class DaemonSources:
    """The link's data sources over the host-facts, hypervisor and storage boxes.

    Every public method is called on the reactor and returns a Deferred; the work runs in a
    worker thread. ``assigned`` returns the pool ids the control plane assigned (the link's
    ``assigned_pools``); it is read on the reactor before going to a thread.
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        config: Config,
        host: hostinfo.HostBox,
        hypervisor: VmHost,
        storage: sm.StorageManager,
        assigned: Callable[[], Iterable[str]] = tuple,
    ) -> None:
        self.config = config
        self.host = host
        self.hypervisor = hypervisor
        self.storage = storage
        self.assigned = assigned
        self._reactor = reactor
        self._pool_errors_logged = False
        psutil.cpu_percent(interval=None)  # the first reading only sets the baseline

    def _in_thread(self, func: Callable[..., object], *args: object) -> defer.Deferred:
        return bridge.run_in_worker(func, *args, reactor=self._reactor)

    # RegisterNode
    def facts(self) -> defer.Deferred:
        return self._in_thread(self._facts)

    def _facts(self) -> cf.HostFacts:
        info = self.host.facts(self.hypervisor.conn())
        stats = psutil.net_if_stats()

        def mtu(name: str) -> int | None:
            st = stats.get(name)
            return st.mtu if st else None

        return host_facts(
            info,
            self.config.node.labels,
            storage_devices(info.disks, _rotational),
            network_devices(info.nics, mtu, _nic_driver, _nic_sriov),
        )

    # SyncNodeVMs / SyncFullState
    def vms(self) -> defer.Deferred:
        return self._in_thread(self._vms)

    def _vms(self) -> list[cf.VMFacts]:
        conn = self.hypervisor.conn()
        pairs = conn.getAllDomainStats(STATS)
        doms = {dom.UUIDString(): dom for dom, _ in pairs}

        def fallback(uuid: str) -> tuple[int, int]:
            try:
                _state, max_kib, _mem, vcpus, _cpu = doms[uuid].info()
            except libvirt.libvirtError:
                return 0, 0  # undefined since the bulk call
            return vcpus, max_kib

        return vm_facts(((dom.UUIDString(), dom.name(), stats) for dom, stats in pairs), fallback)

    # UpdateHeartbeat
    def heartbeat_sample(self) -> defer.Deferred:
        return self._in_thread(self._sample)

    def _sample(self) -> cf.HeartbeatSample:
        mem = psutil.virtual_memory()
        try:
            running = len(self.hypervisor.conn().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
        except (errors.HypervisorDown, libvirt.libvirtError):
            running = 0  # libvirt is away: keep heartbeating, the count is only informative
        root = self.config.storage.root
        try:
            disk = psutil.disk_usage(root)
        except OSError:
            disk = psutil.disk_usage("/")
        return cf.HeartbeatSample(
            cpu_usage_percent=psutil.cpu_percent(interval=None),
            memory_used_mib=(mem.total - mem.available) // MiB,
            memory_total_mib=mem.total // MiB,
            running_vm_count=running,
            load=os.getloadavg(),
            disk_used_bytes=disk.used,
            disk_total_bytes=disk.total,
        )

    def pool_reports(self) -> defer.Deferred:
        return self._in_thread(self._pool_reports, frozenset(self.assigned()))

    def _pool_reports(self, assigned: frozenset[str]) -> list[cf.PoolReport]:
        # A storage failure must not cost the heartbeat: report no pools this time.
        try:
            pools = self.storage.list_pools()
        except (errors.QuantixError, libvirt.libvirtError) as exc:
            if not self._pool_errors_logged:
                self._pool_errors_logged = True
                log.warn("cannot list storage pools for the heartbeat: {error}", error=exc)
            return []
        self._pool_errors_logged = False
        return pool_reports(pools, assigned)

    # Pool assignment
    def ensure_pool(self, pool: storage_pb2.StoragePool) -> defer.Deferred:
        return self._in_thread(self._ensure_pool, pool)

    def _ensure_pool(self, pool: storage_pb2.StoragePool) -> sm.PoolInfo:
        return self.storage.init_pool(storage_wire.pool_request(init_pool_request(pool)))

    def release_pool(self, pool_id: str) -> defer.Deferred:
        return self._in_thread(self._release_pool, pool_id)

    def _release_pool(self, pool_id: str) -> None:
        users = self.storage.pool_users(pool_id)
        if users:
            raise errors.WrongState(
                f"storage pool {pool_id} is in use by running VMs ({', '.join(sorted(users))}); kept"
            )
        self.storage.destroy_pool(pool_id)


def make_link(
    reactor: INodeReactor,  # timers and sockets for the link, threads for the sources
    config: Config,
    host: hostinfo.HostBox,
    hypervisor: VmHost,
    storage: sm.StorageManager,
) -> ControlPlaneLink:
    """The link for ``config``; registration waits for ``start_registration``.

    Raises ValueError for an unusable URL and OSError for an unreadable CA bundle.
    """
    cp = config.control_plane
    if not config.control_plane_url:
        raise ValueError("no control-plane URL is configured")
    client = ConnectClient(reactor, config.control_plane_url, ca_file=cp.ca_bundle, token=cp.token)
    sources = DaemonSources(reactor, config, host, hypervisor, storage)
    link = ControlPlaneLink(
        reactor,
        client,
        sources.facts,
        config.state_dir,
        vms=sources.vms,
        heartbeat_sample=sources.heartbeat_sample,
        pool_reports=sources.pool_reports,
        ensure_pool=sources.ensure_pool,
        release_pool=sources.release_pool,
        heartbeat_interval=cp.heartbeat_interval,
        startup_jitter=cp.startup_jitter,
    )
    sources.assigned = lambda: link.assigned_pools
    return link


def make_image_reporter(reactor: INodeReactor, config: Config, link: ControlPlaneLink) -> ImageReporter:
    """Report ``storage.cloud_images`` after each registration of ``link`` (its client)."""
    scanner = Scanner(config.storage.cloud_images)
    reporter = ImageReporter(reactor, link.client, scanner.scan, config.state_dir)
    link.registered_listeners.append(reporter.registered)
    return reporter
