"""libvirt event loops that deliver domain events to the Twisted reactor.

libvirt accepts one event implementation per process, registered before the first
``libvirt.open``. Two are offered, chosen by ``hypervisor.event_loop``:

``thread`` (default)
    libvirt's own loop (``virEventRegisterDefaultImpl``) run by ``virEventRunDefaultImpl`` in one
    daemon thread. Keepalive is answered even while the reactor is busy, and it costs less CPU
    than the reactor loop under load.

``reactor``
    :class:`ReactorEventLoop`, an implementation on the reactor itself: no extra thread.

Either way domain-event callbacks must run on the reactor thread: wrap every callback handed to
libvirt (``domainEventRegisterAny``, ``registerCloseCallback``) with :meth:`EventLoop.dispatch`.

Rules followed by :class:`ReactorEventLoop` (libvirt calls it from any thread, while holding its
own locks): tables are changed synchronously under a lock and ids are allocated at once; reactor
changes are made directly on the reactor thread and otherwise posted with ``callFromThread``
(never a blocking hop, which could deadlock against libvirt's client lock); free callbacks run
on a later reactor turn, never inside a remove; timers are periodic, 0 means every reactor
iteration and -1 disabled; one reactor descriptor per fd carries all watches on it, and a
hang-up or error the reactor reports reaches libvirt as ``HANGUP|ERROR``.

This module keeps its own thread plumbing (``callFromThread`` and the ``thread`` loop's daemon
thread) instead of going through :mod:`quantix.bridge`: libvirt calls into it from its own
threads while holding its locks, so these hops follow libvirt's rules, not a box facade's.

File descriptor reuse: libvirt may close an fd right after removing its watch, before the
reactor has processed the removal, and the number may then belong to another socket that the
reactor already tracks (the reactor keys its tables by fd number). So each registration
generation watches a private ``dup`` of libvirt's fd, owned and closed by this module after the
reactor has forgotten it: a stale removal can never touch a descriptor that someone else owns.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import libvirt
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor, IWriteDescriptor
from twisted.logger import Logger
from twisted.python import threadable
from zope.interface import implementer

from quantix.util.reactor import INodeReactor

log = Logger()


READABLE = libvirt.VIR_EVENT_HANDLE_READABLE
WRITABLE = libvirt.VIR_EVENT_HANDLE_WRITABLE
ERROR = libvirt.VIR_EVENT_HANDLE_ERROR
HANGUP = libvirt.VIR_EVENT_HANDLE_HANGUP

KINDS = ("thread", "reactor")
DEFAULT_KIND = "thread"

# A 0 ms timer firing more often than this per second points to a stuck libvirt state.
_SPIN_WARN_PER_SECOND = 1000


class EventLoopConflict(RuntimeError):
    """A different libvirt event loop is already installed in this process."""


class EventLoop:
    """What the rest of the daemon needs from either kind."""

    kind = ""

    def __init__(self, reactor: INodeReactor) -> None:
        self.reactor = reactor

    def register(self) -> None:
        """Register with libvirt; once per process, before the first ``libvirt.open``."""
        raise NotImplementedError

    def stop(self) -> None:
        """Release what the loop holds at shutdown (libvirt cannot unregister it)."""

    def dispatch(self, func: Callable[..., object]) -> Callable[..., None]:
        """Wrap a libvirt callback so that *func* runs on the reactor thread.

        Called on the reactor thread (always the case with the reactor loop) the wrapper calls
        *func* at once; from any other thread it posts the call with ``callFromThread``.
        """

        def on_reactor(*args: object, **kwargs: object) -> None:
            if threadable.isInIOThread():
                try:
                    func(*args, **kwargs)
                except Exception:
                    log.failure("libvirt callback {func!r} failed", func=func)
            else:
                self.reactor.callFromThread(func, *args, **kwargs)

        return on_reactor


class ThreadEventLoop(EventLoop):
    """libvirt's default event loop, run in one dedicated daemon thread.

    The thread never touches the reactor itself; callbacks reach it through :meth:`dispatch`.
    :meth:`stop` asks the thread to leave (a 0 ms libvirt timeout wakes it up) and waits briefly;
    the thread is a daemon thread so a stuck libvirt call cannot hold the process at exit.
    """

    kind = "thread"

    def __init__(self, reactor: INodeReactor) -> None:
        super().__init__(reactor)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._registered = False

    def register(self) -> None:
        libvirt.virEventRegisterDefaultImpl()
        self._registered = True
        self.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start (or restart after :meth:`stop`) the loop thread."""
        if not self._registered:
            raise RuntimeError("register() the default implementation before starting its thread")
        if self.running:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="libvirt-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                libvirt.virEventRunDefaultImpl()
            except libvirt.libvirtError as e:
                log.error("libvirt event loop iteration failed: {e}", e=e)
                self._stopping.wait(0.1)  # never spin on a persistent error

    def stop(self, timeout: float = 2.0) -> None:
        thread = self._thread
        if thread is None or not thread.is_alive():
            return
        self._stopping.set()
        libvirt.virEventAddTimeout(0, _remove_own_timeout, None)  # wakes the poll
        thread.join(timeout)
        if thread.is_alive():
            log.warn("libvirt event thread did not stop within {timeout}s", timeout=timeout)


