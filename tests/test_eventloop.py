"""libvirt event loops on the reactor: both kinds, real libvirt, real pipes and sockets.

libvirt takes one event implementation per process. This process installs the default kind
(or keeps whatever kind an earlier module installed) and runs the shared scenarios of
``tests.eventloop_driver`` in-process; the other kind runs the same scenarios in a child
process. :class:`ReactorEventLoop` is also driven directly through the six callbacks libvirt
would call, without registering it, to pin down the fd, timer and free-callback rules.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import threadable
from twisted.trial import unittest
from zope.interface import implementer

from quantix.hypervisor import eventloop
from quantix.hypervisor.eventloop import (
    ERROR,
    HANGUP,
    READABLE,
    WRITABLE,
    EventLoopConflict,
    ReactorEventLoop,
    install,
)
from tests import eventloop_driver
from tests.libvirtd import real_libvirt_uri

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_process_loop() -> eventloop.EventLoop:
    return eventloop.installed() or install(eventloop.DEFAULT_KIND, reactor)


def other_kind() -> str:
    return "reactor" if in_process_loop().kind == "thread" else "thread"


def turns(n: int = 3) -> defer.Deferred[None]:
    """Let the reactor run *n* iterations (posted calls, then the follow-ups they schedule)."""
    d = defer.succeed(None)
    for _ in range(n):
        d.addCallback(lambda _: task.deferLater(reactor, 0, lambda: None))
    return d


def in_foreign_thread(func: Callable[[], Any]) -> Any:
    """Run *func* in a plain thread while the reactor thread waits for it.

    Everything *func* posts with ``callFromThread`` is therefore still queued when this returns:
    the worst case of a reactor lagging behind libvirt's threads.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = func()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


class InstallTests(unittest.TestCase):
    def test_same_kind_returns_installed_loop(self) -> None:
        loop = in_process_loop()
        self.assertIs(install(loop.kind, reactor), loop)
        self.assertIs(eventloop.installed(), loop)

    def test_other_kind_is_refused(self) -> None:
        in_process_loop()
        with self.assertRaises(EventLoopConflict) as cm:
            install(other_kind(), reactor)
        self.assertIn("one implementation per process", str(cm.exception))

    def test_unknown_kind(self) -> None:
        self.assertRaises(ValueError, install, "glib", reactor)

    @defer.inlineCallbacks
    def test_dispatch_runs_callbacks_on_reactor_thread(self) -> None:
        loop = in_process_loop()
        ran: defer.Deferred[tuple[bool, tuple[Any, ...]]] = defer.Deferred()
        wrapped = loop.dispatch(lambda *a: ran.callback((threadable.isInIOThread(), a)))
        yield threads.deferToThread(wrapped, 1, 2)
        on_reactor, args = yield ran
        self.assertTrue(on_reactor)
        self.assertEqual(args, (1, 2))


class _Scenarios:
    """The same scenarios for both kinds; subclasses say where they run."""

    timeout = 30

    def run_scenario(self, name: str, uri: str | None = None) -> defer.Deferred[Any]:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_public_api_timers_and_handles(self) -> None:
        result = yield self.run_scenario("public_api")
        events = result["handle_events"]
        self.assertTrue(events[0] & READABLE, events)
        self.assertTrue(events[-1] & HANGUP, events)

    @defer.inlineCallbacks
    def test_lifecycle_events_on_test_driver(self) -> None:
        result = yield self.run_scenario("lifecycle_test_driver")
        self.assertEqual([e for e, _ in result["events"]], [0, 2, 3, 4, 5, 1])

    @defer.inlineCallbacks
    def test_rapid_open_close_cycles_real_libvirtd(self) -> None:
        result = yield self.run_scenario("remote_cycles", real_libvirt_uri())
        self.assertEqual(result["cycles"], 30)

    @defer.inlineCallbacks
    def test_daemon_hangup_reaches_close_callback_real_libvirtd(self) -> None:
        yield self.run_scenario("remote_hangup", real_libvirt_uri())

    @defer.inlineCallbacks
    def test_qemu_domain_lifecycle_real_libvirtd(self) -> None:
        result = yield self.run_scenario("qemu_lifecycle", real_libvirt_uri())
        kinds = [e for e, _ in result["events"]]
        for event in (2, 3, 5):  # STARTED, SUSPENDED, STOPPED
            self.assertIn(event, kinds)


