"""Pools, volumes and images through libvirt's storage API (blocking: call from worker threads).

Pools are libvirt storage pools named by the control plane's ``pool_id``, defined persistently
and autostarted, so they come back after a daemon or host restart without the daemon. Volumes
are libvirt volumes; a file pool names them ``<volume_id>.qcow2``. A volume snapshot is a
point-in-time copy named ``<volume>@<snapshot_id>``: libvirt has no volume snapshot API, and a
copy works the same on every backend that can copy.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import uuid as uuidlib
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator

import attrs
import libvirt

from quantix import errors
from quantix.config import StorageConfig
from quantix.hypervisor import domaininfo
from quantix.hypervisor.errors import translate
from quantix.hypervisor.storage import files, paths
from quantix.hypervisor.storage import xml as sxml
from quantix.util.locks import KeyedLocks

LOCAL_DIR, LOCAL_LVM, NFS, CEPH_RBD, ISCSI = "local_dir", "local_lvm", "nfs", "ceph_rbd", "iscsi"
#: libvirt pool type → the contract's pool type name.
KIND_TYPES = {
    "dir": LOCAL_DIR,
    "fs": LOCAL_DIR,
    "netfs": NFS,
    "rbd": CEPH_RBD,
    "iscsi": ISCSI,
    "logical": LOCAL_LVM,
}
FILE_KINDS = frozenset({"dir", "fs", "netfs"})
REMOTE_KINDS = frozenset({"netfs", "rbd", "iscsi"})
VOLUME_EXTENSIONS = (".qcow2", ".raw", ".img")
DEFAULT_POOL_IDS = frozenset({"", "default"})
#: Ceph's own configuration directory: keyrings live there whatever the storage roots are.
CEPH_DIR = "/etc/ceph"
#: strerror(ENOSPC) as libvirt quotes it, and libvirt's own refusal when its figures say so
NO_SPACE = ("No space left on device", "Not enough free space in pool")
SECRET_NAMESPACE = uuidlib.UUID("5b0c7bd4-3a6e-4f7c-9f5e-6a1d0c9e2b11")
SNAPSHOT_SEP = "@"


@attrs.frozen
class PoolInfo:
    pool_id: str
    type: str
    kind: str
    mount_path: str
    device_path: str
    rbd_pool: str
    total_bytes: int
    available_bytes: int
    used_bytes: int
    volume_count: int
    active: bool


@attrs.frozen
class VolumeInfo:
    volume_id: str
    pool_id: str
    name: str
    size_bytes: int
    format: str
    path: str
    attached_to: str = ""


@attrs.frozen
class AttachInfo:
    volume_id: str
    path: str
    disk_xml: str


@attrs.frozen
class PoolRequest:
    """An InitStoragePool request in plain values (the RPC layer converts the message)."""

    pool_id: str
    type: str
    local_path: str = ""
    nfs_server: str = ""
    nfs_export: str = ""
    nfs_version: str = ""
    nfs_options: str = ""
    nfs_mount_point: str = ""
    ceph_pool: str = ""
    ceph_monitors: tuple[str, ...] = ()
    ceph_user: str = ""
    ceph_keyring: str = ""
    ceph_secret_uuid: str = ""
    iscsi_portal: str = ""
    iscsi_target: str = ""
    iscsi_chap: bool = False
    iscsi_chap_user: str = ""
    iscsi_chap_password: str = ""


@attrs.frozen
class SecretPlan:
    uuid: str
    usage: str
    usage_name: str
    value: bytes


@attrs.frozen
class PoolPlan:
    kind: str
    xml: str
    target_path: str = ""
    secret: SecretPlan | None = None


# -- pure helpers -------------------------------------------------------------------------------


def check_name(what: str, value: str) -> str:
    """Ids become libvirt names and file names: no separators, no hidden or parent names."""
    if not value:
        raise errors.Invalid(f"{what} is required")
    if len(value) > 200 or "/" in value or "\x00" in value or value.startswith(".") or SNAPSHOT_SEP in value:
        raise errors.Invalid(f"invalid {what}: {value!r}")
    return value


#: libvirt-python passes sizes as signed 64-bit: anything larger raises OverflowError.
MAX_VOLUME_BYTES = 2**63 - 1
#: PATH_MAX: a longer directory cannot be created or mounted on.
MAX_PATH_BYTES = 4095


def check_path(what: str, path: str) -> str:
    """An absolute directory the host can use."""
    if not os.path.isabs(path):
        raise errors.Invalid(f"{what} must be absolute: {path[:200]!r}")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES or "\x00" in path:
        raise errors.Invalid(f"{what} is not a usable path (too long or contains NUL)")
    return path


def check_pool_id(pool_id: str) -> str:
    """A pool the control plane names; "default" is reserved for the VM-disk pool."""
    check_name("pool_id", pool_id)
    if pool_id in DEFAULT_POOL_IDS:
        raise errors.Invalid(f"pool id {pool_id!r} is reserved for the VM-disk pool")
    return pool_id


def pool_uuid(pool_id: str) -> str | None:
    """A control-plane UUID becomes the libvirt pool UUID too, so both sides agree."""
    try:
        return str(uuidlib.UUID(pool_id))
    except ValueError:
        return None


def secret_uuid(pool_id: str, usage: str) -> str:
    return str(uuidlib.uuid5(SECRET_NAMESPACE, f"{usage}:{pool_id}"))


def keyring_key(text: str, user: str) -> bytes:
    """The raw key of ``client.<user>`` (or the only key) in a Ceph keyring file."""
    section, keys = "", {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip()
        elif "=" in line:
            name, _, value = line.partition("=")
            if name.strip() == "key":
                keys[section] = value.strip()
    key = keys.get(f"client.{user}") or (next(iter(keys.values())) if len(keys) == 1 else None)
    if not key:
        raise errors.Invalid(f"no key for client.{user} in the keyring")
    try:
        return base64.b64decode(key, validate=True)
    except ValueError:
        raise errors.Invalid("the keyring key is not base64") from None


def plan_pool(req: PoolRequest, root: str, keyring: bytes | None = None) -> PoolPlan:
    """The libvirt definition for a request (pure). ``keyring`` is the Ceph key already read."""
    pid = check_pool_id(req.pool_id)
    uuid = pool_uuid(pid)
    if req.type == LOCAL_DIR:
        path = os.path.normpath(req.local_path) if req.local_path else os.path.join(root, "pools", pid)
        check_path("local path", path)
        return PoolPlan("dir", sxml.dir_pool_xml(pid, path, uuid), path)
    if req.type == NFS:
        if not req.nfs_server or not req.nfs_export:
            raise errors.Invalid("NFS pools need a server and an export path")
        mount = req.nfs_mount_point or os.path.join(root, "mnt", f"nfs-{pid}")
        check_path("mount point", mount)
        xml = sxml.netfs_pool_xml(
            pid,
            req.nfs_server,
            req.nfs_export,
            os.path.normpath(mount),
            version=req.nfs_version,
            options=req.nfs_options,
            uuid=uuid,
        )
        return PoolPlan("netfs", xml, os.path.normpath(mount))
    if req.type == CEPH_RBD:
        if not req.ceph_pool or not req.ceph_monitors:
            raise errors.Invalid("Ceph RBD pools need a pool name and monitors")
        try:
            monitors = [sxml.split_host_port(m, sxml.CEPH_DEFAULT_PORT) for m in req.ceph_monitors]
        except ValueError as exc:
            raise errors.Invalid(f"bad Ceph monitor: {exc}") from None
        user = req.ceph_user or "admin"
        secret = None
        sec_uuid = req.ceph_secret_uuid or None
        if not sec_uuid and keyring is not None:
            sec_uuid = secret_uuid(pid, "ceph")
            secret = SecretPlan(sec_uuid, "ceph", f"quantix-{pid}", keyring)
        xml = sxml.rbd_pool_xml(pid, req.ceph_pool, monitors, user=user, secret_uuid=sec_uuid, uuid=uuid)
        return PoolPlan("rbd", xml, "", secret)
    if req.type == ISCSI:
        if not req.iscsi_portal or not req.iscsi_target:
            raise errors.Invalid("iSCSI pools need a portal and a target")
        try:
            host, port = sxml.split_host_port(req.iscsi_portal, sxml.ISCSI_DEFAULT_PORT)
        except ValueError as exc:
            raise errors.Invalid(f"bad iSCSI portal: {exc}") from None
        secret = None
        sec_uuid = None
        if req.iscsi_chap:
            if not req.iscsi_chap_user:
                raise errors.Invalid("CHAP needs a user name")
            sec_uuid = secret_uuid(pid, "iscsi")
            secret = SecretPlan(sec_uuid, "iscsi", f"quantix-{pid}", req.iscsi_chap_password.encode())
        xml = sxml.iscsi_pool_xml(
            pid, host, port, req.iscsi_target, chap_user=req.iscsi_chap_user, secret_uuid=sec_uuid, uuid=uuid
        )
        return PoolPlan("iscsi", xml, "/dev/disk/by-path", secret)
    raise errors.Invalid(f"unsupported storage pool type: {req.type}")


def volume_name(kind: str, volume_id: str, fmt: str) -> str:
    """File pools get an extension so the file says what it is; block backends keep the id."""
    if kind not in FILE_KINDS or volume_id.endswith(VOLUME_EXTENSIONS):
        return volume_id
    return f"{volume_id}.{'qcow2' if fmt == 'qcow2' else 'raw'}"


def volume_stem(name: str) -> str:
    for ext in VOLUME_EXTENSIONS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def snapshot_name(volume_name_: str, snapshot_id: str) -> str:
    stem = volume_stem(volume_name_)
    return f"{stem}{SNAPSHOT_SEP}{snapshot_id}{volume_name_[len(stem) :]}"


def _domain_disks(xml: str) -> Iterator[tuple[str, str]]:
    """(source path, target dev) of a domain's disks."""
    for path, dev, _ in _domain_disk_modes(xml):
        yield path, dev


