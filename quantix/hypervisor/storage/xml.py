"""libvirt storage XML: pool, secret and volume definitions and disk snippets (pure, xml.etree).

Nothing here touches libvirt or the filesystem, so every definition the daemon would send to
libvirt can be checked in a unit test without a server behind it.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import attrs

FS_NS = "http://libvirt.org/schemas/storagepool/fs/1.0"
CEPH_DEFAULT_PORT = 6789
ISCSI_DEFAULT_PORT = 3260


def _text(parent: ET.Element, tag: str, text: str) -> ET.Element:
    el = ET.SubElement(parent, tag)
    el.text = text
    return el


def _dump(root: ET.Element) -> str:
    return ET.tostring(root, encoding="unicode")


def split_host_port(value: str, default_port: int | None) -> tuple[str, int | None]:
    """``host``, ``host:port`` or ``[v6]:port`` → (host, port); ValueError on a bad port."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    if not host:
        raise ValueError(f"missing host in {value!r}")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port)


def _pool(kind: str, name: str, uuid: str | None) -> ET.Element:
    root = ET.Element("pool", type=kind)
    _text(root, "name", name)
    if uuid:
        _text(root, "uuid", uuid)
    return root


def _target(root: ET.Element, path: str) -> None:
    target = ET.SubElement(root, "target")
    _text(target, "path", path)


def with_uuid(xml: str, uuid: str) -> str:
    """``xml`` with its ``<uuid>`` set: a redefinition must keep the pool's identity."""
    root = ET.fromstring(xml)
    el = root.find("uuid")
    if el is None:
        el = ET.Element("uuid")
        root.insert(1, el)
    el.text = uuid
    return _dump(root)


def dir_pool_xml(name: str, path: str, uuid: str | None = None) -> str:
    root = _pool("dir", name, uuid)
    _target(root, path)
    return _dump(root)


def netfs_pool_xml(
    name: str,
    server: str,
    export: str,
    mount_point: str,
    *,
    version: str = "",
    options: str = "",
    uuid: str | None = None,
) -> str:
    """An NFS pool; the version and extra options go through libvirt's mount_opts namespace, which
    takes any text (``<protocol ver>`` only accepts an integer, so "4.1" would not fit)."""
    ET.register_namespace("fs", FS_NS)
    root = _pool("netfs", name, uuid)
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "host", name=server)
    ET.SubElement(source, "dir", path=export)
    ET.SubElement(source, "format", type="nfs")
    _target(root, mount_point)
    opts = ([f"vers={version}"] if version else []) + [o.strip() for o in options.split(",") if o.strip()]
    if opts:
        mount = ET.SubElement(root, f"{{{FS_NS}}}mount_opts")
        for opt in opts:
            ET.SubElement(mount, f"{{{FS_NS}}}option", name=opt)
    return _dump(root)


def rbd_pool_xml(
    name: str,
    pool_name: str,
    monitors: list[tuple[str, int | None]],
    *,
    user: str = "",
    secret_uuid: str | None = None,
    uuid: str | None = None,
) -> str:
    root = _pool("rbd", name, uuid)
    source = ET.SubElement(root, "source")
    _text(source, "name", pool_name)
    for host, port in monitors:
        attrs_ = {"name": host}
        if port:
            attrs_["port"] = str(port)
        ET.SubElement(source, "host", attrs_)
    if secret_uuid:
        auth = ET.SubElement(source, "auth", type="ceph", username=user or "admin")
        ET.SubElement(auth, "secret", uuid=secret_uuid)
    return _dump(root)


def iscsi_pool_xml(
    name: str,
    host: str,
    port: int | None,
    target_iqn: str,
    *,
    chap_user: str = "",
    secret_uuid: str | None = None,
    uuid: str | None = None,
) -> str:
    root = _pool("iscsi", name, uuid)
    source = ET.SubElement(root, "source")
    attrs_ = {"name": host}
    if port:
        attrs_["port"] = str(port)
    ET.SubElement(source, "host", attrs_)
    ET.SubElement(source, "device", path=target_iqn)
    if chap_user and secret_uuid:
        auth = ET.SubElement(source, "auth", type="chap", username=chap_user)
        ET.SubElement(auth, "secret", uuid=secret_uuid)
    _target(root, "/dev/disk/by-path")
    return _dump(root)


def secret_xml(uuid: str, usage: str, usage_name: str, description: str) -> str:
    """A persistent private secret; ``usage`` is ``ceph`` (name) or ``iscsi`` (target)."""
    root = ET.Element("secret", ephemeral="no", private="yes")
    _text(root, "uuid", uuid)
    _text(root, "description", description)
    use = ET.SubElement(root, "usage", type=usage)
    _text(use, "target" if usage == "iscsi" else "name", usage_name)
    return _dump(root)


