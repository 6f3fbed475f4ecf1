"""Host discovery for the control plane's "Add host" flow (``registration/discovery``).

The host facts registration already sends (:mod:`hostinfo`), plus what the control plane's
wizard shows besides: block devices with their partitions, NFS mounts, NICs with driver, PCI
address and SR-IOV, and GPUs. Read from ``/sys`` and ``/proc`` (roots are parameters, so tests
use a fixture tree) and psutil. Blocking: run it in a worker thread. Every file read is bounded,
and a hung NFS server costs at most :data:`STATVFS_TIMEOUT` per mount, not the request.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable

import psutil

from quantix.hypervisor import hostinfo
from quantix.util.jsontypes import JsonObject, JsonValue

STATVFS_TIMEOUT = 2.0
_SKIP_BLOCK = ("loop", "ram", "zram", "dm-", "nbd", "fd")
_MAX_READ = 1 << 20
_OCTAL = re.compile(r"\\([0-7]{3})")  # /proc/mounts writes a space as \040
PCI_IDS = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids")
GPU_VENDORS = {"10de": "NVIDIA", "1002": "AMD", "8086": "Intel", "1af4": "Red Hat (virtio)", "1234": "QEMU"}


def _read(path: str, limit: int = 4096) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(limit).strip()
    except OSError:
        return ""


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text, 0) if text.startswith("0x") else int(text)
    except ValueError:
        return default


def bounded_statvfs(path: str, timeout: float = STATVFS_TIMEOUT) -> os.statvfs_result | None:
    """``os.statvfs`` that gives up after ``timeout`` (a hard NFS mount can hang forever)."""
    out: list[os.statvfs_result] = []

    def probe() -> None:
        try:
            out.append(os.statvfs(path))
        except OSError:
            pass

    t = threading.Thread(target=probe, name="statvfs", daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else None


def _usage(st: os.statvfs_result | None) -> tuple[int, int, int]:
    """``(size, used, available)`` in bytes."""
    if st is None:
        return 0, 0, 0
    size = st.f_blocks * st.f_frsize
    return size, size - st.f_bfree * st.f_frsize, st.f_bavail * st.f_frsize


def read_mounts(proc_root: str = "/proc") -> list[tuple[str, str, str]]:
    """``(device, mount point, fstype)`` from ``<proc_root>/mounts`` (octal escapes decoded)."""
    out = []
    for line in _read(os.path.join(proc_root, "mounts"), _MAX_READ).splitlines():
        fields = line.split()
        if len(fields) >= 3:
            dev, mnt, fstype = (_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), f) for f in fields[:3])
            out.append((dev, mnt, fstype))
    return out


def nfs_mounts(mounts: Iterable[tuple[str, str, str]], statvfs=bounded_statvfs) -> list[JsonValue]:
    out: list[JsonValue] = []
    for dev, mnt, fstype in mounts:
        if not fstype.startswith("nfs") or ":" not in dev:
            continue
        server, _, export = dev.rpartition(":")
        size, used, avail = _usage(statvfs(mnt))
        out.append(
            {
                "mountPoint": mnt,
                "server": server.strip("[]"),
                "exportPath": export,
                "sizeBytes": size,
                "usedBytes": used,
                "availableBytes": avail,
            }
        )
    return out


def _interface(name: str, device_path: str) -> str:
    if name.startswith("nvme"):
        return "NVMe"
    if name.startswith("vd"):
        return "virtio"
    if "/usb" in device_path:
        return "USB"
    if "/ata" in device_path:
        return "SATA"
    return "SCSI"


def block_devices(
    mounts: Iterable[tuple[str, str, str]], sys_root: str = "/sys", statvfs=bounded_statvfs
) -> list[JsonValue]:
    """Whole disks under ``/sys/block`` with their partitions (virtual devices left out)."""
    mounted = {dev: (mnt, fstype) for dev, mnt, fstype in mounts if dev.startswith("/dev/")}
    base = os.path.join(sys_root, "block")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    out: list[JsonValue] = []
    for name in names:
        path = os.path.join(base, name)
        size = _int(_read(os.path.join(path, "size"))) * 512
        if name.startswith(_SKIP_BLOCK) or size == 0:
            continue
        rotational = _read(os.path.join(path, "queue", "rotational")) == "1"
        disk: JsonObject = {
            "name": name,
            "model": _read(os.path.join(path, "device", "model")),
            "serial": _read(os.path.join(path, "device", "serial")),
            "sizeBytes": size,
            "diskType": "NVMe" if name.startswith("nvme") else ("HDD" if rotational else "SSD"),
            "interface": _interface(name, os.path.realpath(path)),
            "isRemovable": _read(os.path.join(path, "removable")) == "1",
        }
        partitions: list[JsonValue] = []
        for part in sorted(os.listdir(path)):
            ppath = os.path.join(path, part)
            if not part.startswith(name) or not os.path.exists(os.path.join(ppath, "partition")):
                continue
            entry: JsonObject = {
                "name": part,
                "sizeBytes": _int(_read(os.path.join(ppath, "size"))) * 512,
            }
            if f"/dev/{part}" in mounted:
                mnt, fstype = mounted[f"/dev/{part}"]
                entry.update(mountPoint=mnt, filesystem=fstype, usedBytes=_usage(statvfs(mnt))[1])
            partitions.append(entry)
        disk["partitions"] = partitions
        out.append(disk)
    return out


def network(nics: Iterable[hostinfo.NicFacts], sys_root: str = "/sys") -> list[JsonValue]:
    """Host NICs (bridges, taps and other virtual ones left out) with driver, PCI address, SR-IOV."""
    out: list[JsonValue] = []
    for nic in nics:
        if nic.name.startswith(hostinfo._VIRTUAL_PREFIXES):
            continue
        dev = os.path.join(sys_root, "class", "net", nic.name, "device")
        entry: JsonObject = {
            "name": nic.name,
            "macAddress": nic.mac,
            "speedMbps": max(nic.speed_mbps, 0),
            "linkState": "up" if nic.up else "down",
        }
        if os.path.exists(dev):
            entry["driver"] = os.path.basename(os.path.realpath(os.path.join(dev, "driver")))
            entry["pciAddress"] = os.path.basename(os.path.realpath(dev))
            total_vfs = _read(os.path.join(dev, "sriov_totalvfs"))
            entry["sriovCapable"] = _int(total_vfs) > 0
            entry["sriovVfs"] = _int(_read(os.path.join(dev, "sriov_numvfs")))
        out.append(entry)
    return out


def pci_name(vendor: str, device: str, paths: Iterable[str] = PCI_IDS) -> str | None:
    """``Vendor Device`` from the pci.ids database when installed (one linear pass)."""
    for path in paths:
        try:
            fh = open(path, encoding="utf-8", errors="replace")
        except OSError:
            continue
        with fh:
            vendor_name = None
            for line in fh:
                if vendor_name is None:
                    if line.startswith(vendor + "  "):
                        vendor_name = line[len(vendor) :].strip()
                elif line.startswith("\t" + device + "  "):
                    return f"{vendor_name} {line.strip()[len(device) :].strip()}"
                elif line and not line.startswith(("\t", "#")) and line.strip():
                    return vendor_name
            return vendor_name
    return None


def gpus(sys_root: str = "/sys", name_of: Callable[[str, str], str | None] = pci_name) -> list[JsonValue]:
    """PCI display controllers (class 0x03xxxx)."""
    base = os.path.join(sys_root, "bus", "pci", "devices")
    try:
        addrs = sorted(os.listdir(base))
    except OSError:
        return []
    out: list[JsonValue] = []
    for addr in addrs:
        path = os.path.join(base, addr)
        if not _read(os.path.join(path, "class")).startswith("0x03"):
            continue
        vid = _read(os.path.join(path, "vendor")).removeprefix("0x").lower()
        did = _read(os.path.join(path, "device")).removeprefix("0x").lower()
        vendor = GPU_VENDORS.get(vid, vid)
        name = name_of(vid, did) or f"{vendor} display controller [{vid}:{did}]"
        out.append({"name": name, "vendor": vendor, "pciAddress": addr})
    return out


def _cpu_vendor(proc_root: str) -> str:
    for line in _read(os.path.join(proc_root, "cpuinfo"), 64 * 1024).splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


def discovery(facts: hostinfo.HostFacts, sys_root: str = "/sys", proc_root: str = "/proc") -> JsonObject:
    """The ``registration/discovery`` body: camelCase keys, every count a JSON integer."""
    cpu = facts.cpu
    swap = psutil.swap_memory()
    mounts = read_mounts(proc_root)
    return {
        "hostname": facts.hostname,
        "managementIp": facts.management_ip,
        "cpu": {
            "model": cpu.model,
            "vendor": _cpu_vendor(proc_root),
            "cores": cpu.sockets * cpu.cores_per_socket,
            "threads": cpu.total_threads,
            "sockets": cpu.sockets,
            "frequencyMhz": cpu.mhz,
            "features": list(cpu.features),
            "architecture": os.uname().machine,
        },
        "memory": {
            "totalBytes": facts.memory_total,
            "availableBytes": facts.memory_available,
            "usedBytes": max(facts.memory_total - facts.memory_available, 0),
            "swapTotalBytes": swap.total,
            "swapUsedBytes": swap.used,
        },
        "storage": {"local": block_devices(mounts, sys_root), "nfs": nfs_mounts(mounts), "iscsi": []},
        "network": network(facts.nics, sys_root),
        "gpus": gpus(sys_root),
    }
