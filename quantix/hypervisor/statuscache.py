"""What GetVMStatus needs of a domain besides its stats, kept per domain between calls.

A status needs the domain handle (a lookup), its name and what its XML says (disks, our
metadata): three more libvirt round trips per call than the one bulk stats query. None of them
change unless the domain is redefined, started or stopped, or gains or loses a device, and
libvirt tells the watcher of each of those, so they are cached per domain and dropped on those
events (:meth:`DomainCache.forget`). A cached call is one round trip: the stats of that domain.

That round trip is itself the cost on a real host: libvirtd asks QEMU (block, balloon and
interface counters) and answers in milliseconds, against a fraction of one for the rest of the
call. So the status built from it is reused for ``hypervisor.status_max_age`` seconds, and
callers that arrive while one query for the domain is in flight wait for that query instead of
starting their own (:meth:`DomainCache.status`). The state in it stays current: every lifecycle
event drops the domain's status, and so does every RPC that changes a VM (before it answers, so
a caller reads its own change even before libvirt's event arrives); only the counters may be up
to ``status_max_age`` old.

Thread-safe: entries are built in gRPC threads, dropped from the reactor. A version counter
bumped by every drop keeps an entry built from XML read before a drop from being stored after
it.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import Future

import attrs
import libvirt

from quantix.hypervisor import domaininfo
from quantix.proto import node_pb2

Status = node_pb2.VMStatusResponse


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


@attrs.frozen
class _Sample:
    taken: float
    status: Status


class DomainCache:
    """uuid -> :class:`Entry`; one entry per defined domain at most (dropped with it), and the
    domain's last status for ``max_age`` seconds (0: never reused)."""

    def __init__(self, max_age: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._entries: dict[str, Entry] = {}
        self._samples: dict[str, _Sample] = {}
        self._pending: dict[str, Future[Status]] = {}
        self._lock = threading.Lock()
        self._version = 0
        self.max_age = max_age
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def cached(self, conn: libvirt.virConnect, vm_id: str) -> Entry | None:
        """The entry for ``vm_id`` (a UUID) on ``conn``, without any libvirt call; else None."""
        entry = self._entries.get(vm_id)  # the usual spelling is the canonical one: no parse
        if entry is None:
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

    def status(self, entry: Entry, build: Callable[[Entry], Status]) -> Status:
        """Blocking (worker thread): a copy of the domain's status, reused while younger than
        ``max_age``; else built by ``build(entry)`` (one libvirt query), once for all callers
        that arrive while it runs. An error of that query reaches each of them."""
        if self.max_age <= 0:
            return build(entry)
        key = entry.uuid
        with self._lock:
            sample = self._samples.get(key)
            if sample is not None and self._clock() - sample.taken < self.max_age:
                return _copy(sample.status)
            pending = self._pending.get(key)
            leader = pending is None
            if pending is None:
                pending = self._pending[key] = Future()
            version = self._version
        if not leader:
            return _copy(pending.result())
        try:
            status = build(entry)
        except BaseException as exc:
            with self._lock:
                del self._pending[key]
            pending.set_exception(exc)
            raise
        with self._lock:
            del self._pending[key]
            if version == self._version:  # no change since the query began
                self._samples[key] = _Sample(self._clock(), status)
        pending.set_result(status)
        return _copy(status)

    def forget(self, uuid: str) -> None:
        """Any thread: the domain changed (or went); its next status reads it afresh."""
        with self._lock:
            self._version += 1
            self._entries.pop(uuid, None)
            self._samples.pop(uuid, None)

    def state_changed(self, uuid: str, name: str = "", state: str | None = None) -> None:
        """Any thread: the domain's state changed (a domain state listener on the reactor, or an
        RPC that changed it): drop its status only, the XML stays what it was."""
        with self._lock:
            self._version += 1
            self._samples.pop(uuid, None)

    def clear(self) -> None:
        with self._lock:
            self._version += 1
            self._entries.clear()
            self._samples.clear()


def _copy(status: Status) -> Status:
    """A caller's own copy: it adds fields (guest agent) to what it gets."""
    out = Status()
    out.CopyFrom(status)
    return out
