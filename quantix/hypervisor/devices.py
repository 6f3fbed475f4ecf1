"""Hot-plug: NICs, disks and CD-ROM media of a defined VM (blocking; gRPC threads).

Changes always go to the persistent definition and, while the VM runs, to the live one too, so
a device survives the next power cycle. Our metadata block keeps the control plane's device ids
(NIC id → MAC, disk id → target dev), which is how DetachNIC/DetachDisk find the real device.
"""

from __future__ import annotations

import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import TYPE_CHECKING

import libvirt
from twisted.logger import Logger

from quantix import errors
from quantix.hypervisor import domaininfo, domainxml
from quantix.hypervisor.provision import DiskStore, HostSettings, make_disk, remove_file, resolve_nic_source
from quantix.hypervisor.storage import paths as storage_paths

if TYPE_CHECKING:
    from quantix.proto import node_pb2

log = Logger(namespace="quantix.hypervisor.devices")

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
CONFIG = libvirt.VIR_DOMAIN_AFFECT_CONFIG
HOTPLUG_BUSES = ("virtio", "scsi")  # AHCI (SATA) and IDE take no disks while the VM runs
_DEV_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}


def _flags(dom: libvirt.virDomain) -> int:
    return CONFIG | (LIVE if dom.isActive() else 0)


def _views(dom: libvirt.virDomain) -> tuple[domaininfo.DomainInfo, domaininfo.DomainInfo | None, ET.Element]:
    """(persistent, live or None, persistent XML root)."""
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    live = domaininfo.parse_domain(dom.XMLDesc(0)) if dom.isActive() else None
    return domaininfo.parse_domain(xml), live, ET.fromstring(xml)


def _set_meta(dom: libvirt.virDomain, meta: domainxml.VMMeta) -> None:
    el = domainxml.metadata_element(meta, for_set_metadata=True)
    dom.setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        ET.tostring(el, encoding="unicode"),
        domainxml.NS_PREFIX,
        domainxml.NS,
        _flags(dom),
    )


def _detach(dom: libvirt.virDomain, live_xml: str | None, config_xml: str | None) -> None:
    """Live first: if the guest refuses, the persistent definition is left as it was."""
    if live_xml is not None:
        dom.detachDeviceFlags(live_xml, LIVE)
    if config_xml is not None:
        dom.detachDeviceFlags(config_xml, CONFIG)


# ---------------------------------------------------------------------------------------------
# NICs


def attach_nic(
    conn: libvirt.virConnect, dom: libvirt.virDomain, nic: node_pb2.NicSpec
) -> domainxml.DeviceRef:
    vm_id = dom.UUIDString()
    cfg, live, _ = _views(dom)
    nic_id = domainxml.check_text("NIC id", nic.id or f"nic-{uuid.uuid4().hex[:8]}")
    if cfg.meta.device("nic", nic_id) is not None or any(n.id == nic_id for n in cfg.nics):
        raise errors.AlreadyExists(f"NIC {nic_id} already exists on VM {vm_id}")
    mac = domainxml.validate_mac(nic.mac_address) if nic.mac_address else domainxml.derive_mac(vm_id, nic_id)
    if any(n.mac == mac for n in cfg.nics + (live.nics if live else ())):
        raise errors.AlreadyExists(f"MAC {mac} is already used by VM {vm_id}")
    source = resolve_nic_source(conn, nic)
    el = domainxml.nic_element(nic, mac=mac, source=source)
    dom.attachDeviceFlags(domainxml.element_xml(el), _flags(dom))
    ref = domainxml.DeviceRef("nic", nic_id, mac=mac)
    _set_meta(dom, cfg.meta.with_device(ref))
    return ref


def detach_nic(dom: libvirt.virDomain, nic_id: str) -> domaininfo.NicInfo:
    """Remove the NIC with that control-plane id (or MAC) from the live and persistent VM."""
    cfg, live, _ = _views(dom)
    in_cfg = cfg.nic(nic_id)
    in_live = live.nic(nic_id) if live is not None else None
    found = in_live or in_cfg
    if found is None:
        raise errors.NotFound(f"NIC not found: {nic_id} (VM {dom.UUIDString()})")
    _detach(dom, in_live.xml if in_live else None, in_cfg.xml if in_cfg else None)
    _set_meta(dom, cfg.meta.without_device("nic", found.id))
    return found


# ---------------------------------------------------------------------------------------------
# Disks


def _machine(root: ET.Element) -> str:
    el = root.find("os/type")
    return el.get("machine", "") if el is not None else ""


