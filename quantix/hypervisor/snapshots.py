"""VM snapshots through libvirt's snapshot API (blocking; gRPC threads).

A full snapshot is libvirt's default: internal qcow2 snapshots, with the memory state when the
VM runs. ``disk_only`` keeps memory out: an internal disk snapshot of a stopped VM, an external
(overlay) disk snapshot of a running one, since QEMU cannot take internal disk-only snapshots
live. Everything reported (creation time, parent, state) comes from the snapshot's own XML.
"""

from __future__ import annotations

import re
import time
import xml.etree.ElementTree as ET

import libvirt
from google.protobuf.timestamp_pb2 import Timestamp

from quantix import errors
from quantix.proto import node_pb2

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

# Snapshot XML <state> → PowerState. libvirt makes disk-only snapshots of a running VM the only
# "disk-snapshot" kind here (stopped VMs get internal ones), so that state means it was running.
_STATE = {
    "running": node_pb2.POWER_STATE_RUNNING,
    "blocked": node_pb2.POWER_STATE_RUNNING,
    "disk-snapshot": node_pb2.POWER_STATE_RUNNING,
    "paused": node_pb2.POWER_STATE_PAUSED,
    "shutoff": node_pb2.POWER_STATE_STOPPED,
    "shutdown": node_pb2.POWER_STATE_STOPPED,
    "crashed": node_pb2.POWER_STATE_CRASHED,
    "pmsuspended": node_pb2.POWER_STATE_SUSPENDED,
}


def snapshot_message(xml: str) -> node_pb2.SnapshotResponse:
    """``SnapshotResponse`` from ``virDomainSnapshotGetXMLDesc`` output (pure)."""
    root = ET.fromstring(xml)
    name = root.findtext("name", "")
    created = Timestamp(seconds=int(root.findtext("creationTime", "0") or 0))
    return node_pb2.SnapshotResponse(
        snapshot_id=name,
        name=name,
        description=root.findtext("description", ""),
        created_at=created,
        vm_state=_STATE.get(root.findtext("state", ""), node_pb2.POWER_STATE_UNKNOWN),
        parent_id=root.findtext("parent/name", ""),
    )


def request_xml(name: str, description: str) -> str:
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    if description:
        ET.SubElement(root, "description").text = description
    return ET.tostring(root, encoding="unicode")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise errors.Invalid(
            f"snapshot name must be 1-128 characters of letters, digits and . _ : - : {name!r}"
        )
    return name


def create(
    dom: libvirt.virDomain, name: str, description: str = "", *, disk_only: bool = False
) -> node_pb2.SnapshotResponse:
    """Take a snapshot; an empty name gets a time-based one."""
    name = check_name(name or time.strftime("snap-%Y%m%d-%H%M%S", time.gmtime()))
    if len(description) > 4096:
        raise errors.Invalid("snapshot description is longer than 4096 characters")
    try:
        dom.snapshotLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT:
            raise
    else:
        raise errors.AlreadyExists(f"snapshot {name} already exists on VM {dom.UUIDString()}")
    flags = 0
    if disk_only and dom.isActive():
        flags |= libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
    snap = dom.snapshotCreateXML(request_xml(name, description), flags)
    return snapshot_message(snap.getXMLDesc(0))


def _find(dom: libvirt.virDomain, snapshot_id: str) -> libvirt.virDomainSnapshot:
    try:
        return dom.snapshotLookupByName(snapshot_id)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT, libvirt.VIR_ERR_INVALID_ARG):
            raise errors.NotFound(f"snapshot not found: {snapshot_id} (VM {dom.UUIDString()})") from None
        raise


def revert(dom: libvirt.virDomain, snapshot_id: str) -> node_pb2.SnapshotResponse:
    """Return the VM to the snapshot; it ends up in the state the snapshot recorded."""
    snap = _find(dom, snapshot_id)
    dom.revertToSnapshot(snap, 0)
    return snapshot_message(snap.getXMLDesc(0))


def delete(dom: libvirt.virDomain, snapshot_id: str) -> None:
    """Delete one snapshot; its children are re-parented by libvirt."""
    _find(dom, snapshot_id).delete(0)


def list_snapshots(dom: libvirt.virDomain) -> list[node_pb2.SnapshotResponse]:
    """All snapshots, oldest first."""
    out = [snapshot_message(s.getXMLDesc(0)) for s in dom.listAllSnapshots(0)]
    out.sort(key=lambda m: (m.created_at.seconds, m.name))
    return out
