"""Domain event callbacks on every libvirt connection, and reconciliation against libvirt.

Callbacks run on the reactor (through ``loop.dispatch``): they map the event, update the known
state and publish. The domain's uuid and name are read before that, in the thread libvirt calls
back on: each libvirt-python call, however local, releases and re-takes the GIL, and on a busy
daemon every re-take is a wait the reactor would pay per event (see bench/README.md). Anything
that talks to libvirt (registration, the inventory) runs in a pool thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import libvirt
from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from quantix import bridge, errors
from quantix.events import mapping, reconcile
from quantix.events.bus import EventBus
from quantix.hypervisor.connection import Hypervisor

log = Logger(namespace="quantix.events")


#: Lifecycle events after which the domain's XML is what it was (pausing changes no device).
_XML_KEPT = frozenset((libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_RESUMED))


class Domain(NamedTuple):
    """What a callback needs of a ``virDomain``, read once in libvirt's calling thread."""

    uuid: str
    name: str


def identified(callback: Callable[..., None]) -> Callable[..., None]:
    """``callback(conn, Domain, ...)`` from libvirt's ``(conn, virDomain, ...)``, the two
    libvirt-python calls made by whichever thread libvirt calls back on."""

    def call(conn: libvirt.virConnect, dom: libvirt.virDomain, *rest: object) -> None:
        callback(conn, Domain(dom.UUIDString(), dom.name()), *rest)

    return call


