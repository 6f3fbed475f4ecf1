"""Helpers for tests against libvirt: the real daemon's URI and throwaway domain XML.

Tests that need the real libvirtd call :func:`real_libvirt_uri` first: it skips when the daemon
does not answer, except under ``CI`` where a missing daemon is a failure. The probe runs
``virsh`` in a child process so that it never opens a libvirt connection in the test process
(that must wait until the event loop is installed).
"""

from __future__ import annotations

import os
import subprocess
import uuid
import xml.etree.ElementTree as ET

from twisted.trial.unittest import FailTest, SkipTest

SYSTEM_URI = "qemu:///system"
#: Domains the tests create on a real libvirtd are named ``<NAME_PREFIX>-...``. ``scripts/dev.sh
#: test`` sets QUANTIX_TEST_RUN to a tag of its own, so it can remove exactly its own VMs' QEMU
#: logs afterwards, even on a libvirtd that other runs share.
NAME_PREFIX = "qtx-test" + (
    f"-{os.environ['QUANTIX_TEST_RUN']}" if os.environ.get("QUANTIX_TEST_RUN") else ""
)

_probe: dict[str, str | None] = {}  # uri -> None when it answers, else why not


def _why_unreachable(uri: str) -> str | None:
    try:
        proc = subprocess.run(
            ["virsh", "-c", uri, "uri"], capture_output=True, text=True, timeout=15, check=False
        )
    except FileNotFoundError:
        return "virsh is not installed"
    except subprocess.TimeoutExpired:
        return f"{uri} did not answer within 15 s"
    if proc.returncode != 0:
        return f"{uri} does not answer: {proc.stderr.strip() or proc.stdout.strip()}"
    return None


def real_libvirt_uri(uri: str = SYSTEM_URI) -> str:
    """Return *uri* when its libvirtd answers; otherwise skip (or fail when ``CI`` is set)."""
    if uri not in _probe:
        _probe[uri] = _why_unreachable(uri)
    why = _probe[uri]
    if why is None:
        return uri
    if os.environ.get("CI"):
        raise FailTest(f"real libvirtd required in CI: {why}")
    raise SkipTest(f"no real libvirtd: {why}")


def virsh(*args: str, uri: str = SYSTEM_URI) -> None:
    """Run ``virsh -c uri args`` for cleanup; its outcome is not checked (the object may be gone)."""
    subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, timeout=60, check=False)


def unique_name(prefix: str = NAME_PREFIX) -> str:
    """A domain name no other test (or test process) will pick."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def tiny_domain_xml(
    name: str | None = None,
    *,
    domain_type: str = "qemu",
    memory_mib: int = 64,
    disk_path: str | None = None,
    emulator: str = "/usr/bin/qemu-system-x86_64",
) -> tuple[str, str]:
    """Return ``(name, xml)`` of a minimal domain with no OS.

    ``domain_type='qemu'`` is a TCG guest for the real daemon (it idles in the firmware, which is
    enough for lifecycle events); ``domain_type='test'`` suits the ``test:///`` driver. A
    *disk_path* adds a qcow2 disk the caller created.
    """
    name = name or unique_name()
    dom = ET.Element("domain", type=domain_type)
    ET.SubElement(dom, "name").text = name
    ET.SubElement(dom, "memory", unit="MiB").text = str(memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_el = ET.SubElement(dom, "os")
    type_attrs = {"arch": "x86_64"}
    if domain_type == "qemu":
        type_attrs["machine"] = "pc"
    ET.SubElement(os_el, "type", type_attrs).text = "hvm"
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    if domain_type == "qemu":
        devices = ET.SubElement(dom, "devices")
        ET.SubElement(devices, "emulator").text = emulator
        if disk_path is not None:
            disk = ET.SubElement(devices, "disk", type="file", device="disk")
            ET.SubElement(disk, "driver", name="qemu", type="qcow2")
            ET.SubElement(disk, "source", file=disk_path)
            ET.SubElement(disk, "target", dev="vda", bus="virtio")
        ET.SubElement(devices, "memballoon", model="none")
    return name, ET.tostring(dom, encoding="unicode")
