"""libvirt domain XML from a ``VMSpec``: a pure function of the spec plus what the host resolved.

Everything that needs I/O (creating disk images, resolving ISO paths, mapping control-plane
network ids to bridges, writing the cloud-init ISO) happens before this is called; the results
arrive in a :class:`DomainContext`. Validation is strict about what could break the XML or the
guest (non-UUID ids, control characters, relative paths) and lenient about enums: proto3 enums
are open and the control plane casts them numerically, so unknown numbers fall back to defaults.
"""

from __future__ import annotations

import hashlib
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence

import attrs

from quantix.errors import Invalid

NS = "https://quantix.dev/xmlns/node/1.0"
NS_PREFIX = "quantix"
AGENT_CHANNEL = "org.quantix.agent.0"
QEMU_GA_CHANNEL = "org.qemu.guest_agent.0"
CLOUD_INIT_ID = "cloud-init"

# Bounds: generous, but small enough that libvirt/QEMU never sees absurd numbers.
MAX_NAME_BYTES = 200  # QEMU derives file names (log, monitor socket) from the name
MAX_VCPUS = 1024
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
MAX_LABEL_KEY = 256
MAX_LABEL_VALUE = 4096
MAX_PATH_BYTES = 4096
MAX_TEXT = 1024
MAX_THROTTLE = 10**15  # QEMU's THROTTLE_VALUE_MAX
MAX_NIC_MBPS = 10**7

ET.register_namespace(NS_PREFIX, NS)

# Proto enum numbers → libvirt words. Numbers absent here (open enums) get the entry for 0.
_DISK_BUS = {0: "virtio", 1: "scsi", 2: "sata", 3: "ide"}
_DISK_FORMAT = {0: "qcow2", 1: "raw"}
_NIC_MODEL = {0: "virtio", 1: "e1000", 2: "rtl8139"}
_BOOT_DEVICE = {0: "disk", 1: "cdrom", 2: "network"}
_FIRMWARE_UEFI = 1
_DEV_PREFIX = {"virtio": "vd", "scsi": "sd", "sata": "sd", "ide": "hd"}
FORMATS = ("qcow2", "raw")
# virtio-serial, USB (for the tablet), balloon, RNG, video, a PCIe-to-PCI bridge for legacy NICs.
_FIXED_PCIE_DEVICES = 6

_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Anything outside XML 1.0's Char production: C0 but tab/LF/CR, lone surrogates, U+FFFE/FFFF.
# (Spelled as the excluded set: the complement of the allowed ranges compiles 5x slower.)
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# Control characters (Unicode Cc): never in names or paths; only tab/newline/CR in free text.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_MULTILINE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


# ---------------------------------------------------------------------------------------------
# Validation


def check_text(what: str, value: str, *, max_len: int = MAX_TEXT, allow_newlines: bool = False) -> str:
    """Reject strings XML 1.0 cannot carry (and control characters where they make no sense)."""
    if not isinstance(value, str):
        raise Invalid(f"{what} must be a string")
    if len(value) > max_len:
        raise Invalid(f"{what} is too long ({len(value)} > {max_len} characters)")
    bad = _XML_BAD.search(value) or (_CONTROL_MULTILINE if allow_newlines else _CONTROL).search(value)
    if bad is not None:
        raise Invalid(f"{what} contains a forbidden character U+{ord(bad.group()):04X}")
    return value


def validate_vm_id(vm_id: str) -> str:
    """The domain adopts the control plane's id as its UUID; return it in canonical form."""
    try:
        return str(uuid.UUID(vm_id))
    except (ValueError, TypeError, AttributeError):
        raise Invalid(f"vm_id is not a UUID: {vm_id!r}") from None


def validate_name(name: str) -> str:
    check_text("name", name, max_len=MAX_NAME_BYTES)
    if not name or name.strip() != name:
        raise Invalid("name must be non-empty without leading or trailing whitespace")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise Invalid(f"name is longer than {MAX_NAME_BYTES} bytes")
    if "/" in name:
        raise Invalid("name must not contain '/'")
    return name