def _remove_own_timeout(timer: int, opaque: object) -> None:
    libvirt.virEventRemoveTimeout(timer)


class _Watch:
    """One libvirt handle watch; ``desc`` is the descriptor generation it belongs to."""

    __slots__ = ("cb", "desc", "events", "fd", "opaque", "watch")

    def __init__(self, watch: int, fd: int, events: int, cb: Callable, opaque: object, desc: _Descriptor):
        self.watch, self.fd, self.events = watch, fd, events
        self.cb, self.opaque, self.desc = cb, opaque, desc


@implementer(IReadDescriptor, IWriteDescriptor)
class _Descriptor:
    """The reactor's view of one libvirt fd: a private dup multiplexing all watches on it.

    Fields guarded by the loop lock: ``watches``, ``retired``, ``sync_pending``. Fields used on
    the reactor thread only: ``reading``, ``writing``, ``_dup``.
    """

    def __init__(self, loop: ReactorEventLoop, fd: int, dup: int, ident: tuple[int, int]) -> None:
        self._loop = loop
        self.fd = fd
        self.ident = ident
        self._dup = dup
        self.watches: dict[int, _Watch] = {}
        self.retired = False
        self.sync_pending = False
        self.reading = self.writing = False

    def fileno(self) -> int:
        return self._dup

    @property
    def closed(self) -> bool:
        return self._dup < 0

    def close(self) -> None:
        if self._dup >= 0:
            os.close(self._dup)
            self._dup = -1

    def logPrefix(self) -> str:
        return f"libvirt-fd-{self.fd}"

    def doRead(self) -> None:
        self._loop._dispatch_fd(self, READABLE)

    def doWrite(self) -> None:
        self._loop._dispatch_fd(self, WRITABLE)

    def connectionLost(self, reason: object) -> None:
        # The reactor has already dropped us (hang-up or error without pending input). Tell
        # libvirt, which normally removes the watch; the dead fd stays out of the reactor until
        # libvirt changes the watch's events, so it cannot spin.
        self.reading = self.writing = False
        self._loop._dispatch_fd(self, HANGUP | ERROR)

    def __repr__(self) -> str:
        return f"<libvirt fd {self.fd} (dup {self._dup}) watches={sorted(self.watches)}>"


class _Timer:
    """One libvirt timeout. ``interval``/``removed``/``dirty`` are guarded by the loop lock."""

    __slots__ = ("call", "cb", "dirty", "interval", "opaque", "removed", "spin", "sync_pending", "timer")

    def __init__(self, timer: int, interval: int, cb: Callable, opaque: object) -> None:
        self.timer, self.interval, self.cb, self.opaque = timer, interval, cb, opaque
        self.removed = False
        self.dirty = True  # (re-)arm from now at the next sync
        self.sync_pending = False
        self.call: IDelayedCall | None = None  # reactor thread only
        self.spin = [0.0, 0]  # window start, 0 ms firings in it


