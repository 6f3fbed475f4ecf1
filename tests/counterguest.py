"""A guest that proves it keeps running: a boot sector that counts and prints the count.

No OS and no download: SeaBIOS boots a 512-byte program that increments a counter, writes
``n=<8 hex digits>`` to COM1 and halts until the BIOS tick count has advanced by 4 (about
0.2 s), forever. The serial port goes to a file, so a migration shows up as the count stopping
in the source host's file and going on, from the next number, in the target host's.
Source (GNU as, ``as --32``; ``ld -m elf_i386 -Ttext 0x7c00 --oformat binary``)::

            .code16
    _start: cli
            xor %ax, %ax
            mov %ax, %ds
            mov %ax, %ss
            mov $0x7c00, %sp
            sti
            xor %ebx, %ebx           # the counter
    next:   inc %ebx
            mov %ebx, 0x500          # ... also kept in RAM
            mov $0x3f8, %dx
            mov $'n', %al
            out %al, %dx
            mov $'=', %al
            out %al, %dx
            mov $8, %cx
            mov %ebx, %esi
    digit:  rol $4, %esi
            mov %si, %ax
            and $0xf, %al
            add $'0', %al
            cmp $'9', %al
            jbe 1f
            add $7, %al
    1:      out %al, %dx
            loop digit
            mov $'\\n', %al
            out %al, %dx
            mov 0x46c, %ax           # BIOS tick count, 18.2 Hz
            add $4, %ax
    wait:   hlt
            cmp 0x46c, %ax
            jne wait
            jmp next
            .org 510
            .byte 0x55, 0xaa
"""

from __future__ import annotations

import os
import re
import subprocess
import xml.etree.ElementTree as ET

_CODE = bytes.fromhex(
    "fa31c08ed88ed0bc007cfb6631db6643"
    "66891e0005baf803b06eeeb03deeb908"
    "006689de66c1c60489f0240f04303c39"
    "76020407eee2edb00aeea16c0483c004"
    "f43b066c0475f9ebc5"
)
BOOT_SECTOR = _CODE + bytes(510 - len(_CODE)) + b"\x55\xaa"
_COUNT = re.compile(rb"^n=([0-9A-F]{8})$", re.M)


def make_disk(path: str, size_mib: int = 1) -> None:
    """A qcow2 disk whose first sector is the counting program; the rest is random data (so a
    copy of it takes time in proportion to its size: zeros would be skipped)."""
    raw = path + ".raw"
    with open(raw, "wb") as fh:
        fh.write(BOOT_SECTOR)
        for _ in range(size_mib):
            fh.write(os.urandom(1024 * 1024))
        fh.truncate(size_mib * 1024 * 1024)
    subprocess.run(
        ["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, path], check=True, timeout=60
    )
    os.unlink(raw)


def domain_xml(
    name: str, vm_uuid: str, disk: str, serial: str, memory_mib: int = 64, cdrom: str | None = None
) -> str:
    """TCG, no devices beyond the disk, an optional CD-ROM and the serial file (appended to)."""
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "uuid").text = vm_uuid
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    ET.SubElement(os_el, "boot", dev="hd")
    devices = ET.SubElement(dom, "devices")
    disk_el = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk_el, "driver", name="qemu", type="qcow2", cache="none")
    ET.SubElement(disk_el, "source", file=disk)
    ET.SubElement(disk_el, "target", dev="hda", bus="ide")
    if cdrom is not None:
        cd = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(cd, "driver", name="qemu", type="raw")
        ET.SubElement(cd, "source", file=cdrom)
        ET.SubElement(cd, "target", dev="hdc", bus="ide")
        ET.SubElement(cd, "readonly")
    serial_el = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial_el, "source", path=serial, append="on")
    ET.SubElement(serial_el, "target", port="0")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(dom, encoding="unicode")


def counts(path: str) -> list[int]:
    """Every count the guest wrote to ``path`` (empty when the file does not exist yet)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        return []
    return [int(m, 16) for m in _COUNT.findall(data)]
