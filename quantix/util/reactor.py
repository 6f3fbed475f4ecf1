"""The reactor the daemon runs on, as one type.

Twisted describes a reactor by many interfaces (``IReactorCore``, ``IReactorTime``, ...) and a
parameter can name only one. Code that needs one names that interface (``IReactorTime`` for
timers, so tests can pass a ``Clock``); code that needs several (the composition root, the ops
services, signal handling) takes :class:`INodeReactor`, which the running reactor provides.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFDSet,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)


class INodeReactor(
    IReactorCore,
    IReactorTime,
    IReactorThreads,
    IReactorTCP,
    IReactorUNIX,
    IReactorFDSet,
    IReactorPluggableNameResolver,
):
    """Timers, threads, TCP and UNIX sockets, raw descriptors (the libvirt event loop), name
    resolution, start/stop and system events."""


def running_reactor() -> INodeReactor:
    """The process's reactor (installed on first import)."""
    from twisted.internet import reactor

    return cast(INodeReactor, reactor)  # the installed reactor stands in for the module
