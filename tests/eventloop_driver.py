"""Event-loop scenarios that run against whichever libvirt event loop the process installed.

libvirt takes one event implementation per process, so the test module runs these in-process
for the kind it installed and, for the other kind, in a child process::

    python -m tests.eventloop_driver KIND SCENARIO [URI]

which prints one JSON line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.
Each scenario is ``scenario(reactor, loop, uri) -> Deferred[dict]`` and raises on a failed check.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

import libvirt
from twisted.internet import defer, task, threads
from twisted.python import threadable

from quantix.hypervisor.eventloop import HANGUP, READABLE, EventLoop, ReactorEventLoop, install
from tests.libvirtd import tiny_domain_xml, unique_name

LIFECYCLE = libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE
TIMEOUT = 10.0


class Check(AssertionError):
    pass


def check(cond: object, msg: str) -> None:
    if not cond:
        raise Check(msg)


class Events:
    """Lifecycle events of one domain, recorded on the reactor with the thread they ran on."""

    def __init__(self, reactor: Any, name: str) -> None:
        self.reactor, self.name = reactor, name
        self.seen: list[tuple[int, int]] = []
        self.off_reactor = 0
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred[None]]] = []

    def callback(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        if not threadable.isInIOThread():
            self.off_reactor += 1
        if dom.name() != self.name:
            return
        self.seen.append((event, detail))
        for cond, d in list(self._waiters):
            if cond():
                self._waiters.remove((cond, d))
                d.callback(None)

    def wait_for(self, event: int) -> defer.Deferred[None]:
        def cond() -> bool:
            return any(e == event for e, _ in self.seen)

        d: defer.Deferred[None] = defer.Deferred()
        if cond():
            d.callback(None)
        else:
            self._waiters.append((cond, d))
        return d.addTimeout(TIMEOUT, self.reactor)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _our_delayed_calls(reactor: Any, loop: EventLoop) -> list[Any]:
    return [c for c in reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is loop]


@defer.inlineCallbacks
def _settle(
    reactor: Any, loop: EventLoop, cond: Callable[[], bool], why: Callable[[], str] = lambda: "did not settle"
) -> Any:
    """Let the loop finish late removals and frees, then wait (bounded) for *cond*."""
    if isinstance(loop, ReactorEventLoop):
        yield loop.drain().addTimeout(TIMEOUT, reactor)
    for _ in range(int(TIMEOUT / 0.01)):
        if cond():
            return
        yield task.deferLater(reactor, 0.01, lambda: None)
    check(cond(), why())


@defer.inlineCallbacks
def lifecycle_test_driver(reactor: Any, loop: EventLoop, uri: str | None) -> Any:
    """Domain events of the in-process test driver, calls made from pool threads."""
    name, xml = tiny_domain_xml(domain_type="test")
    events = Events(reactor, name)
    conn = yield threads.deferToThread(libvirt.open, "test:///default")
    cb_id = yield threads.deferToThread(
        conn.domainEventRegisterAny, None, LIFECYCLE, loop.dispatch(events.callback), None
    )
    dom = None
    try:
        dom = yield threads.deferToThread(conn.defineXML, xml)
        yield events.wait_for(libvirt.VIR_DOMAIN_EVENT_DEFINED)
        for call, event in [
            (dom.create, libvirt.VIR_DOMAIN_EVENT_STARTED),
            (dom.suspend, libvirt.VIR_DOMAIN_EVENT_SUSPENDED),
            (dom.resume, libvirt.VIR_DOMAIN_EVENT_RESUMED),
            (dom.destroy, libvirt.VIR_DOMAIN_EVENT_STOPPED),
            (dom.undefine, libvirt.VIR_DOMAIN_EVENT_UNDEFINED),
        ]:
            yield threads.deferToThread(call)
            yield events.wait_for(event)
    finally:
        yield threads.deferToThread(conn.domainEventDeregisterAny, cb_id)
        yield threads.deferToThread(conn.close)
        del dom, conn
    return (yield _all_on_reactor_and_idle(reactor, loop, events))


@defer.inlineCallbacks
def remote_cycles(reactor: Any, loop: EventLoop, uri: str | None, cycles: int = 30) -> Any:
    """Rapid open/register/deregister/close cycles on the remote driver, three at a time.

    Afterwards the process holds no extra fds, the reactor no extra readers, writers or timers.
    """
    assert uri
    calls = {"n": 0}

    def cycle() -> None:
        conn = libvirt.open(uri)
        try:
            conn.setKeepAlive(5, 3)
            cb_id = conn.domainEventRegisterAny(None, LIFECYCLE, loop.dispatch(lambda *a: None), None)
            conn.registerCloseCallback(loop.dispatch(lambda *a: None), None)
            conn.getLibVersion()
            calls["n"] += 1
            conn.unregisterCloseCallback()
            conn.domainEventDeregisterAny(cb_id)
        finally:
            conn.close()

    yield threads.deferToThread(cycle)  # warm-up: libvirt keeps a few process-wide fds
    yield _settle(reactor, loop, lambda: True)
    fds, readers, writers = _fd_count(), set(reactor.getReaders()), set(reactor.getWriters())
    sem = defer.DeferredSemaphore(3)
    yield defer.gatherResults(
        [sem.run(threads.deferToThread, cycle) for _ in range(cycles)], consumeErrors=True
    )

    def leftovers() -> dict[str, Any]:
        # "<=": something opened before the baseline may still be closing, never more.
        left = {
            "fds": _fd_count() - fds,
            "readers": [repr(r) for r in set(reactor.getReaders()) - readers],
            "writers": [repr(w) for w in set(reactor.getWriters()) - writers],
            "timers": [repr(c) for c in _our_delayed_calls(reactor, loop)],
        }
        return {k: v for k, v in left.items() if v and not (k == "fds" and v <= 0)}

    yield _settle(reactor, loop, lambda: not leftovers(), lambda: f"leftovers after cycles: {leftovers()}")
    check(calls["n"] == cycles + 1, f"only {calls['n']} cycles ran")
    result = {"cycles": cycles, "fds": _fd_count()}
    if isinstance(loop, ReactorEventLoop):
        check(loop.is_idle(), f"leftovers: {loop.counts()}")
    return result


@defer.inlineCallbacks
def qemu_lifecycle(reactor: Any, loop: EventLoop, uri: str | None) -> Any:
    """A tiny TCG domain started and destroyed on the real daemon; events on the reactor."""
    assert uri
    name, xml = tiny_domain_xml(unique_name())
    events = Events(reactor, name)
    conn = yield threads.deferToThread(libvirt.open, uri)
    cb_id = yield threads.deferToThread(
        conn.domainEventRegisterAny, None, LIFECYCLE, loop.dispatch(events.callback), None
    )
    dom = None
    try:
        dom = yield threads.deferToThread(conn.defineXML, xml)
        yield threads.deferToThread(dom.create)
        yield events.wait_for(libvirt.VIR_DOMAIN_EVENT_STARTED)
        yield threads.deferToThread(dom.suspend)
        yield events.wait_for(libvirt.VIR_DOMAIN_EVENT_SUSPENDED)
        yield threads.deferToThread(dom.destroy)
        yield events.wait_for(libvirt.VIR_DOMAIN_EVENT_STOPPED)
    finally:
        if dom is not None:
            yield threads.deferToThread(_destroy_and_undefine, dom)
        yield threads.deferToThread(conn.domainEventDeregisterAny, cb_id)
        yield threads.deferToThread(conn.close)
        # The connection lives on (with its socket and timers) while a domain object refers to it.
        del dom, conn
    return (yield _all_on_reactor_and_idle(reactor, loop, events))


@defer.inlineCallbacks
def _all_on_reactor_and_idle(reactor: Any, loop: Any, events: Any):
    """Common end of the event scenarios: every callback ran on the reactor, nothing is left."""
    check(events.off_reactor == 0, f"{events.off_reactor} callbacks ran off the reactor thread")
    yield _settle(reactor, loop, lambda: not _our_delayed_calls(reactor, loop))
    if isinstance(loop, ReactorEventLoop):
        check(loop.is_idle(), f"leftovers: {loop.counts()}")
    return {"events": events.seen}


def _socket_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                found.add(int(name))
        except OSError:
            pass
    return found


@defer.inlineCallbacks
def remote_hangup(reactor: Any, loop: EventLoop, uri: str | None) -> Any:
    """The daemon's socket is shut down under an open connection: the event loop notices and
    libvirt's close callback runs on the reactor thread; nothing is left behind."""
    assert uri

    def open_conn() -> tuple[Any, set[int]]:
        before = _socket_fds()
        conn = libvirt.open(uri)
        return conn, _socket_fds() - before

    conn, sockets = yield threads.deferToThread(open_conn)
    check(sockets, "no new socket for the connection")
    closed: defer.Deferred[tuple[int, bool]] = defer.Deferred()
    yield threads.deferToThread(
        conn.registerCloseCallback,
        loop.dispatch(
            lambda c, reason, o: closed.called or closed.callback((reason, threadable.isInIOThread()))
        ),
        None,
    )
    for fd in sockets:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    reason, on_reactor = yield closed.addTimeout(TIMEOUT, reactor)
    check(on_reactor, "close callback ran off the reactor thread")
    check(
        reason in (libvirt.VIR_CONNECT_CLOSE_REASON_EOF, libvirt.VIR_CONNECT_CLOSE_REASON_ERROR),
        f"close reason {reason}",
    )
    try:
        yield threads.deferToThread(conn.unregisterCloseCallback)
    except libvirt.libvirtError:
        pass
    yield threads.deferToThread(conn.close)
    del conn
    yield _settle(reactor, loop, lambda: not _our_delayed_calls(reactor, loop))
    if isinstance(loop, ReactorEventLoop):
        check(loop.is_idle(), f"leftovers: {loop.counts()}")
    return {"reason": reason}


