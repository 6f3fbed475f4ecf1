"""Pure translation of libvirt domain events into ``NodeEvent`` fields (no I/O, no libvirt calls).

Each function returns ``(event_type, message, metadata)`` with ``event_type`` a contract
``EventType`` number. libvirt's own event and detail names travel in ``metadata`` so a consumer
can tell, say, a guest shutdown from a destroy without the contract growing new types.
"""

from __future__ import annotations

import libvirt

from quantix.proto import node_pb2

Mapped = tuple[int, str, dict[str, str]]

ET = node_pb2.EventType
UNKNOWN = ET.Value("EVENT_TYPE_UNKNOWN")
VM_STARTED = ET.Value("EVENT_TYPE_VM_STARTED")
VM_STOPPED = ET.Value("EVENT_TYPE_VM_STOPPED")
VM_PAUSED = ET.Value("EVENT_TYPE_VM_PAUSED")
VM_RESUMED = ET.Value("EVENT_TYPE_VM_RESUMED")
VM_CRASHED = ET.Value("EVENT_TYPE_VM_CRASHED")
VM_REBOOTED = ET.Value("EVENT_TYPE_VM_REBOOTED")
VM_MIGRATED_OUT = ET.Value("EVENT_TYPE_VM_MIGRATED_OUT")
VM_MIGRATED_IN = ET.Value("EVENT_TYPE_VM_MIGRATED_IN")
SNAPSHOT_CREATED = ET.Value("EVENT_TYPE_SNAPSHOT_CREATED")
SNAPSHOT_REVERTED = ET.Value("EVENT_TYPE_SNAPSHOT_REVERTED")
SNAPSHOT_DELETED = ET.Value("EVENT_TYPE_SNAPSHOT_DELETED")
DISK_ATTACHED = ET.Value("EVENT_TYPE_DISK_ATTACHED")
DISK_DETACHED = ET.Value("EVENT_TYPE_DISK_DETACHED")
NIC_ATTACHED = ET.Value("EVENT_TYPE_NIC_ATTACHED")
NIC_DETACHED = ET.Value("EVENT_TYPE_NIC_DETACHED")
NODE_OVERLOADED = ET.Value("EVENT_TYPE_NODE_OVERLOADED")
NODE_RECOVERED = ET.Value("EVENT_TYPE_NODE_RECOVERED")
AGENT_CONNECTED = ET.Value("EVENT_TYPE_AGENT_CONNECTED")
AGENT_DISCONNECTED = ET.Value("EVENT_TYPE_AGENT_DISCONNECTED")


def _names(prefix: str) -> dict[int, str]:
    """``{value: "suffix"}`` for libvirt constants ``prefix*`` (lower case, e.g. ``"destroyed"``)."""
    out: dict[int, str] = {}
    for attr in dir(libvirt):
        if attr.startswith(prefix) and not attr.endswith("_LAST"):
            value = getattr(libvirt, attr)
            if isinstance(value, int):
                out.setdefault(value, attr[len(prefix) :].lower())
    return out


LIFECYCLE_EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "pmsuspended",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}

#: Detail names per lifecycle event, e.g. ``DETAILS["stopped"][1] == "destroyed"``.
DETAILS = {name: _names(f"VIR_DOMAIN_EVENT_{name.upper()}_") for name in LIFECYCLE_EVENTS.values()}
WATCHDOG_ACTIONS = _names("VIR_DOMAIN_EVENT_WATCHDOG_")
IO_ERROR_ACTIONS = _names("VIR_DOMAIN_EVENT_IO_ERROR_")
AGENT_REASONS = _names("VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_REASON_")


