"""VM power operations, status and deletion over one libvirt connection (blocking; gRPC threads).

Every function takes a live ``virConnect`` or ``virDomain`` and raises :mod:`quantix.errors`
exceptions for the cases a client can act on (missing VM, wrong state, timeout); anything else
libvirt reports escapes as ``libvirtError`` and is translated by the RPC layer. The pure parts
(state mapping, usage from bulk stats, which files a deletion removes) have no I/O.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping

import libvirt
import psutil
from twisted.logger import Logger

from quantix import errors
from quantix.hypervisor import domaininfo, statuscache
from quantix.proto import node_pb2

#: One domain's ``getAllDomainStats`` record (``"balloon.rss": 1234``, ``"state.state": 1`` …).
DomainStats = Mapping[str, int | float | str]

log = Logger(namespace="quantix.hypervisor.vms")

#: The bulk statistics ListVMs and GetVMStatus ask for: one libvirt call for any number of VMs.
STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_BLOCK
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
)

_POWER = {
    libvirt.VIR_DOMAIN_NOSTATE: node_pb2.POWER_STATE_UNKNOWN,
    libvirt.VIR_DOMAIN_RUNNING: node_pb2.POWER_STATE_RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: node_pb2.POWER_STATE_RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: node_pb2.POWER_STATE_PAUSED,
    # Still running while the guest handles the ACPI request.
    libvirt.VIR_DOMAIN_SHUTDOWN: node_pb2.POWER_STATE_RUNNING,
    libvirt.VIR_DOMAIN_SHUTOFF: node_pb2.POWER_STATE_STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: node_pb2.POWER_STATE_CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: node_pb2.POWER_STATE_SUSPENDED,
}

STOP_POLL_INTERVAL = 0.25
#: A VM busy in a long job (snapshot, migration) must not stall everyone's ListVMs: skip the
#: stats that need its monitor instead of waiting for it.
NOWAIT = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


def power_state(state: int) -> int:
    """libvirt ``virDomainState`` → ``PowerState``."""
    return _POWER.get(state, node_pb2.POWER_STATE_UNKNOWN)


# ---------------------------------------------------------------------------------------------
# Lookup


def lookup(conn: libvirt.virConnect, vm_id: str) -> libvirt.virDomain:
    """The domain whose UUID is ``vm_id`` (a domain name is accepted too); else VMNotFound.

    An empty id names nothing: Invalid, as the agent RPCs answer it."""
    if not vm_id:
        raise errors.Invalid("vm_id is required")
    try:
        key = str(uuid.UUID(vm_id))
    except (ValueError, TypeError, AttributeError):
        key = None
    try:
        if key is not None:
            return conn.lookupByUUIDString(key)
        if vm_id and "/" not in vm_id:
            return conn.lookupByName(vm_id)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise errors.VMNotFound(vm_id) from None
        raise
    raise errors.VMNotFound(vm_id)


def state_of(dom: libvirt.virDomain) -> int:
    return dom.state()[0]


# ---------------------------------------------------------------------------------------------
# Power operations


def start(dom: libvirt.virDomain) -> None:
    """Idempotent: a running VM stays as it is; a paused one is resumed (the control plane starts
    PAUSED VMs through StartVM)."""
    state = state_of(dom)
    if state == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()
    elif not dom.isActive():
        dom.create()


def stop(
    dom: libvirt.virDomain,
    timeout: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """ACPI shutdown, then wait until the domain is off; Timeout leaves it running."""
    if request_shutdown(dom):
        wait_until_off(dom, timeout, sleep=sleep, clock=clock)


def request_shutdown(dom: libvirt.virDomain) -> bool:
    """Ask the guest to power off (ACPI); False when the domain is already off."""
    if not dom.isActive():
        return False
    try:
        dom.shutdown()
    except libvirt.libvirtError:
        if not dom.isActive():  # it went down between the check and the call
            return False
        raise
    return True


def wait_until_off(
    dom: libvirt.virDomain,
    timeout: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll until the domain is off; Timeout (leaving it running) after ``timeout`` seconds."""
    deadline = clock() + timeout
    while dom.isActive():
        if clock() >= deadline:
            raise errors.Timeout(
                f"VM {dom.UUIDString()} did not shut down within {timeout:g}s; it is still running"
            )
        sleep(STOP_POLL_INTERVAL)


def force_stop(dom: libvirt.virDomain) -> None:
    """Pull the plug; a VM that is already off is fine."""
    if not dom.isActive():
        return
    try:
        dom.destroy()
    except libvirt.libvirtError:
        if dom.isActive():
            raise


