"""CreateVM: resolve what the spec leaves to the host (disks, cloud-init seed, networks), then define.

The domain XML itself is a pure function of the spec and a :class:`DomainContext`
(:mod:`quantix.hypervisor.domainxml`); this module does the I/O around it and undoes it when
the definition fails, so a failed CreateVM leaves no stray files.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import attrs
import libvirt
from twisted.logger import Logger

from quantix import errors
from quantix.hypervisor import cloudinit, domaininfo, domainxml
from quantix.hypervisor.storage import paths as storage_paths

if TYPE_CHECKING:
    from quantix.config import Config
    from quantix.hypervisor.storage.manager import AttachInfo
    from quantix.proto import node_pb2

log = Logger(namespace="quantix.hypervisor.provision")

GIB = 1024**3
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


class DiskStore(Protocol):
    """What VM provisioning needs from the storage box (``quantix.hypervisor.storage``)."""

    def create_disk(
        self, pool_id: str, name: str, size_bytes: int, fmt: str = "qcow2", backing_file: str | None = None
    ) -> str: ...

    def delete_path(self, path: str) -> bool: ...

    def attach_info(self, pool_id: str, volume_id: str, *, exact: bool = False) -> AttachInfo: ...

    def confine(self, what: str, path: str) -> str: ...

    def check_unshared(self, path: str, readonly: bool, vm_id: str) -> None: ...


def remove_file(store: DiskStore, path: str) -> None:
    """Delete a file this node created: as a pool volume when a pool holds it, else directly."""
    if not store.delete_path(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@attrs.frozen
class HostSettings:
    """The configuration CreateVM and the hot-plug paths read."""

    domain_type: str
    agent_socket_dir: str
    console_listen: str
    vm_images: str
    cloud_images: str
    iso_images: str = ""
    #: MAC → NIC source of the VM's configured network ports (see :mod:`quantix.network`).
    bound_nics: Callable[[str], Mapping[str, domainxml.NicSource]] = lambda vm_id: {}

    @classmethod
    def from_config(
        cls,
        config: Config,
        hypervisor_type: str = "",
        bound_nics: Callable[[str], Mapping[str, domainxml.NicSource]] = lambda vm_id: {},
    ) -> HostSettings:
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
            iso_images=config.storage.iso_images,
            bound_nics=bound_nics,
        )

    def seed_path(self, vm_id: str) -> str:
        """The cloud-init seed sits beside the VM's disks in the VM-disk pool."""
        return os.path.join(self.vm_images, f"{vm_id}-cloud-init.iso")


# ---------------------------------------------------------------------------------------------
# Networks


def _libvirt_code(exc: libvirt.libvirtError) -> int:
    return exc.get_error_code()


def resolve_nic_source(
    conn: libvirt.virConnect, nic: node_pb2.NicSpec, default: str = "default"
) -> domainxml.NicSource:
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


def request_file(
    what: str, given: str, base: str, store: DiskStore, *, block_ok: bool = False
) -> tuple[str, bool]:
    """(path, whether something is there) for a file a request names, absolute or relative to
    ``base``: confined to the node's storage locations (refusals do not say whether the file
    exists) and, when present, a regular file (or an allowed block device)."""
    if not os.path.isabs(given) and ".." in given.split("/"):
        raise errors.Invalid(f"{what} must not contain '..': {given[:200]!r}")
    path = given if os.path.isabs(given) else os.path.join(base, given)
    store.confine(what, domainxml.validate_path(what, path))
    try:
        storage_paths.check_kind(what, path, block_ok=block_ok)
    except FileNotFoundError:
        return path, False
    return path, True


def _backing(settings: HostSettings, backing_file: str, store: DiskStore) -> str:
    """An absolute path, or a name inside the cloud-image directory (never above it)."""
    path, present = request_file("backing_file", backing_file, settings.cloud_images, store)
    if not present:
        raise errors.NotFound(f"backing file not found: {backing_file}")
    return path