def volume_xml(
    name: str,
    capacity: int,
    fmt: str | None,
    *,
    backing_path: str | None = None,
    backing_format: str | None = None,
) -> str:
    root = ET.Element("volume")
    _text(root, "name", name)
    _text(root, "capacity", str(capacity)).set("unit", "bytes")
    if fmt:
        target = ET.SubElement(root, "target")
        ET.SubElement(target, "format", type=fmt)
    if backing_path:
        backing = ET.SubElement(root, "backingStore")
        _text(backing, "path", backing_path)
        if backing_format:
            ET.SubElement(backing, "format", type=backing_format)
    return _dump(root)


@attrs.frozen
class PoolDef:
    """What the daemon needs back from a pool's XML."""

    kind: str
    name: str
    target_path: str = ""
    source_hosts: tuple[tuple[str, str], ...] = ()
    source_dir: str = ""
    source_device: str = ""
    source_name: str = ""
    auth_user: str = ""
    auth_secret: str = ""

    def same_backend(self, other: PoolDef) -> bool:
        """Does ``other`` describe the same storage (the parts a redefinition would change)?"""
        return (
            self.kind == other.kind
            and os_norm(self.target_path) == os_norm(other.target_path)
            and self.source_hosts == other.source_hosts
            and self.source_dir.rstrip("/") == other.source_dir.rstrip("/")
            and self.source_device == other.source_device
            and self.source_name == other.source_name
        )


def os_norm(path: str) -> str:
    return path.rstrip("/") or path


def parse_pool(xml: str) -> PoolDef:
    root = ET.fromstring(xml)
    source = root.find("source")
    hosts: tuple[tuple[str, str], ...] = ()
    fields: dict[str, str] = {}
    if source is not None:
        hosts = tuple((h.get("name", ""), h.get("port", "")) for h in source.findall("host"))
        source_dir = source.find("dir")
        fields["source_dir"] = source_dir.get("path", "") if source_dir is not None else ""
        device = source.find("device")
        fields["source_device"] = device.get("path", "") if device is not None else ""
        fields["source_name"] = (source.findtext("name") or "").strip()
        auth = source.find("auth")
        if auth is not None:
            fields["auth_user"] = auth.get("username", "")
            secret = auth.find("secret")
            if secret is not None:
                fields["auth_secret"] = secret.get("uuid", "") or secret.get("usage", "")
    return PoolDef(
        kind=root.get("type", ""),
        name=(root.findtext("name") or "").strip(),
        target_path=(root.findtext("target/path") or "").strip(),
        source_hosts=hosts,
        **fields,
    )


@attrs.frozen
class VolumeDef:
    name: str
    path: str
    kind: str
    capacity: int
    format: str
    backing_path: str = ""


def parse_volume(xml: str) -> VolumeDef:
    root = ET.fromstring(xml)
    fmt = root.find("target/format")
    return VolumeDef(
        name=(root.findtext("name") or "").strip(),
        path=(root.findtext("target/path") or root.findtext("key") or "").strip(),
        kind=root.get("type", "file"),
        capacity=int(root.findtext("capacity") or 0),
        format=fmt.get("type", "") if fmt is not None else "",
        backing_path=(root.findtext("backingStore/path") or "").strip(),
    )


def disk_xml(pool: PoolDef, volume: VolumeDef, target_dev: str = "vdX") -> str:
    """A ``<disk>`` for attaching ``volume`` to a domain (the caller picks the target device)."""
    fmt = volume.format if volume.format in ("qcow2", "raw", "vmdk", "qed", "vdi") else "raw"
    if pool.kind == "rbd":
        disk = ET.Element("disk", type="network", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw", cache="writeback", discard="unmap")
        source = ET.SubElement(disk, "source", protocol="rbd", name=f"{pool.source_name}/{volume.name}")
        for host, port in pool.source_hosts:
            attrs_ = {"name": host}
            if port:
                attrs_["port"] = port
            ET.SubElement(source, "host", attrs_)
        if pool.auth_secret:
            auth = ET.SubElement(disk, "auth", username=pool.auth_user or "admin")
            ET.SubElement(auth, "secret", type="ceph", uuid=pool.auth_secret)
    elif volume.kind == "block" or pool.kind in ("iscsi", "logical", "disk", "scsi", "mpath"):
        disk = ET.Element("disk", type="block", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none", io="native")
        ET.SubElement(disk, "source", dev=volume.path)
    else:
        disk = ET.Element("disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type=fmt, cache="writeback")
        ET.SubElement(disk, "source", file=volume.path)
    ET.SubElement(disk, "target", dev=target_dev, bus="virtio")
    return _dump(disk)