class InProcessKindTests(_Scenarios, unittest.TestCase):
    """The kind installed in this process (``thread`` unless another module chose)."""

    def run_scenario(self, name: str, uri: str | None = None) -> defer.Deferred[Any]:
        return eventloop_driver.SCENARIOS[name](reactor, in_process_loop(), uri)

    @defer.inlineCallbacks
    def test_thread_loop_stops_and_restarts(self) -> None:
        loop = in_process_loop()
        if not isinstance(loop, eventloop.ThreadEventLoop):
            raise unittest.SkipTest("the thread kind is not the one installed here")
        self.assertTrue(loop.running)
        loop.stop()
        self.assertFalse(loop.running)
        loop.start()
        self.assertTrue(loop.running)
        yield self.run_scenario("lifecycle_test_driver")


class OtherKindTests(_Scenarios, unittest.TestCase):
    """The kind not installed here, in a child process running its own reactor."""

    @defer.inlineCallbacks
    def run_scenario(self, name: str, uri: str | None = None) -> Any:
        args = ["-m", "tests.eventloop_driver", other_kind(), name] + ([uri] if uri else [])
        out, err, code = yield getProcessOutputAndValue(sys.executable, args, env=dict(os.environ), path=ROOT)
        lines = [line for line in out.decode().splitlines() if line.startswith("{")]
        if code != 0 or not lines:
            self.fail(f"driver exited {code}: {out.decode()}\n{err.decode()}")
        line = json.loads(lines[-1])
        self.assertEqual(line["kind"], other_kind())
        if not line["ok"]:
            self.fail(line["error"])
        return line["result"]


@implementer(IReadDescriptor)
class Bystander:
    """Some other reader of the reactor's, e.g. a socket that got a recycled fd number."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.reads = 0

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        self.reads += 1
        os.read(self.fd, 64)

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "bystander"


class Recorder:
    """libvirt's side of a watch or timer: records callbacks and freed opaques."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.freed: list[Any] = []
        self.on_call: Callable[..., None] | None = None

    def cb(self, *args: Any) -> None:
        self.calls.append(args)
        if self.on_call is not None:
            self.on_call(*args)

    def free(self, opaque: Any) -> None:
        self.freed.append(opaque)

    def seen(self, watch: int) -> list[int]:
        return [c[2] for c in self.calls if c[0] == watch]