def _destroy_and_undefine(dom: Any) -> None:
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError:
        pass
    try:
        dom.undefine()
    except libvirt.libvirtError:
        pass


@defer.inlineCallbacks
def public_api(reactor: Any, loop: EventLoop, uri: str | None) -> Any:
    """libvirt's public virEvent* API through the installed loop: periodic, 0 and -1 timers,
    and a pipe watch that sees data and then the hang-up."""
    lock = threading.Lock()
    fired = {"timer": 0, "handle": []}

    def on_timer(timer: int, opaque: Any) -> None:
        with lock:
            fired["timer"] += 1

    def on_handle(watch: int, fd: int, events: int, opaque: Any) -> None:
        with lock:
            fired["handle"].append(events)
        if events & READABLE:
            os.read(fd, 1)  # drain; b'' after the hang-up
        if events & HANGUP:
            libvirt.virEventUpdateHandle(watch, 0)  # stop hearing about it

    def count() -> int:
        with lock:
            return fired["timer"]

    @defer.inlineCallbacks
    def until(cond: Callable[[], bool], what: str) -> Any:
        for _ in range(int(TIMEOUT / 0.005)):
            if cond():
                return
            yield task.deferLater(reactor, 0.005, lambda: None)
        check(cond(), f"timed out waiting for {what}")

    timer = libvirt.virEventAddTimeout(5, on_timer, None)
    yield until(lambda: count() >= 3, "a periodic timer to fire 3 times")
    libvirt.virEventUpdateTimeout(timer, -1)
    yield task.deferLater(reactor, 0.02, lambda: None)
    disabled_at = count()
    yield task.deferLater(reactor, 0.05, lambda: None)
    check(count() == disabled_at, "a disabled timer fired")
    libvirt.virEventUpdateTimeout(timer, 0)
    yield until(lambda: count() >= disabled_at + 20, "a 0 ms timer to fire 20 times")
    libvirt.virEventRemoveTimeout(timer)

    r, w = os.pipe()
    try:
        watch = libvirt.virEventAddHandle(r, READABLE, on_handle, None)
        os.write(w, b"x")
        yield until(lambda: bool(fired["handle"]), "a readable pipe")
        os.close(w)
        w = -1
        yield until(lambda: any(e & HANGUP for e in fired["handle"]), "the hang-up")
        libvirt.virEventRemoveHandle(watch)
        yield _settle(reactor, loop, lambda: not _our_delayed_calls(reactor, loop))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return {"timer_fires": count(), "handle_events": fired["handle"]}


SCENARIOS: dict[str, Callable[..., defer.Deferred[Any]]] = {
    "lifecycle_test_driver": lifecycle_test_driver,
    "remote_cycles": remote_cycles,
    "qemu_lifecycle": qemu_lifecycle,
    "public_api": public_api,
    "remote_hangup": remote_hangup,
}


def main(argv: list[str]) -> None:
    kind, name = argv[0], argv[1]
    uri = argv[2] if len(argv) > 2 else None
    from twisted.internet import reactor

    loop = install(kind, reactor)

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        try:
            result = yield SCENARIOS[name](reactor, loop, uri)
            line = {"ok": True, "kind": loop.kind, "result": result}
        except Exception:
            line = {"ok": False, "kind": loop.kind, "error": traceback.format_exc()}
        print(json.dumps(line), flush=True)

    task.react(run)


if __name__ == "__main__":
    main(sys.argv[1:])
