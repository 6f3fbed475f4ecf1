"""What GetVMStatus needs of a domain besides its stats, kept per domain between calls.

A status needs the domain handle (a lookup), its name and what its XML says (disks, our
metadata): three more libvirt round trips per call than the one bulk stats query. None of them
change unless the domain is redefined, started or stopped, or gains or loses a device, and
libvirt tells the watcher of each of those, so they are cached per domain and dropped on those
events (:meth:`DomainCache.forget`). A cached call is one round trip: the stats of that domain.

Thread-safe: entries are built in gRPC threads, dropped from the reactor. A version counter
bumped by every drop keeps an entry built from XML read before a drop from being stored after
it.
"""

from __future__ import annotations

import threading
import uuid as uuidlib
from collections.abc import Callable

import attrs
import libvirt

from quantix.hypervisor import domaininfo


@attrs.frozen
class Entry:
    conn: libvirt.virConnect = attrs.field(repr=False)
    dom: libvirt.virDomain = attrs.field(repr=False)
    uuid: str
    name: str
    info: domaininfo.DomainInfo = attrs.field(repr=False)


def _canonical(vm_id: str) -> str | None:
    try:
        return str(uuidlib.UUID(vm_id))
    except (ValueError, TypeError, AttributeError):
        return None


class DomainCache:
    """uuid -> :class:`Entry`; one entry per defined domain at most (dropped with it)."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._version = 0

    def __len__(self) -> int:
        return len(self._entries)

    def cached(self, conn: libvirt.virConnect, vm_id: str) -> Entry | None:
        """The entry for ``vm_id`` (a UUID) on ``conn``, without any libvirt call; else None."""
        key = _canonical(vm_id)
        entry = self._entries.get(key) if key is not None else None
        return entry if entry is not None and entry.conn is conn else None

    def entry(
        self,
        conn: libvirt.virConnect,
        vm_id: str,
        lookup: Callable[[libvirt.virConnect, str], libvirt.virDomain],
    ) -> Entry:
        """Blocking (worker thread): the cached entry, else found with ``lookup``, read, stored."""
        found = self.cached(conn, vm_id)
        if found is not None:
            return found
        dom = lookup(conn, vm_id)
        version = self._version
        entry = Entry(conn, dom, dom.UUIDString(), dom.name(), domaininfo.parse_domain(dom.XMLDesc(0)))
        with self._lock:
            if version == self._version:
                self._entries[entry.uuid] = entry
        return entry

    def forget(self, uuid: str) -> None:
        """Any thread: the domain changed (or went); its next status reads it afresh."""
        with self._lock:
            self._version += 1
            self._entries.pop(uuid, None)

    def clear(self) -> None:
        with self._lock:
            self._version += 1
            self._entries.clear()