def _require_active(dom: libvirt.virDomain, what: str) -> int:
    state = state_of(dom)
    if not dom.isActive():
        raise errors.WrongState(f"cannot {what} VM {dom.UUIDString()}: it is not running")
    return state


def reboot(dom: libvirt.virDomain) -> None:
    if _require_active(dom, "reboot") == libvirt.VIR_DOMAIN_PAUSED:
        raise errors.WrongState(f"cannot reboot VM {dom.UUIDString()}: it is paused")
    dom.reboot(0)


def pause(dom: libvirt.virDomain) -> None:
    if _require_active(dom, "pause") != libvirt.VIR_DOMAIN_PAUSED:
        dom.suspend()


def resume(dom: libvirt.virDomain) -> None:
    if _require_active(dom, "resume") == libvirt.VIR_DOMAIN_PAUSED:
        dom.resume()


# ---------------------------------------------------------------------------------------------
# Status and listing


class CpuSampler:
    """CPU percent from the difference between two cumulative cpu-time samples of one VM.

    libvirt only reports cumulative nanoseconds; the previous sample is whatever the last
    ListVMs or GetVMStatus saw, so the first query of a VM reports 0.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def percent(self, vm_id: str, cpu_ns: int, vcpus: int) -> float:
        now = self._clock()
        with self._lock:
            prev = self._last.get(vm_id)
            self._last[vm_id] = (now, cpu_ns)
        if prev is None or cpu_ns < prev[1] or now <= prev[0]:
            return 0.0
        busy = (cpu_ns - prev[1]) / ((now - prev[0]) * 1e9 * max(vcpus, 1))
        return round(min(max(busy * 100.0, 0.0), 100.0), 2)

    def forget(self, live: Iterable[str]) -> None:
        keep = set(live)
        with self._lock:
            for vm_id in list(self._last):
                if vm_id not in keep:
                    del self._last[vm_id]


def _sum(stats: DomainStats, prefix: str, count_key: str, suffix: str) -> int:
    count = stats.get(count_key)
    if not count:  # the common case on a large host (no disks/NICs reported): skip the loop
        return 0
    return sum(int(stats.get(f"{prefix}.{i}.{suffix}", 0)) for i in range(int(count)))


def usage_from_stats(stats: DomainStats, cpu_percent: float = 0.0) -> node_pb2.ResourceUsage:
    """``ResourceUsage`` from one domain's ``getAllDomainStats`` dict (pure).

    Memory in use is what the guest reports through the balloon (available - unused) when it
    does, else the host RSS of the VM, else its current balloon size.
    """
    usage = node_pb2.ResourceUsage()
    _fill_usage(usage, stats, cpu_percent)
    return usage


def _fill_usage(usage: node_pb2.ResourceUsage, stats: DomainStats, cpu_percent: float) -> None:
    """:func:`usage_from_stats` written into an existing message (ListVMs fills thousands in place
    rather than building each one and copying it into the response). The fields have no presence,
    so a figure libvirt did not report is simply left at zero."""
    kib = 1024
    if "balloon.available" in stats and "balloon.unused" in stats:
        used = (int(stats["balloon.available"]) - int(stats["balloon.unused"])) * kib
    elif "balloon.rss" in stats:
        used = int(stats["balloon.rss"]) * kib
    else:
        used = int(stats.get("balloon.current", 0)) * kib
    if cpu_percent:
        usage.cpu_usage_percent = cpu_percent
    if "cpu.time" in stats:
        usage.cpu_time_ns = int(stats["cpu.time"])
    if used > 0:
        usage.memory_used_bytes = used
    if "balloon.maximum" in stats:
        usage.memory_total_bytes = int(stats["balloon.maximum"]) * kib
    if stats.get("block.count"):
        usage.disk_read_bytes = _sum(stats, "block", "block.count", "rd.bytes")
        usage.disk_write_bytes = _sum(stats, "block", "block.count", "wr.bytes")
    if stats.get("net.count"):
        usage.network_rx_bytes = _sum(stats, "net", "net.count", "rx.bytes")
        usage.network_tx_bytes = _sum(stats, "net", "net.count", "tx.bytes")


def _fill_from_info(usage: node_pb2.ResourceUsage, dom: libvirt.virDomain) -> None:
    """Memory and CPU time from ``virDomainGetInfo`` for drivers whose bulk stats carry no balloon
    figures (the test driver): they still know the configured and current memory. One call per
    such domain; drivers that report balloon stats (QEMU, running or not) never pay it."""
    try:
        _, max_kib, cur_kib, _, cpu_ns = dom.info()
    except libvirt.libvirtError:  # undefined meanwhile: leave what the stats said
        return
    usage.memory_total_bytes = usage.memory_total_bytes or max_kib * 1024
    usage.memory_used_bytes = usage.memory_used_bytes or cur_kib * 1024
    usage.cpu_time_ns = usage.cpu_time_ns or cpu_ns


def started_at(pid_dir: str | None, name: str) -> float | None:
    """When the VM's QEMU process started (epoch seconds), from libvirt's pid file; None if unknown.

    libvirt has no API for a domain's start time; the QEMU driver keeps ``<name>.pid`` in its
    state directory, and the process start time is exact.
    """
    if not pid_dir:
        return None
    try:
        with open(os.path.join(pid_dir, f"{name}.pid"), encoding="ascii") as fh:
            pid = int(fh.read().strip())
        return psutil.Process(pid).create_time()
    except (OSError, ValueError, psutil.Error):
        return None


_DISK_BUS = {"virtio": node_pb2.DISK_BUS_VIRTIO, "scsi": node_pb2.DISK_BUS_SCSI}
_DISK_BUS |= {"sata": node_pb2.DISK_BUS_SATA, "ide": node_pb2.DISK_BUS_IDE}


def disk_specs(
    info: domaininfo.DomainInfo, sizes: Mapping[str, int] | None = None
) -> list[node_pb2.DiskSpec]:
    """The domain's hard disks (not CD-ROMs) as ``DiskSpec`` messages (pure)."""
    sizes = sizes or {}
    out = []
    for d in info.disks:
        if d.device != "disk":
            continue
        out.append(
            node_pb2.DiskSpec(
                id=d.id,
                path=d.path or "",
                size_gib=sizes.get(d.dev, 0) // (1024**3),
                bus=_DISK_BUS.get(d.bus, node_pb2.DISK_BUS_VIRTIO),
                format=node_pb2.DISK_FORMAT_RAW if d.format == "raw" else node_pb2.DISK_FORMAT_QCOW2,
                readonly=d.readonly,
            )
        )
    return out