class ReactorEventLoopTests(unittest.TestCase):
    """The reactor implementation driven directly, as libvirt's threads would call it."""

    timeout = 10

    def setUp(self) -> None:
        self.rec = Recorder()
        self.loop = ReactorEventLoop(reactor, free=self.rec.free)
        self.fds: list[int] = []

    @defer.inlineCallbacks
    def tearDown(self) -> None:
        yield self.loop.drain()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.assertEqual(self._descriptors(), [])

    def close(self, fd: int) -> None:
        """Close one of our fds now (tearDown must not close its number again: it may be reused)."""
        self.fds.remove(fd)
        os.close(fd)

    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.fds += [r, w]
        return r, w

    def socketpair(self) -> tuple[int, int]:
        a, b = socket.socketpair()
        self.fds += [a.detach(), b.detach()]
        return self.fds[-2], self.fds[-1]

    def _descriptors(self, fd: int | None = None) -> list[Any]:
        found = {
            d
            for d in reactor.getReaders() + reactor.getWriters()
            if isinstance(d, eventloop._Descriptor) and d._loop is self.loop
        }
        return [d for d in found if fd is None or d.fd == fd]

    def until(self, cond: Callable[[], bool]) -> defer.Deferred[None]:
        @defer.inlineCallbacks
        def poll() -> Any:
            while not cond():
                yield task.deferLater(reactor, 0.001, lambda: None)

        return poll()

    # -- timers --

    @defer.inlineCallbacks
    def test_zero_timer_fires_every_iteration_until_disabled(self) -> None:
        def on_call(timer: int, opaque: Any) -> None:
            if len(self.rec.calls) == 5:
                self.loop._update_timeout(timer, -1)

        self.rec.on_call = on_call
        timer = self.loop._add_timeout(0, self.rec.cb, "op")
        yield self.until(lambda: len(self.rec.calls) >= 5)
        yield turns()
        self.assertEqual(self.rec.calls, [(timer, "op")] * 5)
        self.assertEqual(self.loop._remove_timeout(timer), 0)

    @defer.inlineCallbacks
    def test_positive_timer_is_periodic(self) -> None:
        timer = self.loop._add_timeout(1, self.rec.cb, "op")
        yield self.until(lambda: len(self.rec.calls) >= 3)
        self.loop._remove_timeout(timer)
        fired = len(self.rec.calls)
        yield turns()
        self.assertEqual(len(self.rec.calls), fired)

    @defer.inlineCallbacks
    def test_disabled_timer_holds_no_delayed_call(self) -> None:
        timer = self.loop._add_timeout(-1, self.rec.cb, "op")
        yield turns()
        self.assertEqual(self.rec.calls, [])
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.func == self.loop._fire_timer], [])
        in_foreign_thread(lambda: self.loop._update_timeout(timer, 0))  # re-armed from a thread
        yield self.until(lambda: bool(self.rec.calls))
        self.loop._update_timeout(timer, -1)
        yield turns()
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.func == self.loop._fire_timer], [])
        self.loop._remove_timeout(timer)

    @defer.inlineCallbacks
    def test_free_callbacks_run_later_never_inside_remove(self) -> None:
        r, _w = self.pipe()
        timer = self.loop._add_timeout(-1, self.rec.cb, "timer-op")
        watch = self.loop._add_handle(r, READABLE, self.rec.cb, "watch-op")
        self.assertEqual(self.loop._remove_timeout(timer), 0)
        self.assertEqual(self.loop._remove_handle(watch), 0)
        self.assertEqual(self.rec.freed, [])
        self.assertEqual(self.loop._remove_handle(watch), -1)  # unknown now
        self.assertEqual(self.loop._remove_timeout(timer), -1)
        yield self.loop.drain()
        self.assertEqual(sorted(self.rec.freed), ["timer-op", "watch-op"])

        # From a foreign thread too: the free is queued for the reactor, not run by the remover.
        watch = self.loop._add_handle(r, READABLE, self.rec.cb, "again")
        freed_in_thread = in_foreign_thread(
            lambda: (self.loop._remove_handle(watch), list(self.rec.freed))[1]
        )
        self.assertNotIn("again", freed_in_thread)
        yield self.loop.drain()
        self.assertIn("again", self.rec.freed)

    @defer.inlineCallbacks
    def test_ids_are_allocated_synchronously_in_any_thread(self) -> None:
        r, w = self.pipe()

        def register() -> tuple[int, int]:
            return self.loop._add_handle(r, READABLE, self.rec.cb, None), self.loop._add_timeout(
                -1, self.rec.cb, None
            )

        ids = [in_foreign_thread(register) for _ in range(3)]
        flat = [i for pair in ids for i in pair]
        self.assertEqual(len(set(flat)), 6)
        self.assertTrue(all(i > 0 for i in flat))
        yield turns()
        os.write(w, b"x")
        yield self.until(lambda: len(self.rec.calls) >= 3)
        self.assertEqual(sorted(c[0] for c in self.rec.calls[:3]), [p[0] for p in ids])
        for watch, timer in ids:
            self.loop._remove_handle(watch)
            self.loop._remove_timeout(timer)

    # -- handles --

    @defer.inlineCallbacks
    def test_one_descriptor_multiplexes_watches_on_an_fd(self) -> None:
        a, b = self.socketpair()
        reader = self.loop._add_handle(a, READABLE, self.rec.cb, None)
        writer = self.loop._add_handle(a, WRITABLE, self.rec.cb, None)
        (desc,) = self._descriptors(a)
        self.assertIn(desc, reactor.getReaders())
        self.assertIn(desc, reactor.getWriters())

        self.rec.on_call = lambda watch, fd, ev, op: watch == writer and self.loop._update_handle(writer, 0)
        yield self.until(lambda: bool(self.rec.seen(writer)))
        self.assertEqual(self.rec.seen(writer), [WRITABLE])
        self.assertNotIn(desc, reactor.getWriters())
        self.assertEqual(self.rec.seen(reader), [])

        self.rec.on_call = lambda watch, fd, ev, op: os.read(fd, 64)
        os.write(b, b"x")
        yield self.until(lambda: bool(self.rec.seen(reader)))
        self.assertEqual(self.rec.seen(reader), [READABLE])
        self.assertTrue(all(c[1] == a for c in self.rec.calls))  # libvirt's fd, not our dup
        self.assertEqual(self._descriptors(a), [desc])

        self.loop._update_handle(reader, 0)
        self.assertEqual(self._descriptors(a), [])  # nothing wanted: out of the reactor
        self.loop._remove_handle(reader)
        self.loop._remove_handle(writer)

    @defer.inlineCallbacks
    def test_callback_may_remove_a_sibling_watch(self) -> None:
        r, w = self.pipe()
        first = self.loop._add_handle(r, READABLE, self.rec.cb, None)
        second = self.loop._add_handle(r, READABLE, self.rec.cb, None)

        def on_call(watch: int, fd: int, ev: int, op: Any) -> None:
            os.read(fd, 64)
            self.loop._remove_handle(second)

        self.rec.on_call = on_call
        os.write(w, b"x")
        yield self.until(lambda: bool(self.rec.calls))
        yield turns()
        self.assertEqual(self.rec.seen(first), [READABLE])
        self.assertEqual(self.rec.seen(second), [])
        self.loop._remove_handle(first)

    @defer.inlineCallbacks
    def test_failing_callback_keeps_the_descriptor(self) -> None:
        r, w = self.pipe()
        watch = self.loop._add_handle(r, READABLE, self.rec.cb, None)

        def on_call(*args: Any) -> None:
            os.read(r, 64)
            raise ZeroDivisionError("callback bug")

        self.rec.on_call = on_call
        os.write(w, b"x")
        yield self.until(lambda: bool(self.rec.calls))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(len(self._descriptors(r)), 1)
        self.loop._remove_handle(watch)

    @defer.inlineCallbacks
    def test_hangup_reaches_libvirt(self) -> None:
        r, w = self.pipe()
        watch = self.loop._add_handle(r, READABLE, self.rec.cb, None)
        self.rec.on_call = lambda watch, fd, ev, op: self.loop._remove_handle(watch)
        self.close(w)
        yield self.until(lambda: bool(self.rec.calls))
        self.assertEqual(self.rec.seen(watch), [HANGUP | ERROR])

    @defer.inlineCallbacks
    def test_error_reaches_libvirt(self) -> None:
        r, w = self.pipe()
        watch = self.loop._add_handle(w, WRITABLE, self.rec.cb, None)
        self.rec.on_call = lambda watch, fd, ev, op: self.loop._update_handle(watch, 0)
        yield self.until(lambda: bool(self.rec.calls))  # writable at once
        self.close(r)
        self.rec.on_call = lambda watch, fd, ev, op: self.loop._remove_handle(watch)
        self.loop._update_handle(watch, WRITABLE)
        yield self.until(lambda: len(self.rec.calls) >= 2)
        self.assertEqual(self.rec.seen(watch), [WRITABLE, HANGUP | ERROR])

    @defer.inlineCallbacks
    def test_reused_fd_number_never_loses_someone_elses_descriptor(self) -> None:
        """libvirt removes its watch from a thread and closes the fd; before the reactor catches
        up, another reader of the reactor's gets the same fd number. It must keep working."""
        a, _b = self.socketpair()
        watch = self.loop._add_handle(a, READABLE, self.rec.cb, None)
        yield turns(1)

        def libvirt_thread() -> None:
            self.loop._remove_handle(watch)
            self.close(a)

        c, d = socket.socketpair()  # made first, so that neither takes the number itself
        in_foreign_thread(libvirt_thread)  # its reactor updates are still queued
        os.dup2(c.fileno(), a)  # the recycled number, now another socket's
        bystander = Bystander(a)
        reactor.addReader(bystander)
        try:
            yield turns()
            self.assertIn(bystander, reactor.getReaders())
            self.assertEqual(self._descriptors(), [])
            d.send(b"ping")
            yield self.until(lambda: bystander.reads > 0)
            self.assertEqual(self.rec.calls, [])
        finally:
            reactor.removeReader(bystander)
            for sock_fd in (a, c.detach(), d.detach()):
                os.close(sock_fd)

    @defer.inlineCallbacks
    def test_reused_fd_number_within_libvirt_gets_a_fresh_descriptor(self) -> None:
        """Remove, close, reopen under the same number and watch again, all from one thread
        before the reactor runs: only the new watch hears the new file."""
        r1, _w1 = self.pipe()
        old = self.loop._add_handle(r1, READABLE, self.rec.cb, None)
        yield turns(1)
        r2, w2 = self.pipe()

        def libvirt_thread() -> int:
            self.loop._remove_handle(old)
            os.dup2(r2, r1)  # closes the old file and reuses its number
            return self.loop._add_handle(r1, READABLE, self.rec.cb, None)

        new = in_foreign_thread(libvirt_thread)
        self.rec.on_call = lambda watch, fd, ev, op: os.read(fd, 64)
        yield turns()
        self.assertEqual(len(self._descriptors(r1)), 1)
        os.write(w2, b"x")
        yield self.until(lambda: bool(self.rec.calls))
        self.assertEqual(self.rec.seen(new), [READABLE])
        self.assertEqual(self.rec.seen(old), [])
        self.loop._remove_handle(new)

    @defer.inlineCallbacks
    def test_fd_reused_without_removing_old_watch_is_kept_apart(self) -> None:
        r1, _w1 = self.pipe()
        r2, w2 = self.pipe()
        old = self.loop._add_handle(r1, READABLE, self.rec.cb, None)
        os.dup2(r2, r1)  # another file under the same number, old watch still registered
        new = self.loop._add_handle(r1, READABLE, self.rec.cb, None)
        self.assertEqual(len(self._descriptors(r1)), 2)
        self.rec.on_call = lambda watch, fd, ev, op: watch == new and os.read(fd, 64)
        os.write(w2, b"x")
        yield self.until(lambda: bool(self.rec.seen(new)))
        self.assertEqual(self.rec.seen(old), [])
        self.loop._remove_handle(old)
        self.loop._remove_handle(new)