#: What libvirt reports for each lifecycle (event, detail), in its own terms (see libvirt's
#: ``virDomainEventType`` and ``virDomainEvent*DetailType`` documentation). A SHUTDOWN event
#: means the guest has *finished* shutting down, not that it is about to.
LIFECYCLE_TEXT = {
    ("started", "booted"): "booted",
    ("started", "migrated"): "migrated in",
    ("started", "restored"): "started: restored from a saved state",
    ("started", "from_snapshot"): "started from a snapshot",
    ("started", "wakeup"): "started by a wakeup event",
    ("suspended", "paused"): "paused",
    ("suspended", "migrated"): "paused for migration",
    ("suspended", "ioerror"): "paused after a disk I/O error",
    ("suspended", "watchdog"): "paused by its watchdog",
    ("suspended", "restored"): "paused after a restore from a saved state",
    ("suspended", "from_snapshot"): "paused after a snapshot revert",
    ("suspended", "api_error"): "paused after a failed libvirt call",
    ("suspended", "postcopy"): "paused for post-copy migration",
    ("suspended", "postcopy_failed"): "paused: post-copy migration failed",
    ("resumed", "unpaused"): "resumed",
    ("resumed", "migrated"): "resumed after migration",
    ("resumed", "from_snapshot"): "resumed after a snapshot revert",
    ("resumed", "postcopy"): "resumed, post-copy migration running",
    ("resumed", "postcopy_failed"): "resumed: post-copy migration failed",
    ("stopped", "shutdown"): "stopped: shut down",
    ("stopped", "destroyed"): "stopped: destroyed (powered off)",
    ("stopped", "crashed"): "stopped: crashed",
    ("stopped", "migrated"): "migrated out",
    ("stopped", "saved"): "stopped: saved to a file",
    ("stopped", "failed"): "stopped: the emulator failed",
    ("stopped", "from_snapshot"): "stopped for a snapshot revert",
    ("shutdown", "finished"): "shutdown finished",
    ("shutdown", "guest"): "shutdown finished (requested by the guest)",
    ("shutdown", "host"): "shutdown finished (requested by the host)",
    ("pmsuspended", "memory"): "suspended to memory by the guest",
    ("pmsuspended", "disk"): "suspended to disk by the guest",
    ("crashed", "panicked"): "crashed: guest kernel panic",
    ("crashed", "crashloaded"): "crashed: the guest loaded its crash kernel",
    ("defined", "added"): "defined (new domain)",
    ("defined", "updated"): "defined (configuration updated)",
    ("defined", "renamed"): "defined (renamed)",
    ("defined", "from_snapshot"): "defined (configuration restored from a snapshot)",
    ("undefined", "removed"): "undefined",
    ("undefined", "renamed"): "undefined (renamed)",
}

#: Contract type per (event, detail), then per event; everything else is EVENT_TYPE_UNKNOWN.
#: The contract has no type for defined/undefined: those keep UNKNOWN, and the message and
#: ``metadata["libvirt_event"]`` say ``defined``/``undefined``.
_TYPES = {
    ("started", "migrated"): VM_MIGRATED_IN,
    ("stopped", "crashed"): VM_CRASHED,
    ("stopped", "failed"): VM_CRASHED,
    ("stopped", "migrated"): VM_MIGRATED_OUT,
    "started": VM_STARTED,
    "suspended": VM_PAUSED,
    "resumed": VM_RESUMED,
    "stopped": VM_STOPPED,
    "crashed": VM_CRASHED,
    "pmsuspended": VM_PAUSED,
}


def lifecycle(name: str, event: int, detail: int) -> Mapped:
    """A ``VIR_DOMAIN_EVENT_ID_LIFECYCLE`` event of domain ``name``; the message says what
    libvirt reported, and libvirt's event and detail names travel in the metadata."""
    ev = LIFECYCLE_EVENTS.get(event, f"event-{event}")
    det = DETAILS.get(ev, {}).get(detail, str(detail))
    meta = {"libvirt_event": ev, "libvirt_detail": det}
    kind = _TYPES.get((ev, det), _TYPES.get(ev, UNKNOWN))
    text = LIFECYCLE_TEXT.get((ev, det))
    if text is None:  # a detail newer than this table: say exactly what libvirt sent
        text = f"{ev} ({det})" if ev in DETAILS else f"libvirt event {ev} ({det})"
    return kind, f"VM {name} {text}", meta


def reboot(name: str) -> Mapped:
    return VM_REBOOTED, f"VM {name} rebooted", {"libvirt_event": "reboot"}


