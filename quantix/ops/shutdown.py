"""Orderly shutdown: children stop one after another, and SIGTERM ends the process with 0.

``MultiService.stopService`` calls every child's ``stopService`` at once, so libvirt would close
while gRPC is still draining in-flight calls. :func:`stop_in_order` waits for each child before
stopping the next, in reverse order of addition: boxes added after the gRPC server (the event
bus ending its streams with UNAVAILABLE) stop before it, boxes added before it (libvirt) stay up
until the last in-flight call has finished. See :mod:`quantix.ops.drain` for why new calls are
refused before the server stops.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from quantix import bridge

log = Logger(namespace="quantix.ops.shutdown")


@defer.inlineCallbacks
def stop_in_order(
    parent: MultiService,
    before: Mapping[Any, Callable[[], Any]] | None = None,
    after: Mapping[Any, Callable[[], Any]] | None = None,
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


def exit_zero_on_sigterm(reactor: Any) -> None:
    """Replace the reactor's SIGTERM handler (call when running: the reactor installs its own
    during startup).

    Twisted's handler records the signal and twistd then kills itself with it, so systemd and
    scripts see "killed by SIGTERM". A stop asked for with SIGTERM is a normal stop: ours only
    stops the reactor, the services drain, and twistd exits 0.
    """

    def stop() -> None:
        log.info("SIGTERM received: draining and shutting down")
        try:
            reactor.stop()
        except ReactorNotRunning:  # a second SIGTERM while already stopping
            pass

    def handler(signum: int, frame: Any) -> None:
        bridge.post_to_reactor(reactor, stop)  # signal-safe: only wakes the reactor

    signal.signal(signal.SIGTERM, handler)
