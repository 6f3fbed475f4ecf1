"""Orderly shutdown: children stop one after another, and SIGTERM ends the process with 0.

``MultiService.stopService`` calls every child's ``stopService`` at once, so libvirt would close
while gRPC is still draining in-flight calls. :func:`stop_in_order` waits for each child before
stopping the next, in reverse order of addition: boxes added after the gRPC server (the event
bus ending its streams with UNAVAILABLE) stop before it, boxes added before it (libvirt) stay up
until the last in-flight call has finished. See :mod:`quantix.ops.drain` for why new calls are
refused before the server stops.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from types import FrameType

from twisted.application.service import IService, MultiService, Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from quantix import bridge
from quantix.util.reactor import INodeReactor

log = Logger(namespace="quantix.ops.shutdown")


@defer.inlineCallbacks
def stop_in_order(
    parent: MultiService,
    before: Mapping[IService, Callable[[], object]] | None = None,
    after: Mapping[IService, Callable[[], object]] | None = None,
):
    """Stop ``parent``'s children sequentially, last added first. ``before[child]`` and
    ``after[child]`` run just before and after ``child`` stops (for steps that are not
    services). A failing step is logged and the rest still run."""
    Service.stopService(parent)
    before, after = before or {}, after or {}
    for child in reversed(list(parent)):
        steps = [before.get(child), child.stopService, after.get(child)]
        for step in steps:
            if step is None:
                continue
            try:
                yield defer.maybeDeferred(step)
            except Exception:
                log.failure("stopping {service} failed", service=type(child).__name__)


def exit_zero_on_sigterm(reactor: INodeReactor) -> None:
    """Replace the reactor's SIGTERM handler (call when running: the reactor installs its own
    during startup).

    Twisted's handler records the signal and twistd then kills itself with it, so systemd and
    scripts see "killed by SIGTERM". A stop asked for with SIGTERM is a normal stop: ours only
    stops the reactor, the services drain, and twistd exits 0.
    """

    def stop() -> None:
        _sigterm.set()
        log.info("SIGTERM received: draining and shutting down")
        try:
            reactor.stop()
        except ReactorNotRunning:  # a second SIGTERM while already stopping
            pass

    def handler(signum: int, frame: FrameType | None) -> None:
        bridge.post_to_reactor(reactor, stop)  # signal-safe: only wakes the reactor

    signal.signal(signal.SIGTERM, handler)


#: Set once a SIGTERM stop has begun: the process will exit 0 (see :func:`install_fast_exit`).
_sigterm = threading.Event()


def _exit_after_sigterm() -> None:
    if not _sigterm.is_set():
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def install_fast_exit() -> None:
    """After a SIGTERM stop, skip the interpreter's teardown: exit 0 from the last atexit hook.

    Once twistd has stopped every service, closed its log and run the other atexit hooks,
    CPython still finalizes every module and garbage-collects the whole heap (grpc, protobuf
    descriptors, libvirt, Twisted); on a busy 2-vCPU host that took 1.3 to 3.4 s of the time
    from SIGTERM to exit, against 0.1 to 0.2 s for the drain and every service stop together
    (measured with gdb attached after the atexit hooks: the main thread was in
    ``finalize_modules``). Nothing is left to flush by then but the standard streams.

    Call before the daemon's heavy imports: atexit hooks run last-registered first, so this one
    runs after theirs. Other stops (a fatal start-up error, SIGINT) exit as before.
    """
    atexit.register(_exit_after_sigterm)