def _device_kind(alias: str) -> str:
    """Guess the device class from its libvirt alias (``net0``, ``virtio-disk1``, ``ua-…``)."""
    a = alias.lower()
    if a.startswith(("net", "hostdev-net")) or "-net" in a:
        return "nic"
    if "disk" in a or a.startswith(("sata", "scsi", "ide", "virtio-blk", "fdc")):
        return "disk"
    return "device"


def device(name: str, alias: str, added: bool) -> Mapped:
    """DEVICE_ADDED / DEVICE_REMOVED: disk and NIC aliases get their contract types."""
    kind = _device_kind(alias)
    meta = {"libvirt_event": "device_added" if added else "device_removed", "device": alias}
    verb = "attached" if added else "detached"
    if kind == "nic":
        return (NIC_ATTACHED if added else NIC_DETACHED), f"NIC {alias} {verb} to VM {name}", meta
    if kind == "disk":
        return (DISK_ATTACHED if added else DISK_DETACHED), f"disk {alias} {verb} to VM {name}", meta
    return UNKNOWN, f"device {alias} {verb} to VM {name}", meta


def io_error(name: str, src_path: str, alias: str, action: int, reason: str) -> Mapped:
    act = IO_ERROR_ACTIONS.get(action, str(action))
    meta = {
        "libvirt_event": "io_error",
        "device": alias,
        "path": src_path,
        "action": act,
        "reason": reason,
    }
    return UNKNOWN, f"I/O error on {alias or src_path} of VM {name}: {reason or 'unknown'} ({act})", meta


def watchdog(name: str, action: int) -> Mapped:
    act = WATCHDOG_ACTIONS.get(action, str(action))
    return (
        UNKNOWN,
        f"watchdog fired in VM {name} (action {act})",
        {"libvirt_event": "watchdog", "action": act},
    )


def agent_lifecycle(name: str, state: int, reason: int) -> Mapped:
    """qemu-ga channel connect/disconnect as libvirt sees it."""
    rsn = AGENT_REASONS.get(reason, str(reason))
    meta = {"libvirt_event": "agent_lifecycle", "agent": "qemu-ga", "reason": rsn}
    if state == libvirt.VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED:
        return AGENT_CONNECTED, f"guest agent connected in VM {name}", meta
    return AGENT_DISCONNECTED, f"guest agent disconnected in VM {name} ({rsn})", meta


def control_error(name: str) -> Mapped:
    return UNKNOWN, f"libvirt lost control of VM {name}", {"libvirt_event": "control_error"}


# -- domain states, for reconciliation --------------------------------------------------------

RUNNING, PAUSED, STOPPED, CRASHED, SUSPENDED, OTHER = "running", "paused", "stopped", "crashed", "pm", "other"

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: RUNNING,
    libvirt.VIR_DOMAIN_SHUTOFF: STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: SUSPENDED,
}


def coarse_state(state: int, reason: int = 0) -> str:
    """libvirt ``(state, reason)`` to the few states events distinguish."""
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
        return CRASHED
    return _STATES.get(state, OTHER)


def redundant(event: int, before: str | None) -> bool:
    """True for the RESUMED that QEMU domains emit while starting (they boot paused, then run):
    only a domain we know to be paused can be resumed."""
    return event == libvirt.VIR_DOMAIN_EVENT_RESUMED and before not in (PAUSED, SUSPENDED)


def state_after(event: int, detail: int, before: str | None) -> str | None:
    """Known state after a lifecycle event (``None``: the domain is gone)."""
    ev = LIFECYCLE_EVENTS.get(event)
    det = DETAILS.get(ev or "", {}).get(detail, "")
    if ev in ("started", "resumed"):
        return RUNNING
    if ev == "suspended":
        return PAUSED
    if ev == "stopped":
        return CRASHED if det == "crashed" else STOPPED
    if ev == "crashed":
        return CRASHED
    if ev == "pmsuspended":
        return SUSPENDED
    if ev == "undefined":
        return None
    if ev == "defined":
        return before or STOPPED
    return before
