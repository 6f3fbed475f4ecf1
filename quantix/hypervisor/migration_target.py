"""The target's side of a migration: checks, pre-created disks, and one-use tokens.

``PrepareMigration`` runs on the target before the source starts copying. It reads the VM's
definition from the source's libvirtd (read-only), checks that this host can take it, and
creates what libvirt will not: the files of disks that are not shared (same path, format and
size, empty, so a storage copy can fill them) and any missing read-only image (an ISO, the
cloud-init CD-ROM) copied from the source. Files are only ever created under this node's
storage roots. The token it returns is what ``ReceiveMigration`` accepts, once.

Blocking (libvirt, qemu-img, file copies): call from a worker thread.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable

import attrs
import libvirt

from quantix import errors
from quantix.events import mapping
from quantix.hypervisor import domaininfo, migration
from quantix.hypervisor.storage import files

#: How long a token from PrepareMigration stays valid.
TOKEN_SECONDS = 600
QEMU_IMG_SECONDS = 60


@attrs.frozen
class Prepared:
    vm_id: str
    created: tuple[str, ...]
    copied: tuple[str, ...]


def _within(path: str, roots: Iterable[str]) -> bool:
    real = os.path.realpath(path)
    return any(files.within(real, os.path.realpath(root)) for root in roots)


def prepare(
    conn: libvirt.virConnect,
    vm_id: str,
    source: migration.Target,
    *,
    shared_dirs: Iterable[str],
    storage_roots: Iterable[str],
) -> Prepared:
    """Check and pre-create for ``vm_id`` arriving from ``source``; see the module docstring."""
    try:
        conn.lookupByUUIDString(vm_id)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    else:
        raise errors.AlreadyExists(f"VM {vm_id} already exists on this node")
    sconn = migration.open_target(source)
    try:
        try:
            dom = sconn.lookupByUUIDString(vm_id)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                raise errors.VMNotFound(vm_id) from None
            raise
        info = domaininfo.parse_domain(dom.XMLDesc(0))
        free = conn.getFreeMemory()
        if info.memory_kib * 1024 > free:
            raise errors.WrongState(
                f"this node has {free >> 20} MiB free; VM {vm_id} needs {info.memory_kib >> 10} MiB"
            )
        shared = [*shared_dirs, *migration.network_pool_dirs(conn)]
        roots = list(storage_roots)
        to_create: list[tuple[domaininfo.DiskInfo, str]] = []
        to_copy: list[str] = []
        for disk in info.disks:
            path = disk.path
            if not path or disk.element.get("type") not in ("file", None):
                continue
            if migration.is_shared(path, shared):
                if not os.path.isdir(os.path.dirname(path)):
                    raise errors.WrongState(
                        f"shared storage {os.path.dirname(path)} (disk {disk.dev}) is not mounted here"
                    )
                continue
            if os.path.exists(path):
                continue
            if not _within(path, roots):
                raise errors.WrongState(
                    f"disk {disk.dev} ({path}) is outside this node's storage roots: create it first"
                )
            if disk.readonly or disk.device != "disk":
                to_copy.append(path)
            else:
                to_create.append((disk, path))
        created = [_create_like(dom, disk, path) for disk, path in to_create]
        copied = [_copy_from(source, path) for path in to_copy]
    finally:
        sconn.close()
    return Prepared(vm_id, tuple(created), tuple(copied))


def _create_like(dom: libvirt.virDomain, disk: domaininfo.DiskInfo, path: str) -> str:
    """An empty image at ``path`` (the disk's), with the same format, size and (when present)
    backing."""
    capacity = dom.blockInfo(path)[0]
    fmt = disk.format or "raw"
    argv = ["qemu-img", "create", "-q", "-f", fmt]
    backing = disk.element.find("backingStore/source")
    backing_path = backing.get("file") if backing is not None else None
    if fmt == "qcow2" and backing_path and os.path.exists(backing_path):
        fmt_element = disk.element.find("backingStore/format")
        backing_fmt = (fmt_element.get("type") if fmt_element is not None else None) or "qcow2"
        argv += ["-b", backing_path, "-F", backing_fmt]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    argv += [path, str(capacity)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=QEMU_IMG_SECONDS, check=False)
    if proc.returncode != 0:
        raise errors.QuantixError(f"cannot create {path}: {proc.stderr.strip()}")
    return path


def _copy_from(source: migration.Target, path: str) -> str:
    """Download a read-only image from a volume in one of the source's pools."""
    try:
        sconn = libvirt.open(source.uri)
    except libvirt.libvirtError as exc:
        raise errors.Unavailable(f"source {source.uri}: {exc.get_error_message()}") from None
    part = f"{path}.part"
    try:
        _refresh_pools_over(sconn, path)
        try:
            vol = sconn.storageVolLookupByPath(path)
        except libvirt.libvirtError:
            raise errors.WrongState(
                f"{path} is missing here and is in no storage pool of the source: copy it first"
            ) from None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        stream = sconn.newStream(0)
        with open(part, "wb") as out:
            vol.download(stream, 0, 0, 0)
            stream.recvAll(lambda _stream, data, fh: fh.write(data), out)
            stream.finish()
        os.replace(part, path)
    finally:
        if os.path.exists(part):
            os.unlink(part)
        sconn.close()
    return path


def _refresh_pools_over(conn: libvirt.virConnect, path: str) -> None:
    """A directory pool lists files as of its last refresh: refresh those holding ``path``."""
    for pool in conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE):
        try:
            target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
            if target and files.within(path, os.path.normpath(target)):
                pool.refresh(0)
        except libvirt.libvirtError:
            continue  # stopped or undefined meanwhile


# ---------------------------------------------------------------------------------------------
# Tokens


@attrs.define
class _Token:
    vm_id: str
    expires: float
    used: bool = False


class Tokens:
    """One-use tokens, each for one VM, valid for :data:`TOKEN_SECONDS` (kept in memory)."""

    def __init__(self, clock: Callable[[], float] = time.time, lifetime: float = TOKEN_SECONDS) -> None:
        self._clock = clock
        self._lifetime = lifetime
        self._lock = threading.Lock()
        self._tokens: dict[str, _Token] = {}
        #: VM id -> when it was received, for VMs announced by ReceiveMigration.
        self.expected: dict[str, float] = {}

    def issue(self, vm_id: str) -> tuple[str, float]:
        """A new token and its expiry (seconds since the epoch)."""
        now = self._clock()
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires > now}
            self._tokens[token] = _Token(vm_id, now + self._lifetime)
        return token, now + self._lifetime

    def receive(self, token: str, vm_id: str) -> None:
        """Accept ``token`` for ``vm_id`` once: unknown NotFound, expired or used WrongState,
        another VM's Invalid."""
        if not token:
            raise errors.Invalid("token is required")
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None:
                raise errors.NotFound("migration token not found")
            if entry.expires <= self._clock():
                raise errors.WrongState("migration token expired: prepare the migration again")
            if vm_id and vm_id != entry.vm_id:
                raise errors.Invalid(f"migration token is for VM {entry.vm_id}, not {vm_id}")
            if entry.used:
                raise errors.WrongState("migration token already used")
            entry.used = True
            self.expected[entry.vm_id] = self._clock()

    def arrived(self, vm_id: str, state: str | None) -> bool:
        """Reactor: ``vm_id`` appeared in ``state``. True for an announced VM that arrived
        stopped: an offline migration, which no libvirt event calls one (a live arrival has its
        own "started, migrated" event)."""
        if state is None or self.expected.pop(vm_id, None) is None:
            return False
        return state == mapping.STOPPED