def validate_path(what: str, path: str) -> str:
    check_text(what, path, max_len=MAX_PATH_BYTES)
    if not path.startswith("/"):
        raise Invalid(f"{what} must be an absolute path: {path!r}")
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise Invalid(f"{what} is too long")
    return path


def validate_labels(labels: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, value in labels.items():
        check_text("label key", key, max_len=MAX_LABEL_KEY)
        if not key:
            raise Invalid("label keys must be non-empty")
        check_text(f"label {key!r}", value, max_len=MAX_LABEL_VALUE, allow_newlines=True)
        out[key] = value
    return out


def validate_mac(mac: str) -> str:
    norm = mac.strip().lower().replace("-", ":")
    if not _MAC_RE.match(norm):
        raise Invalid(f"invalid MAC address: {mac!r}")
    if int(norm[:2], 16) & 1:
        raise Invalid(f"MAC address is multicast: {mac!r}")
    return norm


def vcpu_topology(spec) -> tuple[int, int, int]:
    """(sockets, cores, threads); proto3 zeros for sockets/threads mean one."""
    sockets = spec.cpu_sockets or 1
    threads = spec.cpu_threads_per_core or 1
    cores = spec.cpu_cores
    if cores <= 0:
        raise Invalid("cpu_cores must be at least 1")
    if sockets * cores * threads > MAX_VCPUS:
        raise Invalid(f"too many vCPUs: {sockets}x{cores}x{threads} > {MAX_VCPUS}")
    return sockets, cores, threads


def validate_memory(spec) -> int:
    if spec.memory_mib <= 0:
        raise Invalid("memory_mib must be positive")
    if spec.memory_mib > MAX_MEMORY_MIB:
        raise Invalid(f"memory_mib exceeds {MAX_MEMORY_MIB}")
    return spec.memory_mib


# ---------------------------------------------------------------------------------------------
# Names and ids shared with the lifecycle and agent boxes


def agent_socket_path(socket_dir: str, vm_id: str) -> str:
    """Where QEMU listens for the guest agent channel of one VM."""
    return f"{socket_dir.rstrip('/')}/{vm_id}.agent.sock"


def nvram_path(nvram_dir: str, vm_id: str) -> str:
    return f"{nvram_dir.rstrip('/')}/{vm_id}_VARS.fd"


def derive_mac(vm_id: str, nic_id: str) -> str:
    """A stable MAC in QEMU's 52:54:00 range, so repeating a CreateVM yields the same XML."""
    digest = hashlib.sha256(f"{vm_id}/{nic_id}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def disk_dev_name(prefix: str, index: int) -> str:
    """libvirt's naming: vda..vdz, vdaa.. (bijective base 26)."""
    letters = ""
    index += 1
    while index > 0:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return prefix + letters


def next_dev_name(prefix: str, used: Iterable[str]) -> str:
    """The first free target name for a hot-plugged disk."""
    taken = set(used)
    i = 0
    while disk_dev_name(prefix, i) in taken:
        i += 1
    return disk_dev_name(prefix, i)


def request_digest(name: str, spec, labels: Mapping[str, str]) -> str:
    """Fingerprint of a CreateVM request: same digest means a repeated request, not a conflict."""
    h = hashlib.sha256()
    h.update(name.encode("utf-8") + b"\0")
    h.update(spec.SerializeToString(deterministic=True) + b"\0")
    for key in sorted(labels):
        h.update(key.encode("utf-8") + b"\0" + labels[key].encode("utf-8") + b"\0")
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Guest OS profiles: only what changes the XML (timers, video, Hyper-V, clock offset)


@attrs.frozen
class GuestProfile:
    family: str
    hpet: bool = False
    kvmclock: bool = True
    hypervclock: bool = False
    video: str = "vga"
    vram_kib: int = 16384
    hyperv: bool = False
    clock_offset: str = "utc"


# Enlightenments for Windows guests (libvirt names; spinlocks is added with its retry count).
HYPERV_FEATURES = (
    "relaxed",
    "vapic",
    "vpindex",
    "runtime",
    "synic",
    "stimer",
    "reset",
    "frequencies",
    "tlbflush",
    "ipi",
)
PROFILES = {
    "generic_linux": GuestProfile("generic_linux"),
    "rhel": GuestProfile("rhel"),
    "fedora": GuestProfile("fedora"),
    "debian": GuestProfile("debian", hpet=True, video="virtio"),
    "suse": GuestProfile("suse", video="virtio"),
    "arch": GuestProfile("arch", hpet=True, video="virtio"),
    "windows_server": GuestProfile(
        "windows_server", hpet=True, kvmclock=False, hypervclock=True, video="qxl", vram_kib=65536,
        hyperv=True, clock_offset="localtime",
    ),
    "windows_desktop": GuestProfile(
        "windows_desktop", hpet=True, kvmclock=False, hypervclock=True, video="qxl", vram_kib=65536,
        hyperv=True, clock_offset="localtime",
    ),
    "windows_legacy": GuestProfile("windows_legacy", hpet=True, kvmclock=False, clock_offset="localtime"),
    "bsd": GuestProfile("bsd", hpet=True, kvmclock=False),
}  # fmt: skip

_ALIASES = {
    "centos": "rhel", "rocky": "rhel", "rockylinux": "rhel", "alma": "rhel", "almalinux": "rhel",
    "oracle": "rhel", "ol": "rhel", "redhat": "rhel",
    "ubuntu": "debian",
    "opensuse": "suse", "sles": "suse",
    "archlinux": "arch",
    "windows": "windows_desktop", "win10": "windows_desktop", "win11": "windows_desktop",
    "windows10": "windows_desktop", "windows11": "windows_desktop",
    "winxp": "windows_legacy", "win7": "windows_legacy", "windows7": "windows_legacy",
    "freebsd": "bsd", "openbsd": "bsd", "netbsd": "bsd",
}  # fmt: skip


def guest_profile(guest_os: str) -> GuestProfile:
    """Map the free-form ``guest_os`` string; anything unknown gets the generic Linux profile."""
    key = guest_os.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key.startswith(("windows_server", "win20")):
        key = "windows_server"
    return PROFILES.get(key, PROFILES["generic_linux"])


# ---------------------------------------------------------------------------------------------
# What the host resolved before building


@attrs.frozen
class DiskSource:
    """Where a spec disk actually lives. ``created``: this node made it, DeleteVM removes it."""

    path: str
    format: str = "qcow2"
    created: bool = False


@attrs.frozen
class NicSource:
    """``kind`` is 'bridge' or 'network'; ``name`` the bridge or libvirt network name.

    ``virtualport`` "openvswitch" plugs the tap into an Open vSwitch bridge (a bridge source only),
    with ``interfaceid`` (a UUID) as its OVN port when given; ``inbound`` is (average kB/s, burst
    kB) for traffic to the guest, overriding the NIC spec's ``bandwidth_mbps``.
    """

    kind: str
    name: str
    virtualport: str | None = None
    interfaceid: str | None = None
    inbound: tuple[int, int] | None = None


@attrs.frozen
class DomainContext:
    """Host facts the builder needs; the tuples align index by index with the spec's lists.

    ``None`` entries (or short tuples) mean "take the spec's own value".
    ``cpu_mode`` None means host-passthrough on KVM and a bare topology otherwise (TCG, test).
    ``uefi_loader`` None with UEFI asks libvirt to pick firmware (``<os firmware='efi'>``).
    """

    vm_id: str
    name: str
    agent_socket_dir: str
    console_listen: str = "0.0.0.0"
    labels: Mapping[str, str] = attrs.field(factory=dict)
    disks: Sequence[DiskSource | None] = ()
    cdrom_paths: Sequence[str | None] = ()
    nics: Sequence[NicSource | None] = ()
    #: NICs bound to a configured network port, by MAC: they take that source instead.
    bound_nics: Mapping[str, NicSource] = attrs.field(factory=dict)
    cloud_init_iso: str | None = None
    default_network: str = "default"
    domain_type: str = "kvm"
    emulator: str | None = None
    arch: str | None = "x86_64"
    machine: str | None = "q35"
    nvram_dir: str | None = None
    uefi_loader: str | None = None
    cpu_mode: str | None = None
    disk_cache: str = "none"
    hotplug_ports: int = 4

    @property
    def q35(self) -> bool:
        return "q35" in (self.machine or "")


# ---------------------------------------------------------------------------------------------
# Our metadata block


@attrs.frozen
class DeviceRef:
    """Maps a control-plane device id to what libvirt knows: a target dev (disks) or a MAC (NICs)."""

    kind: str  # disk | cdrom | nic
    id: str
    dev: str = ""
    mac: str = ""
    path: str = ""
    created: bool = False


@attrs.frozen
class VMMeta:
    labels: Mapping[str, str] = attrs.field(factory=dict)
    devices: tuple[DeviceRef, ...] = ()
    digest: str = ""
    guest_os: str = ""
    cloud_init_iso: str = ""
    nvram: str = ""

    def device(self, kind: str, dev_id: str) -> DeviceRef | None:
        for ref in self.devices:
            if ref.kind == kind and ref.id == dev_id:
                return ref
        return None

    def with_device(self, ref: DeviceRef) -> VMMeta:
        """A copy recording a hot-plugged device (replacing one with the same kind and id)."""
        return attrs.evolve(self, devices=(*self.without_device(ref.kind, ref.id).devices, ref))

    def without_device(self, kind: str, dev_id: str) -> VMMeta:
        devices = tuple(r for r in self.devices if not (r.kind == kind and r.id == dev_id))
        return attrs.evolve(self, devices=devices)


def metadata_element(meta: VMMeta, *, for_set_metadata: bool = False) -> ET.Element:
    """``<quantix:vm xmlns:quantix=…>`` with unqualified children.

    The namespace is declared on this element itself (not on ``<domain>``), which is the shape
    ``virDomainSetMetadata`` produces too, so both paths read back the same way. That call adds
    the namespace itself and refuses one already declared: ``for_set_metadata`` gives a bare
    ``<vm>`` for it (pass ``NS_PREFIX`` and ``NS`` as key and uri).
    """
    if for_set_metadata:
        vm = ET.Element("vm")
    else:
        vm = ET.Element(f"{NS_PREFIX}:vm", {f"xmlns:{NS_PREFIX}": NS})
    if meta.digest:
        vm.set("digest", meta.digest)
    if meta.guest_os:
        vm.set("guest-os", meta.guest_os)
    for key, value in meta.labels.items():
        ET.SubElement(vm, "label", key=key, value=value)
    for ref in meta.devices:
        attrib = {"kind": ref.kind, "id": ref.id}
        for field in ("dev", "mac", "path"):
            if getattr(ref, field):
                attrib[field] = getattr(ref, field)
        if ref.created:
            attrib["created"] = "yes"
        ET.SubElement(vm, "device", attrib)
    if meta.cloud_init_iso:
        ET.SubElement(vm, "cloud-init", path=meta.cloud_init_iso)
    if meta.nvram:
        ET.SubElement(vm, "nvram", path=meta.nvram)
    return vm


# ---------------------------------------------------------------------------------------------
# Device elements (also used on their own for hot-plug)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrib: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrib)
    if text is not None:
        el.text = text
    return el


def disk_bus(bus: int, *, q35: bool = True, readonly: bool = False) -> str:
    """The libvirt bus for a DiskBus number; unknown numbers and impossible combinations give virtio."""
    name = _DISK_BUS.get(bus, "virtio")
    if name == "ide" and q35:
        name = "sata"  # q35 has no IDE controller; the control plane sends SATA as IDE anyway
    if readonly and name in ("sata", "ide"):
        name = "virtio"  # QEMU cannot make an ATA hard disk read-only
    return name


def disk_element(
    disk,
    *,
    dev: str,
    bus: str,
    source: DiskSource,
    cache: str = "none",
    boot_order: int | None = None,
) -> ET.Element:
    """One ``<disk device='disk'>`` from a DiskSpec and its resolved source."""
    validate_path(f"disk {disk.id or dev} path", source.path)
    if source.format not in FORMATS:
        raise Invalid(f"unsupported disk format: {source.format!r}")
    el = ET.Element("disk", type="file", device="disk")
    driver = _sub(el, "driver", name="qemu", type=source.format, cache=cache)
    if cache in ("none", "directsync"):
        driver.set("io", "native")
    _sub(el, "source", file=source.path)
    _sub(el, "target", dev=dev, bus=bus)
    if disk.readonly:
        _sub(el, "readonly")
    if disk.iops_limit or disk.throughput_mbps:
        tune = _sub(el, "iotune")
        if disk.iops_limit:
            if disk.iops_limit > MAX_THROTTLE:
                raise Invalid("iops_limit is too large")
            _sub(tune, "total_iops_sec", str(disk.iops_limit))
        if disk.throughput_mbps:
            rate = disk.throughput_mbps * 1_000_000  # MB/s (SI)
            if rate > MAX_THROTTLE:
                raise Invalid("throughput_mbps is too large")
            _sub(tune, "total_bytes_sec", str(rate))
    if boot_order is not None:
        _sub(el, "boot", order=str(boot_order))
    return el


def cdrom_element(*, dev: str, path: str | None, boot_order: int | None = None) -> ET.Element:
    el = ET.Element("disk", type="file", device="cdrom")
    _sub(el, "driver", name="qemu", type="raw")
    if path:
        validate_path("CD-ROM path", path)
        _sub(el, "source", file=path)
    _sub(el, "target", dev=dev, bus="sata")
    _sub(el, "readonly")
    if boot_order is not None:
        _sub(el, "boot", order=str(boot_order))
    return el


def nic_element(nic, *, mac: str, source: NicSource, boot_order: int | None = None) -> ET.Element:
    """One ``<interface>``; unknown model numbers become virtio."""
    if source.kind not in ("bridge", "network"):
        raise Invalid(f"unsupported NIC source kind: {source.kind!r}")
    check_text(f"NIC {source.kind}", source.name, max_len=255)
    if not source.name:
        raise Invalid(f"NIC {source.kind} name is empty")
    el = ET.Element("interface", type=source.kind)
    _sub(el, "mac", address=mac)
    _sub(el, "source", **{source.kind: source.name})
    if source.virtualport is not None:
        if source.kind != "bridge":
            raise Invalid("a virtual port needs a bridge source")
        vport = _sub(el, "virtualport", type=source.virtualport)
        if source.interfaceid is not None:
            _sub(vport, "parameters", interfaceid=str(uuid.UUID(source.interfaceid)))
    _sub(el, "model", type=_NIC_MODEL.get(nic.model, "virtio"))
    if source.inbound is not None:
        average, burst = source.inbound
        inbound = _sub(_sub(el, "bandwidth"), "inbound", average=str(max(average, 1)))
        if burst:
            inbound.set("burst", str(burst))
    elif nic.bandwidth_mbps:
        if nic.bandwidth_mbps > MAX_NIC_MBPS:
            raise Invalid("bandwidth_mbps is too large")
        kbytes = str(nic.bandwidth_mbps * 125)  # Mbit/s → kB/s, libvirt's unit
        bw = _sub(el, "bandwidth")
        _sub(bw, "inbound", average=kbytes)
        _sub(bw, "outbound", average=kbytes)
    if boot_order is not None:
        _sub(el, "boot", order=str(boot_order))
    return el


def nic_source(nic, default_network: str = "default") -> NicSource:
    if nic.bridge:
        return NicSource("bridge", nic.bridge)
    if nic.network:
        return NicSource("network", nic.network)
    return NicSource("network", default_network)


# ---------------------------------------------------------------------------------------------
# The domain


def _at(seq: Sequence, i: int):
    return seq[i] if i < len(seq) else None


def _unique(kind: str, ids: list[str]) -> None:
    seen = set()
    for dev_id in ids:
        check_text(f"{kind} id", dev_id, max_len=MAX_TEXT)
        if dev_id in seen:
            raise Invalid(f"duplicate {kind} id: {dev_id!r}")
        seen.add(dev_id)


def _boot_plan(spec, n_disks: int, n_cdroms: int, n_nics: int) -> dict[tuple[str, int], int]:
    """Per-device boot order from ``boot_order`` (BootDevice list) and the ``bootable`` flags.

    Default order is disk, cdrom, network — cdrom first when a spec CD-ROM is bootable. Within a
    class the devices flagged bootable come first; unflagged classes boot their first device.
    """
    order: list[str] = []
    for dev in spec.boot_order:
        name = _BOOT_DEVICE.get(dev)
        if name and name not in order:
            order.append(name)
    if not order:
        order = ["disk", "cdrom", "network"]
        if any(c.bootable for c in spec.cdroms):
            order = ["cdrom", "disk", "network"]
    flagged = {
        "disk": [i for i, d in enumerate(spec.disks) if d.bootable],
        "cdrom": [i for i, c in enumerate(spec.cdroms) if c.bootable],
        "network": [],
    }
    counts = {"disk": n_disks, "cdrom": n_cdroms, "network": n_nics}
    plan: dict[tuple[str, int], int] = {}
    for cls in order:
        picks = flagged[cls] or ([0] if counts[cls] else [])
        for i in picks:
            plan[(cls, i)] = len(plan) + 1
    return plan


def build_domain(spec, ctx: DomainContext) -> ET.Element:
    """The ``<domain>`` element for ``spec``; raises :class:`Invalid` on bad input."""
    vm_id = validate_vm_id(ctx.vm_id)
    name = validate_name(ctx.name)
    labels = validate_labels(ctx.labels)
    validate_path("agent socket dir", ctx.agent_socket_dir)
    check_text("console listen address", ctx.console_listen, max_len=255)
    sockets, cores, threads = vcpu_topology(spec)
    memory = validate_memory(spec)
    profile = guest_profile(check_text("guest_os", spec.guest_os))
    tcg = ctx.domain_type == "qemu"

    disk_ids = [d.id or f"disk{i}" for i, d in enumerate(spec.disks)]
    cdrom_ids = [c.id or f"cdrom-{j}" for j, c in enumerate(spec.cdroms)]
    if ctx.cloud_init_iso:
        cdrom_ids.append(CLOUD_INIT_ID)
    nic_ids = [n.id or f"nic{k}" for k, n in enumerate(spec.nics)]
    _unique("disk", disk_ids + cdrom_ids)
    _unique("NIC", nic_ids)
    boot = _boot_plan(spec, len(spec.disks), len(spec.cdroms), len(spec.nics))
    refs: list[DeviceRef] = []

    dom = ET.Element("domain", type=ctx.domain_type)
    _sub(dom, "name", name)
    _sub(dom, "uuid", vm_id)
    meta = _sub(dom, "metadata")

    _sub(dom, "memory", str(memory), unit="MiB")
    _sub(dom, "currentMemory", str(memory), unit="MiB")
    if spec.memory_hugepages:
        _sub(_sub(dom, "memoryBacking"), "hugepages")
    _sub(dom, "vcpu", str(sockets * cores * threads), placement="static")

    os_el = _sub(dom, "os")
    os_type = _sub(os_el, "type", "hvm")
    if ctx.arch:
        os_type.set("arch", ctx.arch)
    if ctx.machine:
        os_type.set("machine", ctx.machine)
    nvram = ""
    if spec.firmware == _FIRMWARE_UEFI:
        if ctx.nvram_dir:
            nvram = nvram_path(validate_path("nvram dir", ctx.nvram_dir), vm_id)
        if ctx.uefi_loader:
            _sub(
                os_el, "loader", validate_path("UEFI loader", ctx.uefi_loader), readonly="yes", type="pflash"
            )
        else:
            os_el.set("firmware", "efi")
        if nvram:
            _sub(os_el, "nvram", nvram)

    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if profile.hyperv and not tcg:
        hv = _sub(features, "hyperv")
        for feat in HYPERV_FEATURES:
            _sub(hv, feat, state="on")
        _sub(hv, "spinlocks", state="on", retries="8191")

    cpu = _sub(dom, "cpu")
    mode = ctx.cpu_mode or ("host-passthrough" if ctx.domain_type == "kvm" else None)
    if mode:
        cpu.set("mode", mode)
    _sub(cpu, "topology", sockets=str(sockets), cores=str(cores), threads=str(threads))

    clock = _sub(dom, "clock", offset=profile.clock_offset)
    _sub(clock, "timer", name="rtc", tickpolicy="catchup")
    _sub(clock, "timer", name="pit", tickpolicy="delay")
    _sub(clock, "timer", name="hpet", present="yes" if profile.hpet else "no")
    if not tcg:
        if profile.kvmclock:
            _sub(clock, "timer", name="kvmclock", present="yes")
        if profile.hypervclock:
            _sub(clock, "timer", name="hypervclock", present="yes")

    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    _sub(dom, "on_crash", "destroy")

    devices = _sub(dom, "devices")
    if ctx.emulator:
        _sub(devices, "emulator", validate_path("emulator", ctx.emulator))
    _sub(devices, "controller", type="virtio-serial", index="0")

    used: dict[str, int] = {}

    def next_dev(prefix: str) -> str:
        n = used.get(prefix, 0)
        used[prefix] = n + 1
        return disk_dev_name(prefix, n)

    need_scsi = False
    for i, disk in enumerate(spec.disks):
        bus = disk_bus(disk.bus, q35=ctx.q35, readonly=disk.readonly)
        need_scsi |= bus == "scsi"
        dev = next_dev(_DEV_PREFIX[bus])
        source = _at(ctx.disks, i) or DiskSource(disk.path, _DISK_FORMAT.get(disk.format, "qcow2"))
        devices.append(
            disk_element(
                disk, dev=dev, bus=bus, source=source, cache=ctx.disk_cache, boot_order=boot.get(("disk", i))
            )
        )
        refs.append(DeviceRef("disk", disk_ids[i], dev=dev, path=source.path, created=source.created))
    if need_scsi:
        _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")

    for j, cdrom in enumerate(spec.cdroms):
        path = _at(ctx.cdrom_paths, j) or cdrom.iso_path or None
        dev = next_dev("sd")
        devices.append(cdrom_element(dev=dev, path=path, boot_order=boot.get(("cdrom", j))))
        refs.append(DeviceRef("cdrom", cdrom_ids[j], dev=dev, path=path or ""))
    if ctx.cloud_init_iso:
        dev = next_dev("sd")
        devices.append(cdrom_element(dev=dev, path=ctx.cloud_init_iso))
        refs.append(DeviceRef("cdrom", CLOUD_INIT_ID, dev=dev, path=ctx.cloud_init_iso, created=True))

    for k, nic in enumerate(spec.nics):
        mac = validate_mac(nic.mac_address) if nic.mac_address else derive_mac(vm_id, nic_ids[k])
        source = ctx.bound_nics.get(mac) or _at(ctx.nics, k) or nic_source(nic, ctx.default_network)
        devices.append(nic_element(nic, mac=mac, source=source, boot_order=boot.get(("network", k))))
        refs.append(DeviceRef("nic", nic_ids[k], mac=mac))

    if ctx.q35:
        # libvirt fills any empty root port with the devices it places, so emit one per device
        # that may take a port (an over-estimate) plus the spares hot-plug needs.
        pcie_devices = _FIXED_PCIE_DEVICES + need_scsi + used.get("vd", 0) + len(spec.nics)
        _sub(devices, "controller", type="pci", index="0", model="pcie-root")
        for _ in range(pcie_devices + ctx.hotplug_ports):
            _sub(devices, "controller", type="pci", model="pcie-root-port")

    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")

    agent = _sub(devices, "channel", type="unix")
    _sub(agent, "source", mode="bind", path=agent_socket_path(ctx.agent_socket_dir, vm_id))
    _sub(agent, "target", type="virtio", name=AGENT_CHANNEL)
    qga = _sub(devices, "channel", type="unix")
    _sub(qga, "target", type="virtio", name=QEMU_GA_CHANNEL)

    _graphics(devices, spec.console, ctx.console_listen)
    _sub(devices, "input", type="tablet", bus="usb")
    video = _sub(devices, "video")
    model = _sub(video, "model", type=profile.video, heads="1", primary="yes")
    if profile.video in ("vga", "qxl"):
        model.set("vram", str(profile.vram_kib))
    balloon = _sub(devices, "memballoon", model="virtio")
    _sub(balloon, "stats", period="10")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")

    meta.append(
        metadata_element(
            VMMeta(
                labels=labels,
                devices=tuple(refs),
                digest=request_digest(name, spec, labels),
                guest_os=spec.guest_os,
                cloud_init_iso=ctx.cloud_init_iso or "",
                nvram=nvram,
            )
        )
    )
    return dom


def _graphics(devices: ET.Element, console, listen: str) -> None:
    """VNC and/or SPICE per ConsoleSpec; a spec asking for neither still gets VNC (the UI needs one).

    An empty ``listen`` leaves the address to libvirt's qemu.conf (``vnc_listen``/``spice_listen``).
    """
    vnc, spice = console.vnc_enabled, console.spice_enabled
    if not vnc and not spice:
        vnc = True
    if vnc and console.vnc_port and not 5900 <= console.vnc_port <= 65535:
        raise Invalid(f"vnc_port must be 0 (automatic) or 5900-65535, not {console.vnc_port}")
    if spice and console.spice_port > 65535:
        raise Invalid(f"spice_port out of range: {console.spice_port}")
    for kind, enabled, port in (("vnc", vnc, console.vnc_port), ("spice", spice, console.spice_port)):
        if not enabled:
            continue
        g = _sub(devices, "graphics", type=kind, port=str(port or -1), autoport="no" if port else "yes")
        if listen:
            g.set("listen", listen)
        if kind == "vnc" and console.vnc_password:
            g.set("passwd", check_text("vnc_password", console.vnc_password, max_len=64))
        if listen:
            _sub(g, "listen", type="address", address=listen)


def domain_xml(spec, ctx: DomainContext) -> str:
    """The same as :func:`build_domain`, serialized for ``defineXML``."""
    return ET.tostring(build_domain(spec, ctx), encoding="unicode")


def element_xml(el: ET.Element) -> str:
    """One element on its own (e.g. a device for attach/detach), without its trailing text."""
    tail, el.tail = el.tail, None
    try:
        return ET.tostring(el, encoding="unicode")
    finally:
        el.tail = tail