def attach_disk(
    dom: libvirt.virDomain, disk: node_pb2.DiskSpec, settings: HostSettings, store: DiskStore
) -> domainxml.DeviceRef:
    """Add a disk (created first when it has no path); removed again if libvirt refuses it."""
    vm_id = dom.UUIDString()
    cfg, live, root = _views(dom)
    disk_id = domainxml.check_text("disk id", disk.id or f"disk-{uuid.uuid4().hex[:8]}")
    if any(d.id == disk_id for d in cfg.disks):
        raise errors.AlreadyExists(f"disk {disk_id} already exists on VM {vm_id}")
    bus = domainxml.disk_bus(disk.bus, q35="q35" in _machine(root), readonly=disk.readonly)
    if live is not None and bus not in HOTPLUG_BUSES:
        log.info(
            "VM {vm} is running: disk {disk} goes on virtio, {bus} cannot be hot-plugged",
            vm=vm_id,
            disk=disk_id,
            bus=bus,
        )
        bus = "virtio"
    used = [d.dev for d in cfg.disks + (live.disks if live else ())]
    dev = domainxml.next_dev_name(_DEV_PREFIX[bus], used)
    source = make_disk(disk, disk_id, vm_id, settings, store)
    try:
        el = domainxml.disk_element(disk, dev=dev, bus=bus, source=source)
        dom.attachDeviceFlags(domainxml.element_xml(el), _flags(dom))
    except BaseException:
        if source.created:
            remove_file(store, source.path)
        raise
    ref = domainxml.DeviceRef("disk", disk_id, dev=dev, path=source.path, created=source.created)
    _set_meta(dom, cfg.meta.with_device(ref))
    return ref


def detach_disk(dom: libvirt.virDomain, disk_id: str) -> domaininfo.DiskInfo:
    """Remove a disk by control-plane id (or target dev). The image file is kept: detaching is
    not deleting, and the control plane may attach the volume elsewhere."""
    cfg, live, _ = _views(dom)
    in_cfg = cfg.disk(disk_id)
    in_live = live.disk(disk_id) if live is not None else None
    found = in_live or in_cfg
    if found is None:
        raise errors.NotFound(f"disk not found: {disk_id} (VM {dom.UUIDString()})")
    _detach(dom, in_live.xml if in_live else None, in_cfg.xml if in_cfg else None)
    _set_meta(dom, cfg.meta.without_device("cdrom" if found.device == "cdrom" else "disk", found.id))
    return found


# ---------------------------------------------------------------------------------------------
# CD-ROM media


def _cdrom(info: domaininfo.DomainInfo, device: str) -> domaininfo.DiskInfo | None:
    """By target dev or our id. The control plane guesses ``sd<letter>`` from its own device
    count, which need not match our naming: a guess that names no device at all falls back to
    the VM's only user CD-ROM."""
    cdroms = [d for d in info.disks if d.device == "cdrom"]
    for d in cdroms:
        if device in (d.dev, d.id):
            return d
    user = [d for d in cdroms if d.id != domainxml.CLOUD_INIT_ID]
    if len(user) == 1 and all(d.dev != device for d in info.disks):
        return user[0]
    return None


def media_xml(cdrom_xml: str, iso_path: str | None) -> str:
    """The CD-ROM element with its medium replaced (``None`` ejects) (pure)."""
    el = ET.fromstring(cdrom_xml)
    for tag in ("source", "alias", "backingStore"):
        for sub in el.findall(tag):
            el.remove(sub)
    if iso_path:
        driver = el.find("driver")
        at = list(el).index(driver) + 1 if driver is not None else 0
        el.insert(at, ET.Element("source", file=iso_path))
    return domainxml.element_xml(el)


def change_media(
    dom: libvirt.virDomain,
    device: str,
    iso_path: str,
    iso_dir: str | None = None,
    confine: Callable[[str, str], str] | None = None,
) -> str:
    """Insert ``iso_path`` into a CD-ROM (empty: eject); live while running, always persistent.
    ``confine`` (the storage box's) refuses a path outside the node's storage locations.
    Returns the target dev that changed."""
    active = dom.isActive()
    info = domaininfo.parse_domain(dom.XMLDesc(0))
    cdrom = _cdrom(info, device)
    if cdrom is None:
        have = ", ".join(d.dev for d in info.disks if d.device == "cdrom") or "none"
        raise errors.NotFound(f"CD-ROM not found: {device} (VM {dom.UUIDString()}; CD-ROMs: {have})")
    path = None
    if iso_path:
        if not os.path.isabs(iso_path) and ".." in iso_path.split("/"):
            raise errors.Invalid(f"iso_path must not contain '..': {iso_path[:200]!r}")
        path = iso_path if os.path.isabs(iso_path) or not iso_dir else os.path.join(iso_dir, iso_path)
        domainxml.validate_path("iso_path", path)
        if confine is not None:
            confine("iso_path", path)
        try:
            storage_paths.check_kind("iso_path", path, block_ok=True)
        except FileNotFoundError:
            raise errors.NotFound(f"ISO not found: {path}") from None
    flags = CONFIG
    if active:
        flags |= LIVE | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE
    dom.updateDeviceFlags(media_xml(cdrom.xml, path), flags)
    return cdrom.dev