class ReactorEventLoop(EventLoop):
    """A libvirt event implementation running on the Twisted reactor.

    The six ``_add_handle`` ... ``_remove_timeout`` methods are what libvirt calls; tests drive
    them directly. *free* runs the opaque's free callback (injectable for those tests).
    """

    kind = "reactor"

    def __init__(
        self, reactor: INodeReactor, free: Callable[[object], None] = libvirt.virEventInvokeFreeCallback
    ) -> None:
        super().__init__(reactor)
        self._free = free
        self._lock = threading.Lock()
        self._next_id = 1
        self._watches: dict[int, _Watch] = {}
        self._timers: dict[int, _Timer] = {}
        self._live: dict[int, _Descriptor] = {}  # libvirt fd -> its current generation
        self._open: set[_Descriptor] = set()  # generations whose dup is still open
        self._pending_frees = 0
        self._idle_waiters: list[defer.Deferred[None]] = []

    def register(self) -> None:
        libvirt.virEventRegisterImpl(
            self._add_handle,
            self._update_handle,
            self._remove_handle,
            self._add_timeout,
            self._update_timeout,
            self._remove_timeout,
        )

    # -- introspection, for shutdown and leak tests ---------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {
                "handles": len(self._watches),
                "timers": len(self._timers),
                "descriptors": len(self._open),
                "pending_frees": self._pending_frees,
            }

    def is_idle(self) -> bool:
        """Nothing registered, no dup open, no free callback outstanding."""
        return not any(self.counts().values())

    def drain(self) -> defer.Deferred[None]:
        """Fire (on the reactor thread) once :meth:`is_idle` holds; libvirt may need a few turns
        after ``close()`` to drop its last handles and timers."""
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    def _check_idle(self) -> None:
        if self._idle_waiters and self.is_idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    # -- helpers --------------------------------------------------------------------------------

    def _allocate_id(self) -> int:  # lock held
        ident = self._next_id
        self._next_id += 1
        return ident

    def _free_later(self, opaque: object) -> None:
        """Run the free callback on a later turn: libvirt may hold the lock it needs right now."""
        with self._lock:
            self._pending_frees += 1
        if threadable.isInIOThread():
            self.reactor.callLater(0, self._run_free, opaque)
        else:
            self.reactor.callFromThread(self._run_free, opaque)

    def _run_free(self, opaque: object) -> None:
        try:
            self._free(opaque)
        except Exception:
            log.failure("libvirt free callback failed")
        with self._lock:
            self._pending_frees -= 1
        self._check_idle()

    # -- handles --------------------------------------------------------------------------------

    def _add_handle(self, fd: int, events: int, cb: Callable, opaque: object) -> int:
        try:
            ident = _file_ident(fd)
        except OSError as e:
            log.error("libvirt asked to watch unusable fd {fd}: {e}", fd=fd, e=e)
            return -1
        with self._lock:
            desc = self._live.get(fd)
            if desc is not None and desc.ident != ident:
                # The number now names another file while the old generation still has watches
                # (libvirt closed it without removing them). Keep the two apart.
                del self._live[fd]
                desc = None
            if desc is None:
                try:
                    dup = os.dup(fd)
                except OSError as e:
                    log.error("cannot duplicate libvirt fd {fd}: {e}", fd=fd, e=e)
                    return -1
                desc = self._live[fd] = _Descriptor(self, fd, dup, ident)
                self._open.add(desc)
            watch = self._allocate_id()
            w = _Watch(watch, fd, events, cb, opaque, desc)
            self._watches[watch] = w
            desc.watches[watch] = w
            post = self._mark_fd(desc)
        self._sync_fd_soon(desc, post)
        return watch

    def _update_handle(self, watch: int, events: int) -> None:
        with self._lock:
            w = self._watches.get(watch)
            if w is None or w.events == events:
                return
            w.events = events
            post = self._mark_fd(w.desc)
        self._sync_fd_soon(w.desc, post)

    def _remove_handle(self, watch: int) -> int:
        with self._lock:
            w = self._watches.pop(watch, None)
            if w is None:
                return -1
            desc = w.desc
            del desc.watches[watch]
            if not desc.watches:
                desc.retired = True
                if self._live.get(desc.fd) is desc:
                    del self._live[desc.fd]
            post = self._mark_fd(desc)
        self._sync_fd_soon(desc, post)
        self._free_later(w.opaque)
        return 0

    @staticmethod
    def _mark_fd(desc: _Descriptor) -> bool:  # lock held; True when a sync must be posted
        if desc.sync_pending:
            return False
        desc.sync_pending = True
        return True

    def _sync_fd_soon(self, desc: _Descriptor, post: bool) -> None:
        if threadable.isInIOThread():
            self._sync_fd(desc)
        elif post:
            self.reactor.callFromThread(self._sync_fd, desc)

    def _sync_fd(self, desc: _Descriptor) -> None:
        """Reactor thread: make the reactor's registration match the watches' latest state."""
        with self._lock:
            desc.sync_pending = False
            wanted = 0
            for w in desc.watches.values():
                wanted |= w.events
            retired = desc.retired
        if desc.closed:
            return
        reactor = self.reactor
        try:
            if bool(wanted & READABLE) != desc.reading:
                desc.reading = not desc.reading
                (reactor.addReader if desc.reading else reactor.removeReader)(desc)
            if bool(wanted & WRITABLE) != desc.writing:
                desc.writing = not desc.writing
                (reactor.addWriter if desc.writing else reactor.removeWriter)(desc)
        except Exception:
            log.failure("cannot update reactor registration of {desc!r}", desc=desc)
        if retired and not desc.reading and not desc.writing:
            desc.close()
            with self._lock:
                self._open.discard(desc)
            self._check_idle()

    def _dispatch_fd(self, desc: _Descriptor, revents: int) -> None:
        """Reactor thread: call every watch on *desc* interested in *revents*.

        A copy of the watch list is walked, since a callback may add or remove watches; each
        watch is checked again right before its call. Hang-up and error go to every watch that
        is waiting for something. Callbacks must not raise into the reactor (a non-None return or
        an exception would make it drop the descriptor), so failures are logged.
        """
        with self._lock:
            watches = list(desc.watches.values())
        for w in watches:
            if w.watch not in desc.watches:
                continue
            mask = revents & (w.events | ERROR | HANGUP) if w.events else 0
            if not mask:
                continue
            try:
                w.cb(w.watch, w.fd, mask, w.opaque)
            except Exception:
                log.failure("libvirt handle callback failed (fd {fd})", fd=w.fd)

    # -- timers ---------------------------------------------------------------------------------

    def _add_timeout(self, interval: int, cb: Callable, opaque: object) -> int:
        with self._lock:
            timer = self._allocate_id()
            t = self._timers[timer] = _Timer(timer, interval, cb, opaque)
            t.sync_pending = True
        self._sync_timer_soon(t, True)
        return timer

    def _update_timeout(self, timer: int, interval: int) -> None:
        with self._lock:
            t = self._timers.get(timer)
            if t is None:
                return
            t.interval = interval
            t.dirty = True
            post = not t.sync_pending
            t.sync_pending = True
        self._sync_timer_soon(t, post)

    def _remove_timeout(self, timer: int) -> int:
        with self._lock:
            t = self._timers.pop(timer, None)
            if t is None:
                return -1
            t.removed = True
            post = not t.sync_pending
            t.sync_pending = True
        self._sync_timer_soon(t, post)
        self._free_later(t.opaque)
        return 0

    def _sync_timer_soon(self, t: _Timer, post: bool) -> None:
        if threadable.isInIOThread():
            self._sync_timer(t)
        elif post:
            self.reactor.callFromThread(self._sync_timer, t)

    def _sync_timer(self, t: _Timer) -> None:
        """Reactor thread: re-arm from now after an add/update, disarm after a remove."""
        with self._lock:
            t.sync_pending = False
            rearm, t.dirty = t.dirty, False
            interval, removed = t.interval, t.removed
        if not (rearm or removed):
            return
        if t.call is not None:
            if t.call.active():
                t.call.cancel()
            t.call = None
        if not removed and interval >= 0:
            t.call = self.reactor.callLater(interval / 1000.0, self._fire_timer, t)

    def _fire_timer(self, t: _Timer) -> None:
        t.call = None
        interval = t.interval
        if t.removed or interval < 0:
            return
        if interval == 0:
            self._note_spin(t)
        try:
            t.cb(t.timer, t.opaque)
        except Exception:
            log.failure("libvirt timer callback failed")
        # Periodic: re-arm unless the callback (or a sync) already changed or removed it.
        if t.call is None and not t.removed and t.interval >= 0:
            t.call = self.reactor.callLater(t.interval / 1000.0, self._fire_timer, t)

    def _note_spin(self, t: _Timer) -> None:
        now = time.monotonic()
        if now - t.spin[0] >= 1.0:
            t.spin[0], t.spin[1] = now, 0
        t.spin[1] += 1
        if t.spin[1] == _SPIN_WARN_PER_SECOND:
            log.warn("libvirt 0 ms timer {timer} fired {n} times within a second", timer=t.timer, n=t.spin[1])


def _file_ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


_install_lock = threading.Lock()
_installed: EventLoop | None = None


def install(kind: str, reactor: INodeReactor) -> EventLoop:
    """Create and register the process's libvirt event loop of *kind* (``thread`` | ``reactor``).

    Must run before the first ``libvirt.open``. libvirt takes one implementation per process:
    asking again for the same kind returns the installed loop, another kind is an error.
    """
    global _installed
    if kind not in KINDS:
        raise ValueError(f"unknown libvirt event loop {kind!r}; expected one of {', '.join(KINDS)}")
    with _install_lock:
        if _installed is not None:
            if _installed.kind != kind:
                raise EventLoopConflict(
                    f"libvirt event loop {_installed.kind!r} is already installed in this process; "
                    f"cannot install {kind!r} (libvirt allows one implementation per process)"
                )
            return _installed
        loop: EventLoop = ThreadEventLoop(reactor) if kind == "thread" else ReactorEventLoop(reactor)
        loop.register()
        _installed = loop
        return loop


def installed() -> EventLoop | None:
    """The loop :func:`install` registered in this process, if any."""
    return _installed