class DomainWatcher(Service):
    """Turns libvirt domain events into bus events and keeps a known state per domain."""

    def __init__(
        self, reactor: IReactorTime, hypervisor: Hypervisor, bus: EventBus, reconcile_interval: float = 300.0
    ) -> None:
        self.reactor = reactor
        self.hypervisor = hypervisor
        self.bus = bus
        self.reconcile_interval = reconcile_interval
        #: uuid -> (name, coarse state), as of the last event or reconciliation.
        self.known: dict[str, tuple[str, str]] = {}
        #: domains with a live event since the running reconciliation took its inventory
        #: (None when none runs): only that long is per-domain history needed, so nothing is
        #: kept for a domain once it is gone.
        self._moved: set[str] | None = None
        self._conn: libvirt.virConnect | None = None
        self._callback_ids: list[int] = []
        self._synced = False
        self._reconciling: defer.Deferred | None = None
        self._loop: task.LoopingCall | None = None
        self.reconciliations = 0
        #: Called on the reactor as ``listener(uuid, name, state)`` whenever a domain's known
        #: state changes (``state`` None: gone); the baseline counts as a change, so a listener
        #: also learns what was already running when the daemon started.
        self.state_listeners: list[Callable[[str, str, str | None], None]] = []
        #: Called on the reactor as ``listener(uuid)`` when what a domain's XML says may have
        #: changed: defined, undefined, started, stopped, a device added or removed.
        self.xml_listeners: list[Callable[[str], None]] = []
        hypervisor.listen(self._connected, self._disconnected)

    # -- connection lifecycle -----------------------------------------------------------------

    def _connected(self, conn: libvirt.virConnect) -> None:
        if not self.running:
            return
        self.attach(conn)

    def _disconnected(self) -> None:
        # The connection is gone with its callbacks; nothing to deregister.
        self._conn = None
        self._callback_ids = []

    def attach(self, conn: libvirt.virConnect) -> defer.Deferred:
        """Register every callback on ``conn``, then reconcile (silently the first time)."""
        self._conn = conn
        callbacks = self._callbacks()
        loop = self.hypervisor.loop
        assert loop is not None  # installed before the first connection

        def register() -> list[int]:
            ids = []
            for ev, cb in callbacks:
                try:
                    ids.append(conn.domainEventRegisterAny(None, ev, identified(loop.dispatch(cb)), None))
                except libvirt.libvirtError as exc:
                    # One unsupported event id (an old libvirtd) must not cost us the others.
                    log.warn("cannot watch libvirt event {ev}: {err}", ev=ev, err=exc)
            return ids

        def registered(ids: list[int]) -> defer.Deferred:
            if self._conn is not conn:
                # Stopped or reconnected meanwhile: undo, in case the connection still lives.
                for cid in ids:
                    try:
                        conn.domainEventDeregisterAny(cid)
                    except libvirt.libvirtError:
                        pass
                return defer.succeed(None)
            self._callback_ids = ids
            return self.reconcile()

        def failed(failure: Failure) -> None:
            if failure.check(errors.HypervisorDown) or (
                failure.check(libvirt.libvirtError) and self._conn is not conn
            ):
                # libvirt went away (or stopped, closing this connection under the worker: an
                # "invalid connection pointer") before the first reconciliation: nothing is
                # wrong with watching; the next connection attaches again.
                log.info("libvirt went away before reconciling; waiting for the next connection")
                return
            log.failure("cannot watch libvirt domain events", failure)

        d = bridge.run_in_worker(register).addCallback(registered)
        d.addErrback(failed)
        return d

    def detach(self) -> None:
        """Deregister the callbacks (before the connection is closed)."""
        conn, ids = self._conn, self._callback_ids
        self._conn, self._callback_ids = None, []
        for cid in ids:
            try:
                conn.domainEventDeregisterAny(cid)  # type: ignore[union-attr]  # ids imply a conn
            except libvirt.libvirtError:
                pass

    def _callbacks(self) -> list[tuple[int, Callable[..., None]]]:
        return [
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot),
            (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, self._on_device_added),
            (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed),
            (libvirt.VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON, self._on_io_error),
            (libvirt.VIR_DOMAIN_EVENT_ID_WATCHDOG, self._on_watchdog),
            (libvirt.VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE, self._on_agent),
            (libvirt.VIR_DOMAIN_EVENT_ID_CONTROL_ERROR, self._on_control_error),
        ]

    # -- callbacks (reactor thread; no libvirt calls at all) ----------------------------------

    def _emit(self, dom: Domain, mapped: mapping.Mapped) -> None:
        event_type, message, meta = mapped
        self.bus.publish(event_type, dom.uuid, message, {**meta, "vm_name": dom.name, "source": "libvirt"})

    def _on_lifecycle(
        self, conn: libvirt.virConnect, dom: Domain, event: int, detail: int, opaque: object = None
    ) -> None:
        if conn is not self._conn:
            return
        uuid, name = dom
        if event not in _XML_KEPT:
            self._xml_changed(uuid)
        before = self.known.get(uuid)
        before_state = before[1] if before else None
        if not mapping.redundant(event, before_state):
            self._emit(dom, mapping.lifecycle(name, event, detail))
        after = mapping.state_after(event, detail, before_state)
        if after is None:
            self.known.pop(uuid, None)
        else:
            self.known[uuid] = (name, after)
        if self._moved is not None:
            self._moved.add(uuid)
        if after != before_state:
            self._notify(uuid, name, after)

    def _notify(self, uuid: str, name: str, state: str | None) -> None:
        for listener in list(self.state_listeners):
            try:
                listener(uuid, name, state)
            except Exception:
                log.failure("domain state listener failed")

    def _xml_changed(self, uuid: str) -> None:
        for listener in self.xml_listeners:
            try:
                listener(uuid)
            except Exception:
                log.failure("domain XML listener failed")

    def _on_reboot(self, conn: libvirt.virConnect, dom: Domain, opaque: object = None) -> None:
        self._emit(dom, mapping.reboot(dom.name))

    def _on_device_added(
        self, conn: libvirt.virConnect, dom: Domain, alias: str, opaque: object = None
    ) -> None:
        self._xml_changed(dom.uuid)
        self._emit(dom, mapping.device(dom.name, alias, True))

    def _on_device_removed(
        self, conn: libvirt.virConnect, dom: Domain, alias: str, opaque: object = None
    ) -> None:
        self._xml_changed(dom.uuid)
        self._emit(dom, mapping.device(dom.name, alias, False))

    def _on_io_error(
        self,
        conn: libvirt.virConnect,
        dom: Domain,
        src: str,
        alias: str,
        action: int,
        reason: str,
        opaque: object = None,
    ) -> None:
        self._emit(dom, mapping.io_error(dom.name, src, alias, action, reason))

    def _on_watchdog(self, conn: libvirt.virConnect, dom: Domain, action: int, opaque: object = None) -> None:
        self._emit(dom, mapping.watchdog(dom.name, action))

    def _on_agent(
        self, conn: libvirt.virConnect, dom: Domain, state: int, reason: int, opaque: object = None
    ) -> None:
        self._emit(dom, mapping.agent_lifecycle(dom.name, state, reason))

    def _on_control_error(self, conn: libvirt.virConnect, dom: Domain, opaque: object = None) -> None:
        self._emit(dom, mapping.control_error(dom.name))

    # -- reconciliation -----------------------------------------------------------------------

    def reconcile(self) -> defer.Deferred:
        """Compare with one bulk inventory (in a thread) and publish what was missed.

        The first run after start only records the baseline. A domain that produced a live
        event while the inventory was being taken is left alone: the event is newer.
        """
        if self._reconciling is not None:
            waiter: defer.Deferred[None] = defer.Deferred()

            def chain(result: object) -> object:
                waiter.callback(None)
                return result

            self._reconciling.addBoth(chain)
            return waiter
        try:
            conn = self.hypervisor.conn()
        except Exception as exc:
            return defer.fail(exc)
        moved: set[str] = set()
        self._moved = moved
        d = bridge.run_in_worker(reconcile.inventory, conn)

        def apply(current: dict[str, tuple[str, str]]) -> list:
            known = {u: v for u, v in self.known.items() if u not in moved}
            now = {u: v for u, v in current.items() if u not in moved}
            changes = reconcile.diff(known, now) if self._synced else []
            for event_type, uuid, message, meta in changes:
                name = (now.get(uuid) or known.get(uuid) or ("", ""))[0]
                self.bus.publish(event_type, uuid, message, {**meta, "vm_name": name})
            previous = self.known
            self.known = {**now, **{u: v for u, v in self.known.items() if u in moved}}
            for uuid in previous.keys() | self.known.keys():
                old, new = previous.get(uuid), self.known.get(uuid)
                if old != new:
                    name = (new or old or ("", ""))[0]
                    self._notify(uuid, name, new[1] if new else None)
            self._synced = True
            self.reconciliations += 1
            if changes:
                log.info("reconciliation found {n} missed transitions", n=len(changes))
            return changes

        def done(result: object) -> object:
            self._reconciling = None
            self._moved = None
            return result

        d.addCallback(apply)
        d.addBoth(done)
        self._reconciling = d
        return d

    def _periodic(self) -> defer.Deferred | None:
        if not self.hypervisor.connected or not self._synced:
            return None
        d = self.reconcile()
        d.addErrback(lambda f: log.warn("reconciliation failed: {err}", err=f.getErrorMessage()))
        return d

    # -- service ------------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._periodic)
        self._loop.clock = self.reactor
        self._loop.start(self.reconcile_interval, now=False).addErrback(
            lambda f: log.failure("periodic reconciliation stopped", f)
        )
        if self.hypervisor.connected:
            self.attach(self.hypervisor.conn())

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # Synchronous on purpose: it must happen before the hypervisor closes the connection
        # (the next service to stop), and the daemon serves nothing else by now.
        self.detach()