def _capacities(stats: DomainStats) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in range(int(stats.get("block.count", 0))):
        name = stats.get(f"block.{i}.name")
        if name and f"block.{i}.capacity" in stats:
            out[str(name)] = int(stats[f"block.{i}.capacity"])
    return out


_LIVE = frozenset((libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED, libvirt.VIR_DOMAIN_PAUSED))


def _fill_status(
    msg: node_pb2.VMStatusResponse,
    dom: libvirt.virDomain,
    vm_id: str,
    name: str,
    stats: DomainStats,
    sampler: CpuSampler,
    pid_dir: str | None,
) -> str:
    """Write one VM's ``VMStatusResponse`` fields into ``msg``; returns the VM id. The caller
    passes the domain's uuid and name (each libvirt-python call re-takes the GIL)."""
    state = int(stats.get("state.state", libvirt.VIR_DOMAIN_NOSTATE))
    running = state in _LIVE
    percent = 0.0
    if running and "cpu.time" in stats:
        percent = sampler.percent(vm_id, int(stats["cpu.time"]), int(stats.get("vcpu.current", 1)))
    msg.vm_id = vm_id
    msg.name = name
    msg.state = _POWER.get(state, node_pb2.POWER_STATE_UNKNOWN)
    msg.resource_usage.SetInParent()  # present even when every figure is zero
    _fill_usage(msg.resource_usage, stats, percent)
    if "balloon.maximum" not in stats:
        _fill_from_info(msg.resource_usage, dom)
    if running or state == libvirt.VIR_DOMAIN_SHUTDOWN:
        since = started_at(pid_dir, name)
        if since is not None:
            msg.started_at.FromNanoseconds(int(since * 1e9))
    return vm_id


def list_response(
    conn: libvirt.virConnect, sampler: CpuSampler, pid_dir: str | None = None
) -> node_pb2.ListVMsOnNodeResponse:
    """``ListVMsOnNodeResponse`` for every defined VM from one bulk libvirt query (no per-domain
    round trips); each entry is filled in place in the response."""
    out = node_pb2.ListVMsOnNodeResponse()
    add = out.vms.add
    seen = [
        _fill_status(add(), dom, dom.UUIDString(), dom.name(), stats, sampler, pid_dir)
        for dom, stats in conn.getAllDomainStats(STATS, NOWAIT)
    ]
    sampler.forget(seen)
    return out