def make_disk(
    disk: node_pb2.DiskSpec, disk_id: str, vm_id: str, settings: HostSettings, store: DiskStore
) -> domainxml.DiskSource:
    """The image behind one DiskSpec: an absolute path is used as it is, so is an existing volume
    the control plane names by id; otherwise a volume is created in the disk's pool
    (``<vm_id>-<disk_id>.qcow2``), as an overlay when the disk has a backing file."""
    fmt = "raw" if disk.format == 1 else "qcow2"
    if disk.path and os.path.isabs(disk.path):
        request_file("disk path", disk.path, "/", store, block_ok=True)
        store.check_unshared(disk.path, disk.readonly, vm_id)
        return domainxml.DiskSource(disk.path, fmt)
    if disk.path:
        if not _VOLUME_NAME.match(disk.path):
            raise errors.Invalid(f"disk {disk_id}: not a usable volume id: {disk.path!r}")
        try:
            found = store.attach_info(disk.pool_id, disk.path, exact=True).path
        except errors.NotFound:
            pass  # a volume the control plane named but nobody made yet: create it below
        else:
            store.check_unshared(found, disk.readonly, vm_id)
            return domainxml.DiskSource(found, fmt)
    backing = _backing(settings, disk.backing_file, store) if disk.backing_file else None
    if backing:
        fmt = "qcow2"  # only qcow2 can carry a backing file
    elif not disk.size_gib:
        raise errors.Invalid(f"disk {disk_id}: size_gib is required to create it")
    stem = disk.path or f"{vm_id}-{disk_id}"
    if not _VOLUME_NAME.match(stem):
        raise errors.Invalid(f"disk {disk_id}: not a usable volume name: {stem!r}")
    path = store.create_disk(disk.pool_id, f"{stem}.{fmt}", disk.size_gib * GIB, fmt, backing)
    return domainxml.DiskSource(path, fmt, created=True)


def iso_path(given: str, settings: HostSettings, store: DiskStore) -> str | None:
    """A CD-ROM image: absolute, or relative to the ISO directory; confined like every request
    path. A missing ISO inside the allowed locations is accepted (libvirt refuses the start)."""
    if not given:
        return None
    return request_file(
        "iso_path", given, settings.iso_images or settings.cloud_images, store, block_ok=True
    )[0]


# ---------------------------------------------------------------------------------------------
# CreateVM


def wants_seed(spec: node_pb2.VMSpec) -> bool:
    """A cloud-init seed when the spec carries cloud-init data, or when a disk is an overlay of
    a cloud image: such an image waits minutes for a datasource without one (the seed then has
    only the generated meta-data: instance id and host name)."""
    return cloudinit.wants_cloud_init(spec.cloud_init) or any(d.backing_file for d in spec.disks)


def existing(conn: libvirt.virConnect, vm_id: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByUUIDString(vm_id)
    except libvirt.libvirtError as exc:
        if _libvirt_code(exc) == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def create_vm(
    conn: libvirt.virConnect, req: node_pb2.CreateVMOnNodeRequest, settings: HostSettings, store: DiskStore
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
    # Cheap checks the builder would make anyway, before any disk is created.
    domainxml.vcpu_topology(req.spec)
    domainxml.validate_memory(req.spec)
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
        if wants_seed(spec):
            iso = settings.seed_path(vm_id)
            cloudinit.write_nocloud_iso(iso, vm_id, name, spec.cloud_init)
            made.append(iso)
        nics = [resolve_nic_source(conn, nic) for nic in spec.nics]
        cdroms = [iso_path(c.iso_path, settings, store) for c in spec.cdroms]
        ctx = domainxml.DomainContext(
            vm_id=vm_id,
            name=name,
            agent_socket_dir=settings.agent_socket_dir,
            console_listen=settings.console_listen,
            labels=labels,
            disks=disks,
            cdrom_paths=cdroms,
            nics=nics,
            bound_nics=settings.bound_nics(vm_id),
            cloud_init_iso=iso,
            domain_type=settings.domain_type,
        )
        conn.defineXML(domainxml.domain_xml(spec, ctx))
    except BaseException:
        for path in reversed(made):
            try:
                remove_file(store, path)
            except Exception as exc:
                log.warn("could not roll back {path}: {err}", path=path, err=exc)
        raise
    return vm_id, True
