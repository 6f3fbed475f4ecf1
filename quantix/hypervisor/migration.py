"""Move a domain to another host: peer-to-peer ``virDomainMigrateToURI3`` with progress.

The source libvirtd talks to the target's libvirtd itself (``VIR_MIGRATE_PEER2PEER``), so the
daemon only names the target. Everything that can be known before libvirt starts copying is
checked first (:func:`plan`), so a bad request gets an ordinary status instead of a failed
stream. :class:`MigrationJob` then runs the blocking libvirt call in its own thread while the
caller samples ``jobStats()`` for progress and may abort.

All functions here block (libvirt round trips, a TCP probe): call them from a worker thread.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable
from urllib.parse import urlsplit

import attrs
import libvirt
import psutil

from quantix import errors
from quantix.hypervisor import domaininfo

#: ``MigrationProgress.phase`` values (``limiquantix.node.v1.MigrationPhase``).
PREPARING, TRANSFERRING, SWITCHING, COMPLETE, FAILED = range(5)

#: libvirt transports a target URI may name; test:// and local qemu:/// are refused.
_SCHEMES = {"qemu+tls": 16514, "qemu+tcp": 16509, "qemu+ssh": 22, "qemu+libssh": 22, "qemu+libssh2": 22}
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_MAX_TARGET = 1024
#: How long the reachability probe of the target's libvirtd may take.
PROBE_SECONDS = 5.0
_BASE_FLAGS = (
    libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_ABORT_ON_ERROR
)
_CPU_HINT = (
    "the target host's CPU cannot run this VM (host-passthrough VMs need identical CPUs on both hosts)"
)


@attrs.frozen
class Target:
    """Where to: the libvirt connection URI of the target and its host (for QEMU's data channel)."""

    uri: str
    host: str
    port: int

    @property
    def data_uri(self) -> str:
        """``VIR_MIGRATE_PARAM_URI``: QEMU connects straight to this host, not to a name the
        target's libvirtd resolves for itself."""
        return f"tcp://[{self.host}]" if ":" in self.host else f"tcp://{self.host}"


def _check_host(host: str, what: str) -> str:
    host = host.strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        raise errors.Invalid(f"{what}: {host!r} is not a host name or address")
    return host.lower()


def parse_target(value: str, template: str, what: str = "target_node_uri") -> Target:
    """A libvirt URI (``qemu+tls://h/system``) or a bare ``host``, ``host:port``, ``[v6]:port``
    filled into ``template`` (the port of a bare host is dropped: it is the daemon's, not libvirt's)."""
    value = (value or "").strip()
    if not value:
        raise errors.Invalid(f"{what} is required")
    if len(value) > _MAX_TARGET or any(ch.isspace() or ord(ch) < 32 for ch in value):
        raise errors.Invalid(f"{what} is not a libvirt URI or host")
    if "://" not in value:
        host = value
        if value.startswith("["):
            host = value[1 : value.find("]")] if "]" in value else value
        elif value.count(":") == 1:
            host = value.partition(":")[0]
        host = _check_host(host, what)
        value = template.format(host=f"[{host}]" if ":" in host else host)
    try:
        parts = urlsplit(value)
        hostname, port = parts.hostname, parts.port
    except ValueError as exc:
        raise errors.Invalid(f"{what} {value!r} is not a libvirt URI: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme.startswith("test"):
        raise errors.Invalid(f"{what} {value!r}: the test driver cannot receive a migration")
    if scheme not in _SCHEMES:
        if scheme == "qemu" or scheme.startswith("qemu+unix"):
            raise errors.Invalid(f"{what} {value!r} names this host's own libvirt: give the target's host")
        raise errors.Invalid(f"{what} {value!r}: use qemu+tls://, qemu+tcp:// or qemu+ssh://")
    if not hostname:
        raise errors.Invalid(f"{what} {value!r} names no host")
    if parts.path.rstrip("/") != "/system":
        raise errors.Invalid(f"{what} {value!r}: the target must be a /system URI")
    return Target(uri=value, host=_check_host(hostname, what), port=port or _SCHEMES[scheme])


def own_addresses(extra: Iterable[str | None] = ()) -> set[str]:
    """Names and addresses that mean this host: every interface address, the host names and
    anything configured (``node.hostname``, ``node.management_ip``)."""
    names = {"localhost", socket.gethostname().lower()}
    names.update(str(e).lower() for e in extra if e)
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                names.add(addr.address.split("%")[0].lower())
    return names


def refuse_self(target: Target, own: set[str], what: str = "target_node_uri") -> None:
    """Invalid when ``target`` is this node (by name, address, or what its name resolves to)."""
    candidates = {target.host}
    try:
        ip = ipaddress.ip_address(target.host)
        if ip.is_loopback or ip.is_unspecified:
            raise errors.Invalid(f"{what} {target.host} is this node's own address")
    except ValueError:
        try:
            infos = socket.getaddrinfo(target.host, None, type=socket.SOCK_STREAM)
            candidates.update(str(info[4][0]) for info in infos)
        except (OSError, UnicodeError):
            pass  # unresolvable: the reachability probe reports it
    if candidates & own or any(ipaddress.ip_address(c).is_loopback for c in candidates if _is_ip(c)):
        raise errors.Invalid(f"{what} {target.host} is this node's own address")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def probe(target: Target, timeout: float = PROBE_SECONDS) -> None:
    """Unavailable when nothing answers on the target's libvirt port (a clear error up front,
    instead of a libvirt connect that may hang for minutes)."""
    try:
        socket.create_connection((target.host, target.port), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise errors.Unavailable(f"target {target.uri} is unreachable: {reason}") from None


# ---------------------------------------------------------------------------------------------
# What to move and how


def is_shared(path: str | None, shared_dirs: Iterable[str]) -> bool:
    """True when ``path`` lies under one of ``shared_dirs`` (same path on every node)."""
    if not path:
        return False
    real = os.path.normpath(path)
    for top in shared_dirs:
        top = os.path.normpath(top)
        if real == top or real.startswith(top.rstrip("/") + "/"):
            return True
    return False


def network_pool_dirs(conn: libvirt.virConnect) -> list[str]:
    """Target directories of active network pools (NFS, GlusterFS, ...): shared by definition."""
    dirs = []
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        root = ET.fromstring(pool.XMLDesc(0))
        if root.get("type") in ("netfs", "gluster", "cifs"):
            path = root.findtext("target/path")
            if path:
                dirs.append(path)
    return dirs


@attrs.frozen
class Plan:
    """Flags and parameters of one migration, decided before it starts."""

    vm_id: str
    target: Target
    flags: int
    params: dict
    offline: bool
    copied_disks: tuple[str, ...]


def plan(
    conn: libvirt.virConnect,
    dom: libvirt.virDomain,
    target: Target,
    *,
    live: bool,
    storage: bool,
    shared_dirs: Iterable[str],
    bandwidth_mib: int = 0,
    tls: bool = False,
) -> Plan:
    """Check what the source alone can check and choose flags (see the module docstring)."""
    vm_id = dom.UUIDString()
    state = dom.state()[0]
    offline = state in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)
    if offline and storage:
        raise errors.Invalid(
            f"VM {vm_id} is not running: storage copy needs a running VM"
            " (copy its disks, then migrate it offline)"
        )
    if not offline and _job_running(dom):
        raise errors.WrongState(f"VM {vm_id} already has a job running (a migration in progress?)")
    xml = dom.XMLDesc(0)
    root = ET.fromstring(xml)
    if root.find("devices/hostdev") is not None:
        raise errors.WrongState(f"VM {vm_id} has host devices (PCI/USB passthrough) and cannot migrate")
    shared_dirs = list(shared_dirs)
    pool_dirs = network_pool_dirs(conn)
    info = domaininfo.parse_domain(xml)
    copied, declared_shared = [], False
    for disk in info.disks:
        if disk.device not in ("disk", "lun") or disk.readonly or not disk.path:
            continue  # CD-ROMs (the cloud-init ISO included) are never copied
        if disk.element.get("type") == "network" or is_shared(disk.path, pool_dirs):
            continue
        if is_shared(disk.path, shared_dirs):
            declared_shared = True
            continue
        if not storage:
            raise errors.WrongState(
                f"disk {disk.dev} ({disk.path}) of VM {vm_id} is not on shared storage:"
                " migrate with storage=true"
            )
        copied.append(disk.dev)

    flags = _BASE_FLAGS
    if offline:
        flags |= libvirt.VIR_MIGRATE_OFFLINE
    elif live:
        flags |= libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_AUTO_CONVERGE
    if copied:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    if declared_shared:
        # libvirt recognises NFS, Ceph and the like itself; a directory the operator declared
        # shared (migration.shared_paths) it would call unsafe.
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    if tls and not offline:
        flags |= libvirt.VIR_MIGRATE_TLS
    params: dict = {}
    if not offline:
        params[libvirt.VIR_MIGRATE_PARAM_URI] = target.data_uri
        if bandwidth_mib:
            params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
        if copied:
            params[libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(copied)
    return Plan(vm_id, target, flags, params, offline, tuple(copied))


def _job_running(dom: libvirt.virDomain) -> bool:
    try:
        return dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
            return False  # drivers without jobs (the test driver) have none running
        raise


def check_target(
    dconn: libvirt.virConnect, conn: libvirt.virConnect, dom: libvirt.virDomain, plan_: Plan
) -> Plan:
    """Checks on the target through a read-only connection; upgrades a disk copy to an
    incremental one when every copied disk's backing image is already there."""
    vm_id = plan_.vm_id
    if _host_uuid(dconn) == _host_uuid(conn):
        raise errors.Invalid(f"target {plan_.target.uri} is this node")
    try:
        dconn.lookupByUUIDString(vm_id)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    else:
        raise errors.WrongState(f"VM {vm_id} already exists on the target {plan_.target.host}")
    xml = dom.XMLDesc(0)
    root = ET.fromstring(xml)
    memory_kib = domaininfo.parse_domain(xml).memory_kib
    free = dconn.getFreeMemory()
    if memory_kib * 1024 > free:
        raise errors.WrongState(
            f"the target {plan_.target.host} has {free >> 20} MiB free;"
            f" VM {vm_id} needs {memory_kib >> 10} MiB"
        )
    cpu = root.find("cpu")
    if cpu is not None and cpu.get("mode") == "host-passthrough":
        host_cpu = ET.fromstring(conn.getCapabilities()).find("host/cpu")
        if host_cpu is not None:
            try:
                verdict = dconn.compareCPU(ET.tostring(host_cpu, encoding="unicode"), 0)
            except libvirt.libvirtError:
                verdict = None
            if verdict == libvirt.VIR_CPU_COMPARE_INCOMPATIBLE:
                raise errors.WrongState(f"VM {vm_id}: {_CPU_HINT}")
    if plan_.copied_disks and _backings_present(dconn, dom, plan_.copied_disks):
        flags = (plan_.flags & ~libvirt.VIR_MIGRATE_NON_SHARED_DISK) | libvirt.VIR_MIGRATE_NON_SHARED_INC
        return attrs.evolve(plan_, flags=flags)
    return plan_


def _host_uuid(conn: libvirt.virConnect) -> str:
    return ET.fromstring(conn.getCapabilities()).findtext("host/uuid", "")


def _backings_present(dconn: libvirt.virConnect, dom: libvirt.virDomain, devs: Collection[str]) -> bool:
    root = ET.fromstring(dom.XMLDesc(0))
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        if target is None or target.get("dev") not in devs:
            continue
        backing = disk.find("backingStore/source")
        path = backing.get("file") if backing is not None else None
        if not path:
            return False
        try:
            dconn.storageVolLookupByPath(path)
        except libvirt.libvirtError:
            return False
    return True


def open_target(target: Target) -> libvirt.virConnect:
    """Read-only connection to the target's libvirtd (Unavailable when it refuses us)."""
    probe(target)
    try:
        return libvirt.openReadOnly(target.uri)
    except libvirt.libvirtError as exc:
        raise errors.Unavailable(f"target {target.uri}: {exc.get_error_message() or exc}") from None


# ---------------------------------------------------------------------------------------------
# The running migration


@attrs.define
class Progress:
    phase: int
    percent: int = 0
    transferred: int = 0
    remaining: int = 0
    error: str = ""


def progress_from_stats(stats: dict) -> Progress | None:
    """``virDomainGetJobStats`` of a running migration as progress; None when no job runs.

    SWITCHING once all memory has been sent (the last pass: the VM pauses, the target takes
    over); the percentage stays below 100 until libvirt's call has returned."""
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    total = int(stats.get("data_total", 0))
    processed = int(stats.get("data_processed", 0))
    remaining = int(stats.get("data_remaining", 0))
    phase = TRANSFERRING
    if int(stats.get("memory_total", 0)) and int(stats.get("memory_processed", 0)):
        if not int(stats.get("memory_remaining", 1)):
            phase = SWITCHING
    percent = min(99, processed * 100 // total) if total else 0
    return Progress(phase, percent, processed, remaining)


class MigrationJob:
    """One migration: ``start`` runs the libvirt call in a thread; ``sample`` reads progress;
    ``cancel`` aborts; ``done`` is set when the call has returned."""

    def __init__(self, dom: libvirt.virDomain, plan_: Plan) -> None:
        self.dom = dom
        self.plan = plan_
        self.done = threading.Event()
        self.error: str | None = None
        self.cancelled = False
        self._started = False
        self._lock = threading.Lock()
        self._last = Progress(PREPARING)
        self._thread = threading.Thread(target=self._run, name=f"migrate-{plan_.vm_id[:8]}", daemon=True)

    def start(self) -> None:
        """Run the migration in its thread (nothing, when it was cancelled before)."""
        with self._lock:
            if self.done.is_set():
                return
            self._started = True
        self._thread.start()

    def _run(self) -> None:
        try:
            self.dom.migrateToURI3(self.plan.target.uri, self.plan.params, self.plan.flags)
        except libvirt.libvirtError as exc:
            self.error = describe_failure(exc, self.plan.target)
        except Exception as exc:  # never leave the stream waiting on a dead thread
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.done.set()

    def sample(self) -> Progress:
        """Progress now, from ``jobStats()``; the last known one when the job is between states."""
        if self.plan.offline or self.done.is_set():
            return self._last
        try:
            stats = self.dom.jobStats()
        except libvirt.libvirtError:
            return self._last
        progress = progress_from_stats(stats)
        if progress is not None:
            self._last = progress
        return self._last

    def final(self) -> Progress:
        """The closing message: COMPLETE, or FAILED with libvirt's reason."""
        if self.error is not None:
            return attrs.evolve(self._last, phase=FAILED, error=self.error)
        return Progress(COMPLETE, 100, self._last.transferred + self._last.remaining, 0)

    def cancel(self) -> None:
        """Abort the libvirt job; the VM keeps running on the source. No-op once finished.

        Before :meth:`start` it ends the job at once (FAILED, never run). Safe to call again: a
        libvirt job that did not exist yet when first asked is aborted by a later call (the
        progress loop repeats it each interval)."""
        self.cancelled = True
        with self._lock:
            if not self._started and not self.done.is_set():
                self.error = "migration cancelled by the client before it started"
                self.done.set()  # never started: nothing to abort, and no longer claims the VM
            if self.done.is_set():
                return
        try:
            self.dom.abortJob()
        except libvirt.libvirtError:
            pass  # no job yet, or already over


def describe_failure(exc: libvirt.libvirtError, target: Target) -> str:
    message = exc.get_error_message() or str(exc)
    lowered = message.lower()
    if "cpu" in lowered and (
        "incompatible" in lowered or "doesn't match" in lowered or "not support" in lowered
    ):
        return f"{message}: {_CPU_HINT}"
    if exc.get_error_domain() in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE):
        return f"target {target.uri}: {message}"
    return message
