"""CreateVM: resolve what the spec leaves to the host (disks, cloud-init seed, networks), then define.

The domain XML itself is a pure function of the spec and a :class:`DomainContext`
(:mod:`quantix.hypervisor.domainxml`); this module does the I/O around it and undoes it when
the definition fails, so a failed CreateVM leaves no stray files.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import libvirt
from twisted.logger import Logger

from quantix import errors
from quantix.hypervisor import cloudinit, domaininfo, domainxml

log = Logger(namespace="quantix.hypervisor.provision")

GIB = 1024**3
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class DiskStore(Protocol):
    """What VM provisioning needs from the storage box."""

    def create_disk(
        self, pool_id: str, name: str, size_bytes: int, fmt: str = "qcow2", backing_file: str | None = None
    ) -> str: ...

    def delete_path(self, path: str) -> None: ...


class LocalDisks:
    """Disk images as files under one directory, made with ``qemu-img``.

    Stands in for the storage box's ``create_disk``/``delete_path`` where none is wired: only
    the default location (empty ``pool_id``) exists here.
    """

    def __init__(self, directory: str, run: Callable[..., Any] = subprocess.run) -> None:
        self.directory = directory
        self._run = run

    def create_disk(
        self, pool_id: str, name: str, size_bytes: int, fmt: str = "qcow2", backing_file: str | None = None
    ) -> str:
        if pool_id:
            raise errors.NotFound(f"storage pool not found: {pool_id}")
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"{name}.{fmt}")
        if os.path.exists(path):
            raise errors.AlreadyExists(f"disk image already exists: {path}")
        cmd = ["qemu-img", "create", "-q", "-f", fmt]
        if backing_file:
            cmd += ["-b", backing_file, "-F", _image_format(backing_file)]
        cmd.append(path)
        if size_bytes:
            cmd.append(str(size_bytes))
        proc = self._run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise errors.QuantixError(f"qemu-img create failed: {proc.stderr.strip()}")
        return path

    def delete_path(self, path: str) -> None:
        os.unlink(path)


def _image_format(path: str) -> str:
    """qcow2 unless the file says otherwise (qemu-img refuses an overlay without -F)."""
    try:
        with open(path, "rb") as fh:
            return "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"
    except OSError:
        return "qcow2"


@attrs.frozen
class HostSettings:
    """The configuration CreateVM and the hot-plug paths read."""

    domain_type: str
    agent_socket_dir: str
    console_listen: str
    vm_images: str
    cloud_images: str

    @classmethod
    def from_config(cls, config: Any, hypervisor_type: str = "") -> HostSettings:
        """``hypervisor_type`` is ``virConnectGetType`` of the live connection."""
        domain_type = config.hypervisor.domain_type
        if hypervisor_type.upper() == "TEST":
            domain_type = "test"  # the test driver only accepts its own type
        return cls(
            domain_type=domain_type,
            agent_socket_dir=config.agent.socket_dir,
            console_listen=config.hypervisor.console_listen,
            vm_images=config.storage.vm_images,
            cloud_images=config.storage.cloud_images,
        )

    def vm_dir(self, vm_id: str) -> str:
        """Per-VM directory for files that belong to no pool (the cloud-init seed)."""
        return os.path.join(self.vm_images, vm_id)


# ---------------------------------------------------------------------------------------------
# Networks


def _libvirt_code(exc: libvirt.libvirtError) -> int:
    return exc.get_error_code()


def resolve_nic_source(conn: libvirt.virConnect, nic: Any, default: str = "default") -> domainxml.NicSource:
    """Bridge as given; a network by libvirt name or UUID. The control plane sends its own
    network UUIDs, which libvirt does not know: those fall back to the ``default`` network."""
    if nic.bridge:
        return domainxml.NicSource("bridge", nic.bridge)
    wanted = nic.network or default
    for find in (conn.networkLookupByName, conn.networkLookupByUUIDString):
        try:
            return domainxml.NicSource("network", find(wanted).name())
        except libvirt.libvirtError as exc:
            if _libvirt_code(exc) not in (libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_INVALID_ARG):
                raise
    if wanted != default:
        try:
            conn.networkLookupByName(default)
        except libvirt.libvirtError:
            pass
        else:
            log.info("network {net} unknown to libvirt; using {default}", net=wanted, default=default)
            return domainxml.NicSource("network", default)
    raise errors.NotFound(f"network not found: {wanted}")


# ---------------------------------------------------------------------------------------------
# Disks


def _backing(settings: HostSettings, backing_file: str) -> str:
    path = backing_file if os.path.isabs(backing_file) else os.path.join(settings.cloud_images, backing_file)
    domainxml.validate_path("backing_file", path)
    if not os.path.exists(path):
        raise errors.NotFound(f"backing file not found: {path}")
    return path


def make_disk(
    disk: Any, disk_id: str, vm_id: str, settings: HostSettings, store: DiskStore
) -> domainxml.DiskSource:
    """The image behind one DiskSpec: an absolute path is used as it is; an empty path (or the
    control plane's volume id) is created in the disk's pool, as an overlay when it has a backing
    file."""
    fmt = "raw" if disk.format == 1 else "qcow2"
    if disk.path and os.path.isabs(disk.path):
        return domainxml.DiskSource(domainxml.validate_path("disk path", disk.path), fmt)
    name = disk.path or f"{vm_id}-{disk_id}"
    if not _VOLUME_NAME.match(name):
        raise errors.Invalid(f"disk {disk_id}: not a usable volume name: {name!r}")
    backing = _backing(settings, disk.backing_file) if disk.backing_file else None
    if backing:
        fmt = "qcow2"  # only qcow2 can carry a backing file
    elif not disk.size_gib:
        raise errors.Invalid(f"disk {disk_id}: size_gib is required to create it")
    path = store.create_disk(disk.pool_id, name, disk.size_gib * GIB, fmt, backing)
    return domainxml.DiskSource(path, fmt, created=True)


# ---------------------------------------------------------------------------------------------
# CreateVM


def existing(conn: libvirt.virConnect, vm_id: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByUUIDString(vm_id)
    except libvirt.libvirtError as exc:
        if _libvirt_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def create_vm(
    conn: libvirt.virConnect, req: Any, settings: HostSettings, store: DiskStore
) -> tuple[str, bool]:
    """Define the VM of a ``CreateVMOnNodeRequest``; ``(vm_id, created)``.

    The same request again is a no-op (``created`` False); another spec under the same id is
    AlreadyExists. The request's fingerprint lives in our metadata block.
    """
    vm_id = domainxml.validate_vm_id(req.vm_id)
    if not req.HasField("spec"):
        raise errors.Invalid("VM spec is required")
    name = domainxml.validate_name(req.name or f"vm-{vm_id[:8]}")
    labels = domainxml.validate_labels(dict(req.labels))
    digest = domainxml.request_digest(name, req.spec, labels)

    dom = existing(conn, vm_id)
    if dom is not None:
        meta = domaininfo.parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).meta
        if meta.digest == digest:
            return vm_id, False
        raise errors.AlreadyExists(f"VM {vm_id} already exists with a different spec")
    try:
        other = conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if _libvirt_code(exc) != libvirt.VIR_ERR_NO_DOMAIN:
            raise
    else:
        raise errors.AlreadyExists(f"a VM named {name!r} already exists (id {other.UUIDString()})")

    spec = req.spec
    made: list[str] = []
    iso = None
    try:
        disks = []
        for i, disk in enumerate(spec.disks):
            source = make_disk(disk, disk.id or f"disk{i}", vm_id, settings, store)
            if source.created:
                made.append(source.path)
            disks.append(source)
        if spec.HasField("cloud_init") and cloudinit.wants_cloud_init(spec.cloud_init):
            iso = os.path.join(settings.vm_dir(vm_id), "cloud-init.iso")
            cloudinit.write_nocloud_iso(iso, vm_id, name, spec.cloud_init)
            made.append(iso)
        nics = [resolve_nic_source(conn, nic) for nic in spec.nics]
        ctx = domainxml.DomainContext(
            vm_id=vm_id,
            name=name,
            agent_socket_dir=settings.agent_socket_dir,
            console_listen=settings.console_listen,
            labels=labels,
            disks=disks,
            nics=nics,
            cloud_init_iso=iso,
            domain_type=settings.domain_type,
        )
        conn.defineXML(domainxml.domain_xml(spec, ctx))
    except BaseException:
        for path in reversed(made):
            try:
                os.unlink(path) if path == iso else store.delete_path(path)
            except Exception as exc:
                log.warn("could not roll back {path}: {err}", path=path, err=exc)
        _rmdir(settings.vm_dir(vm_id))
        raise
    return vm_id, True


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
