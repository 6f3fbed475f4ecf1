"""Read back what a live (or defined) domain XML says: devices, console, our metadata.

The live XML is the truth for GetVMStatus, GetConsole and the hot-unplug paths: ports chosen by
autoport, MACs libvirt generated and devices hot-plugged since creation only appear there. Our
metadata block maps control-plane device ids onto libvirt's target names and MACs.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import attrs

from quantix.hypervisor.domainxml import AGENT_CHANNEL, NS, DeviceRef, VMMeta, element_xml


@attrs.frozen
class DiskInfo:
    """A ``<disk>``; ``id`` is the control-plane id from our metadata, else the target dev."""

    id: str
    device: str  # disk | cdrom | floppy | lun
    dev: str
    bus: str
    path: str | None
    format: str | None
    readonly: bool
    created: bool
    element: ET.Element = attrs.field(repr=False, eq=False)

    @property
    def xml(self) -> str:
        """The element as libvirt reported it, for detach; serialised only when asked for, since
        status and listing never need it."""
        return element_xml(self.element)


@attrs.frozen
class NicInfo:
    id: str
    mac: str
    kind: str  # bridge | network | direct | ...
    source: str | None
    model: str | None
    target: str | None  # host tap device, only on a running domain
    element: ET.Element = attrs.field(repr=False, eq=False)

    @property
    def xml(self) -> str:
        """The element as libvirt reported it, for detach."""
        return element_xml(self.element)


@attrs.frozen
class GraphicsInfo:
    type: str  # vnc | spice
    port: int | None  # None while not running / not yet allocated
    listen: str | None
    password: str | None  # only present in XML fetched with VIR_DOMAIN_XML_SECURE


@attrs.frozen
class DomainInfo:
    uuid: str
    name: str
    domain_type: str
    vcpus: int
    memory_kib: int
    disks: tuple[DiskInfo, ...]
    nics: tuple[NicInfo, ...]
    graphics: tuple[GraphicsInfo, ...]
    agent_socket: str | None
    meta: VMMeta

    def disk(self, dev_id: str) -> DiskInfo | None:
        """By control-plane id, falling back to the target dev name (``vdb``)."""
        for d in self.disks:
            if d.id == dev_id:
                return d
        for d in self.disks:
            if d.dev == dev_id:
                return d
        return None

    def nic(self, nic_id: str) -> NicInfo | None:
        """By control-plane id, falling back to the MAC."""
        for n in self.nics:
            if n.id == nic_id:
                return n
        low = nic_id.lower()
        for n in self.nics:
            if n.mac == low:
                return n
        return None

    def console(self, prefer: str = "vnc") -> GraphicsInfo | None:
        for g in self.graphics:
            if g.type == prefer:
                return g
        return self.graphics[0] if self.graphics else None


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


_UNIT_BYTES = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1024**2, "mib": 1024**2}
_UNIT_BYTES |= {"mb": 10**6, "g": 1024**3, "gib": 1024**3, "gb": 10**9, "t": 1024**4, "tib": 1024**4}


def _memory_kib(el: ET.Element | None) -> int:
    if el is None or not el.text:
        return 0
    return _int(el.text) * _UNIT_BYTES.get(el.get("unit", "KiB").lower(), 1024) // 1024


def parse_meta(vm: ET.Element | None) -> VMMeta:
    """Our ``<quantix:vm>`` element (children may or may not carry the namespace)."""
    if vm is None:
        return VMMeta()

    def children(tag: str) -> list[ET.Element]:
        return vm.findall(tag) + vm.findall(f"{{{NS}}}{tag}")

    labels = {el.get("key", ""): el.get("value", "") for el in children("label") if el.get("key")}
    devices = tuple(
        DeviceRef(
            kind=el.get("kind", ""),
            id=el.get("id", ""),
            dev=el.get("dev", ""),
            mac=el.get("mac", ""),
            path=el.get("path", ""),
            created=el.get("created") == "yes",
        )
        for el in children("device")
    )
    ci = children("cloud-init")
    nv = children("nvram")
    return VMMeta(
        labels=labels,
        devices=devices,
        digest=vm.get("digest", ""),
        guest_os=vm.get("guest-os", ""),
        cloud_init_iso=ci[0].get("path", "") if ci else "",
        nvram=nv[0].get("path", "") if nv else "",
    )


def _graphics(el: ET.Element) -> GraphicsInfo:
    port = _int(el.get("port"), -1)
    listen = el.get("listen")
    for sub in el.findall("listen"):
        if sub.get("address"):
            listen = sub.get("address")
            break
    return GraphicsInfo(
        type=el.get("type", ""),
        port=port if port > 0 else None,
        listen=listen,
        password=el.get("passwd"),
    )


def parse_domain(xml: str | bytes) -> DomainInfo:
    """Parse ``virDomain.XMLDesc()`` output (or our own builder's output)."""
    root = ET.fromstring(xml)
    meta = parse_meta(root.find(f"metadata/{{{NS}}}vm"))
    by_dev = {r.dev: r for r in meta.devices if r.kind in ("disk", "cdrom") and r.dev}
    by_mac = {r.mac.lower(): r for r in meta.devices if r.kind == "nic" and r.mac}
    devices = root.find("devices")
    if devices is None:
        devices = ET.Element("devices")

    disks = []
    for el in devices.findall("disk"):
        target = el.find("target")
        dev = target.get("dev", "") if target is not None else ""
        source = el.find("source")
        path = None
        if source is not None:
            path = source.get("file") or source.get("dev") or source.get("name") or source.get("volume")
        driver = el.find("driver")
        ref = by_dev.get(dev)
        disks.append(
            DiskInfo(
                id=ref.id if ref else dev,
                device=el.get("device", "disk"),
                dev=dev,
                bus=target.get("bus", "") if target is not None else "",
                path=path,
                format=driver.get("type") if driver is not None else None,
                readonly=el.find("readonly") is not None,
                created=bool(ref and ref.created),
                element=el,
            )
        )

    nics = []
    for el in devices.findall("interface"):
        mac_el = el.find("mac")
        mac = (mac_el.get("address", "") if mac_el is not None else "").lower()
        source = el.find("source")
        kind = el.get("type", "")
        src = None
        if source is not None:
            src = source.get(kind) or source.get("bridge") or source.get("network") or source.get("dev")
        model = el.find("model")
        target = el.find("target")
        ref = by_mac.get(mac)
        nics.append(
            NicInfo(
                id=ref.id if ref else mac,
                mac=mac,
                kind=kind,
                source=src,
                model=model.get("type") if model is not None else None,
                target=target.get("dev") if target is not None else None,
                element=el,
            )
        )

    agent = None
    for ch in devices.findall("channel"):
        target = ch.find("target")
        source = ch.find("source")
        if target is not None and target.get("name") == AGENT_CHANNEL and source is not None:
            agent = source.get("path")

    vcpu = root.find("vcpu")
    return DomainInfo(
        uuid=root.findtext("uuid", ""),
        name=root.findtext("name", ""),
        domain_type=root.get("type", ""),
        vcpus=_int(vcpu.text if vcpu is not None else None),
        memory_kib=_memory_kib(root.find("memory")),
        disks=tuple(disks),
        nics=tuple(nics),
        graphics=tuple(_graphics(g) for g in devices.findall("graphics")),
        agent_socket=agent,
        meta=meta,
    )