def _domain_disk_modes(xml: str) -> Iterator[tuple[str, str, str]]:
    """(source path, target dev, "rw" | "ro" | "shared") of a domain's disks."""
    for disk in ET.fromstring(xml).iter("disk"):
        source = disk.find("source")
        target = disk.find("target")
        if source is None:
            continue
        path = source.get("file") or source.get("dev") or source.get("name") or ""
        if not path:
            continue
        if disk.find("shareable") is not None:
            mode = "shared"
        elif disk.find("readonly") is not None or disk.get("device") == "cdrom":
            mode = "ro"
        else:
            mode = "rw"
        yield path, target.get("dev", "") if target is not None else "", mode


def _upfront(fmt: str, size_bytes: int) -> int:
    """Bytes a new volume takes at creation: libvirt allocates a raw volume whole (no
    ``<allocation>`` in our XML), a qcow2 one grows as the guest writes."""
    return size_bytes if fmt == "raw" else 0


def _reason(exc: libvirt.libvirtError) -> str:
    """libvirt's message on one line, without the generic "internal error:" prefix."""
    message = exc.get_error_message() or str(exc)
    return " ".join(message.removeprefix("internal error: ").split())


def _defined_xml(pool: libvirt.virStoragePool) -> str:
    """The persistent definition; drivers without the flag (the test driver) give the live one."""
    try:
        return pool.XMLDesc(libvirt.VIR_STORAGE_XML_INACTIVE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
            raise
        return pool.XMLDesc(0)


def _storage_error(exc: libvirt.libvirtError) -> errors.QuantixError:
    code = exc.get_error_code()
    message = exc.get_error_message() or str(exc)
    if code == libvirt.VIR_ERR_STORAGE_VOL_EXIST:
        return errors.AlreadyExists(message)
    if code == libvirt.VIR_ERR_SYSTEM_ERROR:
        return errors.QuantixError(f"libvirt: {message}")
    return translate(exc) or errors.QuantixError(message)


@contextlib.contextmanager
def _libvirt_errors() -> Iterator[None]:
    try:
        yield
    except libvirt.libvirtError as exc:
        raise _storage_error(exc) from None


# -- the manager --------------------------------------------------------------------------------


class StorageManager:
    """Blocking storage operations on the daemon's libvirt connection."""

    def __init__(self, conn: Callable[[], libvirt.virConnect], config: StorageConfig) -> None:
        self._conn = conn
        self.config = config
        self.root = os.path.abspath(config.root)
        self._pool_locks = KeyedLocks()
        self._vm_pool_seen = ""

    @property
    def vm_pool_name(self) -> str:
        """Unique per VM-disk directory, so daemons sharing one libvirtd never collide."""
        digest = hashlib.sha256(os.path.realpath(self.config.vm_images).encode()).hexdigest()[:8]
        return f"quantix-vms-{digest}"

    def _locked(self, pool_id: str) -> contextlib.AbstractContextManager[None]:
        """One operation per pool at a time."""
        return self._pool_locks.hold(pool_id)

    def _under_root(self, path: str) -> bool:
        return bool(path) and paths.within(os.path.realpath(path), os.path.realpath(self.root))

    def download_roots(self) -> list[str]:
        """Blocking (libvirt): where image downloads may go: the storage root and every active
        pool with a directory (custom NFS mount points and local paths lie outside the root)."""
        roots = [self.config.root]
        try:
            roots += [p.mount_path for p in self.list_pools() if p.active and p.mount_path]
        except errors.QuantixError:
            pass  # libvirt down: the storage root still covers every path the control plane builds
        return roots

    def allowed_roots(self) -> list[str]:
        """Where a path in a request may point: the storage directories, ``allowed_paths``, and
        the directory of every active file pool (one in a system directory excepted)."""
        c = self.config
        roots = [c.root, c.vm_images, c.cloud_images, c.iso_images, *getattr(c, "allowed_paths", ())]
        try:
            pools = self._conn().listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
        except libvirt.libvirtError:
            return roots
        for pool in pools:
            try:
                d = sxml.parse_pool(pool.XMLDesc(0))
            except libvirt.libvirtError:
                continue  # undefined meanwhile
            if d.kind in FILE_KINDS and d.target_path and paths.system_dir(d.target_path) is None:
                roots.append(d.target_path)
        return roots

    def confine(self, what: str, path: str) -> str:
        """``path`` when it lies in :meth:`allowed_roots`; else Invalid, revealing nothing."""
        return paths.confine(what, path, self.allowed_roots())

    def check_unshared(self, path: str, readonly: bool, vm_id: str) -> None:
        """Refuse a disk image another defined domain uses, unless neither side writes to it
        or the other side marked it shareable: two VMs writing one image corrupt it."""
        real = os.path.realpath(path)
        with _libvirt_errors():
            domains = self._conn().listAllDomains(0)
        for dom in domains:
            try:
                if dom.UUIDString() == vm_id:
                    continue
                xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
            except libvirt.libvirtError:
                continue  # undefined meanwhile
            for other, _, mode in _domain_disk_modes(xml):
                if os.path.realpath(other) != real or mode == "shared" or (mode == "ro" and readonly):
                    continue
                raise errors.WrongState(
                    f"disk {path} is already used {'read-write' if mode == 'rw' else 'read-only'} by VM "
                    f"{dom.UUIDString()}; a disk can be written by one VM at a time"
                )

    def _create(
        self, pool: libvirt.virStoragePool, xml: str, needed: int, src: libvirt.virStorageVol | None = None
    ) -> libvirt.virStorageVol:
        """Create a volume (a copy of ``src`` when given). ``needed`` is what the new file takes
        at once (a raw volume is allocated whole, a copy takes its source's allocation; a qcow2
        starts near empty): more than the pool has free is refused before anything is written,
        and an ENOSPC that happens anyway (the space went meanwhile) is reported the same way."""
        if needed:
            with _libvirt_errors():
                _, capacity, _, available = pool.info()
            if needed > available:
                raise self._out_of_space(pool, needed, (capacity, available))
        try:
            return pool.createXMLFrom(xml, src, 0) if src is not None else pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            if any(text in (exc.get_error_message() or "") for text in NO_SPACE):
                raise self._out_of_space(pool, needed) from None
            raise _storage_error(exc) from None

    @staticmethod
    def _out_of_space(
        pool: libvirt.virStoragePool, needed: int, sizes: tuple[int, int] | None = None
    ) -> errors.ResourceExhausted:
        if sizes is None:
            with contextlib.suppress(libvirt.libvirtError):
                pool.refresh(0)  # libvirt's figures are as of its last look
            try:
                _, capacity, _, available = pool.info()
                sizes = (capacity, available)
            except libvirt.libvirtError:
                sizes = None
        wanted = f"{needed} bytes needed" if needed else "no space left"
        free = f", {sizes[1]} of {sizes[0]} bytes free" if sizes else ""
        return errors.ResourceExhausted(f"storage pool {pool.name()} is out of space: {wanted}{free}")

    # -- pools --------------------------------------------------------------------------------

    def init_pool(self, req: PoolRequest) -> PoolInfo:
        """Define, build, start and autostart a pool; an existing one is started and refreshed."""
        for what, where in (("pool path", req.local_path), ("NFS mount point", req.nfs_mount_point)):
            if where and os.path.isabs(where):
                paths.check_pool_dir(what, os.path.normpath(where))
        keyring = self._read_keyring(req) if req.type == CEPH_RBD else None
        plan = plan_pool(req, self.root, keyring)
        with self._locked(req.pool_id):
            conn = self._conn()
            try:
                pool = conn.storagePoolLookupByName(req.pool_id)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
                    raise _storage_error(exc) from None
                pool = None
            if pool is not None:
                pool = self._reuse(conn, pool, plan)
            else:
                pool = self._define(conn, plan)
            return self._info(pool, refresh=True)

    def _reuse(self, conn: libvirt.virConnect, pool: libvirt.virStoragePool, plan: PoolPlan):
        with _libvirt_errors():
            current = sxml.parse_pool(_defined_xml(pool))
            wanted = sxml.parse_pool(plan.xml)
            self._ensure_secret(conn, plan.secret)  # a rotated key or CHAP password takes effect
            if not current.same_backend(wanted):
                if pool.isActive():
                    raise errors.WrongState(
                        f"storage pool {pool.name()} is active with a different definition; destroy it first"
                    )
                pool = conn.storagePoolDefineXML(sxml.with_uuid(plan.xml, pool.UUIDString()), 0)
        if not pool.isActive():
            self._start(pool, plan)
        with _libvirt_errors():
            if not pool.autostart():
                pool.setAutostart(1)
        return pool

    def _define(self, conn: libvirt.virConnect, plan: PoolPlan) -> libvirt.virStoragePool:
        created_secret = self._ensure_secret(conn, plan.secret)
        try:
            pool = conn.storagePoolDefineXML(plan.xml, 0)
        except libvirt.libvirtError as exc:
            self._drop_secret(conn, plan.secret if created_secret else None)
            if exc.get_error_code() == libvirt.VIR_ERR_INTERNAL_ERROR:
                # e.g. "missing backend for pool type 9 (rbd)": this host cannot serve the type.
                reason = _reason(exc)
                raise errors.WrongState(f"cannot define {plan.kind} pool: {reason}") from None
            raise _storage_error(exc) from None
        target = plan.target_path
        created_dir = plan.kind in FILE_KINDS and bool(target) and not os.path.exists(target)
        try:
            self._start(pool, plan)
            pool.setAutostart(1)
        except BaseException:
            with contextlib.suppress(libvirt.libvirtError):
                if pool.isActive():
                    pool.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                pool.undefine()
            self._drop_secret(conn, plan.secret if created_secret else None)
            if created_dir and self._under_root(plan.target_path):
                with contextlib.suppress(OSError):
                    os.rmdir(plan.target_path)
            raise
        return pool

    def _start(self, pool: libvirt.virStoragePool, plan: PoolPlan) -> None:
        try:
            if plan.kind in FILE_KINDS and plan.target_path and not os.path.isdir(plan.target_path):
                if self._under_root(plan.target_path):
                    os.makedirs(plan.target_path, mode=0o755, exist_ok=True)
                else:
                    pool.build(0)
            pool.create(0)
        except libvirt.libvirtError as exc:
            reason = _reason(exc)
            what = f"cannot start {plan.kind} pool {pool.name()}: {reason}"
            if exc.get_error_code() in (libvirt.VIR_ERR_INTERNAL_ERROR, libvirt.VIR_ERR_SYSTEM_ERROR):
                raise (errors.Unavailable if plan.kind in REMOTE_KINDS else errors.WrongState)(what) from None
            raise _storage_error(exc) from None
        except OSError as exc:
            raise errors.WrongState(f"cannot create {plan.target_path}: {exc.strerror}") from None

    def _read_keyring(self, req: PoolRequest) -> bytes | None:
        if req.ceph_secret_uuid:
            return None
        user = req.ceph_user or "admin"
        path = req.ceph_keyring or f"{CEPH_DIR}/ceph.client.{user}.keyring"
        if req.ceph_keyring:
            paths.confine("keyring_path", path, [*self.allowed_roots(), CEPH_DIR])
        try:
            data = paths.read_bounded("keyring", path, paths.KEYRING_MAX_BYTES)
        except FileNotFoundError:
            if req.ceph_keyring:
                raise errors.Invalid(f"keyring not found: {path}") from None
            return None  # no keyring anywhere: a cluster without cephx
        except OSError as exc:
            raise errors.Invalid(f"cannot read keyring {path}: {exc.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.Invalid(f"keyring {path} is not text") from None
        return keyring_key(text, user)

    def _ensure_secret(self, conn: libvirt.virConnect, plan: SecretPlan | None) -> bool:
        """Define or update the pool's libvirt secret; True when it did not exist before."""
        if plan is None:
            return False
        with _libvirt_errors():
            try:
                conn.secretLookupByUUIDString(plan.uuid)
                existed = True
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_SECRET:
                    raise
                existed = False
            xml = sxml.secret_xml(plan.uuid, plan.usage, plan.usage_name, f"quantix {plan.usage_name}")
            secret = conn.secretDefineXML(xml, 0)
            secret.setValue(plan.value, 0)
        return not existed

    @staticmethod
    def _drop_secret(conn: libvirt.virConnect, plan: SecretPlan | None) -> None:
        if plan is None:
            return
        with contextlib.suppress(libvirt.libvirtError):
            conn.secretLookupByUUIDString(plan.uuid).undefine()

    def destroy_pool(self, pool_id: str) -> None:
        """Stop and undefine a pool (unmounting NFS); data stays. An unknown pool is fine."""
        check_pool_id(pool_id)
        with self._locked(pool_id):
            conn = self._conn()
            try:
                pool = conn.storagePoolLookupByName(pool_id)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                    return
                raise _storage_error(exc) from None
            with _libvirt_errors():
                current = sxml.parse_pool(_defined_xml(pool))
                if pool.isActive():
                    pool.destroy()
                pool.undefine()
            for usage in ("ceph", "iscsi"):
                with contextlib.suppress(libvirt.libvirtError):
                    conn.secretLookupByUUIDString(secret_uuid(pool_id, usage)).undefine()
            if current.kind in FILE_KINDS and self._under_root(current.target_path):
                with contextlib.suppress(OSError):
                    os.rmdir(current.target_path)  # only when empty

    def pool_users(self, pool_id: str) -> list[str]:
        """Names of the running domains with a disk in the pool (a volume of it, or a file under
        its directory); none for a pool that is unknown or not active."""
        conn = self._conn()
        try:
            pool = conn.storagePoolLookupByName(pool_id)
            if not pool.isActive():
                return []
            target = sxml.parse_pool(pool.XMLDesc(0))
            target_dir = target.target_path if target.kind in FILE_KINDS else ""
            paths = [vol.path() for vol in pool.listAllVolumes(0)]
            domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                return []
            raise
        in_use = []
        for dom in domains:
            try:
                disks = [d.path for d in domaininfo.parse_domain(dom.XMLDesc(0)).disks if d.path]
                in_use.append((dom.name(), disks))
            except libvirt.libvirtError:
                continue  # stopped while we looked
        return pool_users(paths, target_dir, in_use)

    def pool_info(self, pool_id: str) -> PoolInfo:
        return self._info(self._pool(pool_id), refresh=True)

    def list_pools(self) -> list[PoolInfo]:
        out = []
        with _libvirt_errors():
            pools = self._conn().listAllStoragePools(0)
        for pool in pools:
            try:
                out.append(self._info(pool, refresh=False))
            except (errors.NotFound, errors.WrongState):
                continue  # undefined or stopped while we were listing
        out.sort(key=lambda p: p.pool_id)
        return out

    def _pool(self, pool_id: str, *, active: bool = False) -> libvirt.virStoragePool:
        if pool_id in DEFAULT_POOL_IDS:
            return self.vm_pool()
        try:
            pool = self._conn().storagePoolLookupByName(pool_id)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_POOL:
                raise errors.NotFound(f"storage pool not found: {pool_id}") from None
            raise _storage_error(exc) from None
        if active and not pool.isActive():
            raise errors.WrongState(f"storage pool {pool_id} is not active")
        return pool

    def _info(self, pool: libvirt.virStoragePool, refresh: bool) -> PoolInfo:
        with _libvirt_errors():
            active = bool(pool.isActive())
            if refresh and active:
                with contextlib.suppress(libvirt.libvirtError):
                    pool.refresh(0)  # fails only while a volume job runs; the old numbers do
            d = sxml.parse_pool(pool.XMLDesc(0))
            _, capacity, _, available = pool.info()
            count = pool.numOfVolumes() if active else 0
        path = d.target_path if d.kind in FILE_KINDS else ""
        device = d.target_path if d.kind not in FILE_KINDS and d.kind != "rbd" else ""
        return PoolInfo(
            pool_id=d.name,
            type=KIND_TYPES.get(d.kind, ""),
            kind=d.kind,
            mount_path=path,
            device_path=device,
            rbd_pool=d.source_name if d.kind == "rbd" else "",
            total_bytes=capacity,
            available_bytes=available,
            used_bytes=max(capacity - available, 0),
            volume_count=count,
            active=active,
        )

    def vm_pool(self) -> libvirt.virStoragePool:
        """The VM-disk pool over ``storage.vm_images``: an existing pool on that directory, else ours."""
        path = os.path.abspath(self.config.vm_images)
        with self._locked(self.vm_pool_name):
            conn = self._conn()
            pool = self._find_dir_pool(conn, path)
            if pool is None:
                plan = PoolPlan("dir", sxml.dir_pool_xml(self.vm_pool_name, path), path)
                with _libvirt_errors():
                    pool = self._define(conn, plan)
            elif not pool.isActive():
                self._start(pool, PoolPlan("dir", "", path))
            self._vm_pool_seen = pool.name()
            return pool

    def _find_dir_pool(self, conn: libvirt.virConnect, path: str) -> libvirt.virStoragePool | None:
        """The dir pool over ``path``: the one found last time if it still is, else a scan."""
        if self._vm_pool_seen:
            try:
                pool = conn.storagePoolLookupByName(self._vm_pool_seen)
                if sxml.os_norm(sxml.parse_pool(_defined_xml(pool)).target_path) == sxml.os_norm(path):
                    return pool
            except libvirt.libvirtError:
                pass
        with _libvirt_errors():
            pools = conn.listAllStoragePools(0)
        for pool in pools:
            try:
                d = sxml.parse_pool(_defined_xml(pool))
            except libvirt.libvirtError:
                continue  # undefined while we looked
            if d.kind == "dir" and sxml.os_norm(d.target_path) == sxml.os_norm(path):
                return pool
        return None

    # -- volumes ------------------------------------------------------------------------------

    def _volumes(self, pool: libvirt.virStoragePool) -> list[libvirt.virStorageVol]:
        with contextlib.suppress(libvirt.libvirtError):
            pool.refresh(0)
        with _libvirt_errors():
            return pool.listAllVolumes(0)

    def _lookup(self, pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
        try:
            return pool.storageVolLookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                return None
            raise _storage_error(exc) from None

    def find_volume(self, pool: libvirt.virStoragePool, volume_id: str, *, fuzzy: bool = False):
        """A volume by name, by name plus a disk extension, or (``fuzzy``) by a unique name that
        starts or ends with the id, as for a VM disk id naming ``<vm>-<disk>.qcow2``."""
        if not volume_id or "/" in volume_id or "\x00" in volume_id:
            raise errors.Invalid(f"invalid volume_id: {volume_id!r}")
        for name in (volume_id, *(volume_id + ext for ext in VOLUME_EXTENSIONS)):
            vol = self._lookup(pool, name)
            if vol is not None:
                return vol
        if fuzzy:
            matches = []
            for vol in self._volumes(pool):
                stem = volume_stem(vol.name())
                if SNAPSHOT_SEP not in stem and (stem.startswith(volume_id) or stem.endswith(volume_id)):
                    matches.append(vol)
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                names = ", ".join(sorted(v.name() for v in matches))
                raise errors.Invalid(f"volume id {volume_id} is ambiguous in pool {pool.name()}: {names}")
        raise errors.NotFound(f"volume not found: {volume_id} in storage pool {pool.name()}")

    def _volume_info(self, pool_id: str, vol: libvirt.virStorageVol, attached: dict[str, str]) -> VolumeInfo:
        with _libvirt_errors():
            d = sxml.parse_volume(vol.XMLDesc(0))
        return VolumeInfo(
            volume_id=volume_stem(d.name),
            pool_id=pool_id,
            name=d.name,
            size_bytes=d.capacity,
            format=d.format or "raw",
            path=d.path,
            attached_to=attached.get(d.path, ""),
        )

    def _attachments(self) -> dict[str, str]:
        """Disk path → UUID of the domain using it, over all defined domains."""
        out: dict[str, str] = {}
        with _libvirt_errors():
            domains = self._conn().listAllDomains(0)
        for dom in domains:
            try:
                for path, _ in _domain_disks(dom.XMLDesc(0)):
                    out.setdefault(path, dom.UUIDString())
            except libvirt.libvirtError:
                continue
        return out

    def list_volumes(self, pool_id: str) -> list[VolumeInfo]:
        pool = self._pool(pool_id, active=True)
        attached = self._attachments()
        vols = [v for v in self._volumes(pool) if SNAPSHOT_SEP not in v.name()]
        out = []
        for vol in vols:
            try:
                out.append(self._volume_info(pool_id, vol, attached))
            except errors.NotFound:
                continue
        out.sort(key=lambda v: v.volume_id)
        return out

    def _file_format(self, pool: libvirt.virStoragePool) -> str:
        kind = sxml.parse_pool(pool.XMLDesc(0)).kind
        return "qcow2" if kind in FILE_KINDS else "raw"

    def create_volume(self, pool_id: str, volume_id: str, size_bytes: int, source: str, source_id: str):
        """``source`` is ``empty``, ``clone`` (a volume of the pool), ``image`` (an image id or a
        path under the image directories) or ``snapshot`` (a snapshot id of this pool)."""
        check_name("volume_id", volume_id)
        pool = self._pool(pool_id, active=True)
        fmt = self._file_format(pool)
        kind = sxml.parse_pool(pool.XMLDesc(0)).kind
        name = volume_name(kind, volume_id, fmt)
        if self._lookup(pool, name) is not None:
            raise errors.AlreadyExists(f"volume {volume_id} already exists in storage pool {pool.name()}")
        if source == "empty":
            if size_bytes <= 0:
                raise errors.Invalid("size_bytes must be positive for an empty volume")
            vol = self._create(pool, sxml.volume_xml(name, size_bytes, fmt), _upfront(fmt, size_bytes))
        elif source in ("clone", "snapshot"):
            if not source_id:
                raise errors.Invalid(f"source_id is required for a {source} volume")
            src = self.find_volume(pool, source_id) if source == "clone" else self._snapshot(pool, source_id)
            vol = self._copy(pool, src, name, fmt, size_bytes)
        elif source == "image":
            if kind not in FILE_KINDS:
                raise errors.Unsupported(f"volumes from images need a file-based pool, not {kind}")
            image = self._image_path(source_id)
            vol = self._create_file(pool, name, size_bytes, fmt, image)
        else:
            raise errors.Invalid(f"unsupported volume source: {source}")
        return self._volume_info(pool.name(), vol, {})

    def _create_file(self, pool, name: str, size_bytes: int, fmt: str, backing: str | None):
        backing_fmt = None
        if backing:
            try:
                paths.check_kind("backing file", backing)
            except FileNotFoundError:
                raise errors.NotFound(f"backing file not found: {backing}") from None
            backing_fmt = files.sniff_format(backing)
            backing_fmt = "raw" if backing_fmt == "iso" else backing_fmt
            try:
                size_bytes = max(size_bytes, files.virtual_size(backing))
            except OSError as exc:
                raise errors.NotFound(f"backing file not found: {backing} ({exc.strerror})") from None
            fmt = "qcow2"  # only qcow2 can sit on a backing file
        if size_bytes <= 0:
            raise errors.Invalid("size_bytes must be positive")
        xml = sxml.volume_xml(name, size_bytes, fmt, backing_path=backing, backing_format=backing_fmt)
        return self._create(pool, xml, _upfront(fmt, size_bytes))

    def _copy(self, pool, src: libvirt.virStorageVol, name: str, fmt: str, size_bytes: int = 0):
        with _libvirt_errors():
            d = sxml.parse_volume(src.XMLDesc(0))
            allocation = src.info()[2]
        xml = sxml.volume_xml(name, max(size_bytes, d.capacity), d.format or fmt)
        return self._create(pool, xml, allocation, src)

    def _snapshot(self, pool, snapshot_id: str) -> libvirt.virStorageVol:
        check_name("snapshot_id", snapshot_id)
        for vol in self._volumes(pool):
            if volume_stem(vol.name()).endswith(SNAPSHOT_SEP + snapshot_id):
                return vol
        raise errors.NotFound(f"snapshot not found: {snapshot_id} in storage pool {pool.name()}")

    def _image_path(self, source_id: str) -> str:
        """An image id from ListImages, or a path inside one of the image directories."""
        if not source_id:
            raise errors.Invalid("source_id is required for an image volume")
        roots = self.image_roots()
        if source_id.startswith("/"):
            real = os.path.realpath(source_id)
            if not any(paths.within(real, os.path.realpath(r)) for r in roots) or not os.path.isfile(real):
                raise errors.NotFound(f"image not found: {source_id}")
            return real
        for image in files.scan_images(roots):
            if image.image_id == source_id or image.name == source_id:
                return os.path.realpath(image.path)
        raise errors.NotFound(f"image not found: {source_id}")

    def delete_volume(self, pool_id: str, volume_id: str) -> None:
        """Delete a volume and its snapshots; an unknown volume is fine (already gone)."""
        pool = self._pool(pool_id, active=True)
        try:
            vol = self.find_volume(pool, volume_id)
        except errors.NotFound:
            return
        stem = volume_stem(vol.name())
        with _libvirt_errors():
            for other in self._volumes(pool):
                if volume_stem(other.name()).startswith(stem + SNAPSHOT_SEP):
                    other.delete(0)
            vol.delete(0)

    def resize_volume(self, pool_id: str, volume_id: str, new_size: int) -> None:
        """Grow only. A disk in use by a running VM grows through the VM (qemu holds the image)."""
        if new_size > MAX_VOLUME_BYTES:
            raise errors.Invalid(f"new size {new_size} bytes is larger than libvirt can address")
        pool = self._pool(pool_id, active=True)
        vol = self.find_volume(pool, volume_id, fuzzy=True)
        with _libvirt_errors():
            d = sxml.parse_volume(vol.XMLDesc(0))
        if new_size < d.capacity:
            raise errors.Invalid(f"cannot shrink volume {d.name} from {d.capacity} to {new_size} bytes")
        if new_size == d.capacity:
            return
        with _libvirt_errors():
            for dom in self._conn().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                for path, dev in _domain_disks(dom.XMLDesc(0)):
                    if path == d.path and dev:
                        dom.blockResize(dev, new_size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
                        return
            vol.resize(new_size, 0)

    def clone_volume(self, pool_id: str, source_id: str, dest_id: str) -> VolumeInfo:
        """A full, independent copy (libvirt converts and copies the data)."""
        check_name("dest_volume_id", dest_id)
        pool = self._pool(pool_id, active=True)
        src = self.find_volume(pool, source_id)
        fmt = sxml.parse_volume(src.XMLDesc(0)).format or self._file_format(pool)
        kind = sxml.parse_pool(pool.XMLDesc(0)).kind
        name = volume_name(kind, dest_id, fmt)
        if self._lookup(pool, name) is not None:
            raise errors.AlreadyExists(f"volume {dest_id} already exists in storage pool {pool.name()}")
        return self._volume_info(pool.name(), self._copy(pool, src, name, fmt), {})

    def snapshot_volume(self, pool_id: str, volume_id: str, snapshot_id: str) -> VolumeInfo:
        """A point-in-time copy ``<volume>@<snapshot>``: consistent only while nothing writes."""
        check_name("snapshot_id", snapshot_id)
        pool = self._pool(pool_id, active=True)
        src = self.find_volume(pool, volume_id)
        name = snapshot_name(src.name(), snapshot_id)
        if self._lookup(pool, name) is not None:
            raise errors.AlreadyExists(f"snapshot {snapshot_id} of volume {volume_id} already exists")
        fmt = sxml.parse_volume(src.XMLDesc(0)).format or "raw"
        return self._volume_info(pool.name(), self._copy(pool, src, name, fmt), {})

    def attach_info(self, pool_id: str, volume_id: str, *, exact: bool = False) -> AttachInfo:
        """Where a volume is and how a domain attaches it. In the VM-disk pool an id may match a
        name loosely (``<vm>-<disk>.qcow2`` by its disk id) unless ``exact``: a disk named in a
        VM spec must be exactly that volume, never another VM's."""
        pool = self._pool(pool_id, active=True)
        vol = self.find_volume(pool, volume_id, fuzzy=pool_id in DEFAULT_POOL_IDS and not exact)
        with _libvirt_errors():
            pdef = sxml.parse_pool(pool.XMLDesc(0))
            vdef = sxml.parse_volume(vol.XMLDesc(0))
        return AttachInfo(volume_id, vdef.path, sxml.disk_xml(pdef, vdef))

    # -- the API for VM lifecycle code --------------------------------------------------------

    def create_disk(
        self,
        pool_id: str | None,
        name: str,
        size_bytes: int,
        fmt: str = "qcow2",
        backing_file: str | None = None,
    ) -> str:
        """Create a disk volume named ``name`` (kept verbatim) and return its path.

        ``pool_id`` None, "" or "default" is the VM-disk pool. With ``backing_file`` the disk is
        a qcow2 overlay at least as large as the backing image.
        """
        check_name("disk name", name)
        pool = self._pool(pool_id or "", active=True)
        if self._lookup(pool, name) is not None:
            raise errors.AlreadyExists(f"volume {name} already exists in storage pool {pool.name()}")
        if backing_file:
            vol = self._create_file(pool, name, size_bytes, fmt, backing_file)
        else:
            if size_bytes <= 0:
                raise errors.Invalid("size_bytes must be positive")
            vol = self._create(pool, sxml.volume_xml(name, size_bytes, fmt), _upfront(fmt, size_bytes))
        with _libvirt_errors():
            return vol.path()

    def delete_path(self, path: str) -> bool:
        """Delete the volume at ``path`` through libvirt; False when no pool holds that path."""
        conn = self._conn()
        for attempt in range(2):
            try:
                vol = conn.storageVolLookupByPath(path)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
                    raise _storage_error(exc) from None
                if attempt == 0 and self._refresh_pool_holding(conn, path):
                    continue
                return False
            with _libvirt_errors():
                vol.delete(0)
            return True
        return False

    @staticmethod
    def _refresh_pool_holding(conn: libvirt.virConnect, path: str) -> bool:
        """Refresh the active file pool whose directory holds ``path`` (created outside libvirt)."""
        parent = os.path.dirname(os.path.abspath(path))
        with _libvirt_errors():
            pools = conn.listAllStoragePools(libvirt.VIR_CONNECT_LIST_STORAGE_POOLS_ACTIVE)
        for pool in pools:
            try:
                d = sxml.parse_pool(pool.XMLDesc(0))
                if d.kind in FILE_KINDS and sxml.os_norm(d.target_path) == parent:
                    pool.refresh(0)
                    return True
            except libvirt.libvirtError:
                continue
        return False

    # -- files --------------------------------------------------------------------------------

    def image_roots(self) -> list[str]:
        c = self.config
        return [c.cloud_images, c.iso_images, c.vm_images]

    def list_images(self) -> list[files.ImageFile]:
        return files.scan_images(self.image_roots())

    def list_pool_files(self, pool_id: str, path: str) -> list[files.FileEntry]:
        pool = self._pool(pool_id)
        with _libvirt_errors():
            d = sxml.parse_pool(pool.XMLDesc(0))
            active = pool.isActive()
        if d.kind not in FILE_KINDS or not d.target_path:
            raise errors.WrongState(f"storage pool {pool_id} has no mount path ({d.kind})")
        if paths.system_dir(d.target_path) is not None:
            raise errors.WrongState(
                f"storage pool {pool_id} is in a system directory; its files are not listed"
            )
        if not active:
            raise errors.WrongState(f"storage pool {pool_id} is not active (no mount path)")
        return files.list_dir(d.target_path, path)


def pool_users(
    volume_paths: Iterable[str], target_dir: str, domains: Iterable[tuple[str, Iterable[str]]]
) -> list[str]:
    """Names of the domains with a disk among ``volume_paths`` or under ``target_dir``."""
    paths = set(volume_paths)
    prefix = sxml.os_norm(target_dir) + os.sep if target_dir else None
    users = []
    for name, disks in domains:
        for path in disks:
            if path in paths or (prefix and sxml.os_norm(path).startswith(prefix)):
                users.append(name)
                break
    return users