def list_vms(
    conn: libvirt.virConnect, sampler: CpuSampler, pid_dir: str | None = None
) -> list[node_pb2.VMStatusResponse]:
    """Every defined VM in one bulk libvirt query, as a list of ``VMStatusResponse``."""
    return list(list_response(conn, sampler, pid_dir).vms)


def vm_status(
    conn: libvirt.virConnect, dom: libvirt.virDomain, sampler: CpuSampler, pid_dir: str | None = None
) -> node_pb2.VMStatusResponse:
    """One VM: bulk stats for that domain plus the disks from its live XML."""
    name, info = dom.name(), domaininfo.parse_domain(dom.XMLDesc(0))
    return status_of(conn, statuscache.Entry(conn, dom, dom.UUIDString(), name, info), sampler, pid_dir)


def status_of(
    conn: libvirt.virConnect, entry: statuscache.Entry, sampler: CpuSampler, pid_dir: str | None
) -> node_pb2.VMStatusResponse:
    """One VM from one bulk stats query for its domain; uuid, name and disks come from
    ``entry`` (see :mod:`quantix.hypervisor.statuscache`)."""
    try:
        found = conn.domainListGetStats([entry.dom], STATS, NOWAIT)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise errors.VMNotFound(entry.uuid) from None
        raise
    if not found:  # undefined since the lookup
        raise errors.VMNotFound(entry.uuid)
    stats = found[0][1]
    msg = node_pb2.VMStatusResponse()
    _fill_status(msg, entry.dom, entry.uuid, entry.name, stats, sampler, pid_dir)
    msg.disks.extend(disk_specs(entry.info, _capacities(stats)))
    return msg


# ---------------------------------------------------------------------------------------------
# Deletion


def _chain(disk_el: ET.Element) -> list[str]:
    """The file chain of one ``<disk>``: active image first, then its backing files."""
    out: list[str] = []
    el: ET.Element | None = disk_el
    while el is not None:
        src = el.find("source")
        path = src.get("file") if src is not None else None
        if not path:
            break
        out.append(path)
        el = el.find("backingStore")
    return out


def leftovers(xml: str) -> list[str]:
    """What DeleteVM removes (pure): disks and the cloud-init ISO our metadata marks as created,
    plus overlays external snapshots stacked on a created disk (never the backing image under it,
    which may be a shared cloud image)."""
    info = domaininfo.parse_domain(xml)
    created = {r.dev: r.path for r in info.meta.devices if r.created and r.kind == "disk" and r.path}
    files: list[str] = []
    root = ET.fromstring(xml)
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in created:
            continue
        chain = _chain(disk)
        base = created[dev]
        files.extend(chain[: chain.index(base) + 1] if base in chain else [base])
    for ref in info.meta.devices:
        if ref.created and ref.path and ref.path not in files:
            files.append(ref.path)
    if info.meta.cloud_init_iso and info.meta.cloud_init_iso not in files:
        files.append(info.meta.cloud_init_iso)
    return files


_UNDEFINE_FLAGS = (
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
    | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
    libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE,
    0,
)
_UNSUPPORTED_FLAG = {
    libvirt.VIR_ERR_INVALID_ARG,
    libvirt.VIR_ERR_NO_SUPPORT,
    libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED,
}


def undefine(dom: libvirt.virDomain) -> None:
    """Undefine with snapshot/checkpoint metadata and NVRAM, dropping flags a driver rejects."""
    for i, flags in enumerate(_UNDEFINE_FLAGS):
        try:
            dom.undefineFlags(flags)
            return
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in _UNSUPPORTED_FLAG or i == len(_UNDEFINE_FLAGS) - 1:
                raise
            log.debug("undefine flags {flags:#x} rejected: {err}", flags=flags, err=exc)


def delete(dom: libvirt.virDomain, remove: Callable[[str], None]) -> list[str]:
    """Undefine a stopped VM, then remove the files this node created for it (``remove``).

    The domain goes first: a failed undefine must not leave a defined VM without its disks.
    A file that cannot be removed afterwards is logged, not raised (the VM is already gone).
    """
    if dom.isActive():
        raise errors.WrongState(f"VM {dom.UUIDString()} must be stopped before deletion")
    files = leftovers(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    undefine(dom)
    for path in files:
        try:
            remove(path)
        except Exception as exc:
            log.warn("could not remove {path}: {err}", path=path, err=exc)
    return files
