"""The one crossing between the reactor thread and worker threads.

The daemon has two kinds of threads. The reactor thread owns every piece of mutable box state
(agent channels, quiesce records, timers, the control-plane link) and must never block. Worker
threads (grpcio's pool for RPC handlers, Twisted's pool for blocking libvirt, file and psutil
work) may block, and must not touch reactor-owned state directly.

Every hop between the two goes through this module, and each helper checks that it is called
from the side it is meant for, so a misplaced call fails at once with :class:`WrongThread`
instead of deadlocking (``blockingCallFromThread`` on the reactor thread waits for itself) or
racing:

- :func:`call_on_reactor` (worker → reactor, waits for the result),
- :func:`post_to_reactor` (any thread → reactor, fire and forget; safe in a signal handler),
- :func:`run_in_worker` (reactor → worker pool, a Deferred for the result),
- :func:`reactor_only` (a decorator for reactor-owned methods of a facade).

Box facades document each method as "reactor", "worker" or "any thread"; see
:mod:`quantix.facades`. Exempt, and saying so where they do it: the libvirt event loop's own
thread plumbing (:mod:`quantix.hypervisor.eventloop`) and the gRPC server's own stop
(:mod:`quantix.rpc.server`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar, overload

from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.python import threadable

from quantix.util.reactor import running_reactor

P = ParamSpec("P")
R = TypeVar("R")


class WrongThread(RuntimeError):
    """A bridge helper or a reactor-only method was called from the wrong kind of thread."""


def on_reactor_thread() -> bool:
    """True on the reactor thread, and on any thread before a reactor has started running
    (while the service tree is built there is no other side to hop to)."""
    return threadable.ioThread is None or threadable.isInIOThread()


@overload
def call_on_reactor(
    reactor: IReactorFromThreads, func: Callable[P, defer.Deferred[R]], *args: P.args, **kwargs: P.kwargs
) -> R: ...


@overload
def call_on_reactor(
    reactor: IReactorFromThreads, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> R: ...


def call_on_reactor(
    reactor: IReactorFromThreads,
    func: Callable[P, defer.Deferred[R]] | Callable[P, R],
    *args: P.args,
    **kwargs: P.kwargs,
) -> R:
    """Worker thread: run ``func`` on the reactor and block until it (or the Deferred it
    returns) has a result; its exception is raised here."""
    if threadable.isInIOThread():
        raise WrongThread(f"{_name(func)}: call_on_reactor from the reactor thread would deadlock")
    return threads.blockingCallFromThread(reactor, func, *args, **kwargs)


def post_to_reactor(
    reactor: IReactorFromThreads, func: Callable[P, object], *args: P.args, **kwargs: P.kwargs
) -> None:
    """Any thread (a signal handler too): run ``func`` on the reactor soon, in posting order;
    nobody waits for it."""
    reactor.callFromThread(func, *args, **kwargs)


# mypy refuses a keyword-only parameter between ``*args: P.args`` and ``**kwargs: P.kwargs``.
def run_in_worker(  # type: ignore[valid-type]
    func: Callable[P, R],
    *args: P.args,
    reactor: IReactorThreads | None = None,
    **kwargs: P.kwargs,
) -> defer.Deferred[R]:
    """Reactor thread: run blocking ``func`` in the reactor's thread pool; a Deferred (fired
    on the reactor) for its result. ``reactor`` defaults to the global reactor, whose pool a
    box on a fake clock still uses for its blocking work."""
    if not on_reactor_thread():
        raise WrongThread(f"{_name(func)}: run_in_worker called from a worker thread")
    reactor = reactor if reactor is not None else running_reactor()
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), func, *args, **kwargs)


def reactor_only(method: Callable[P, R]) -> Callable[P, R]:
    """Mark (and enforce) a facade method that touches reactor-owned state: called from a
    worker thread it raises :class:`WrongThread`; go through :func:`call_on_reactor`."""

    @functools.wraps(method)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        if not on_reactor_thread():
            raise WrongThread(f"{_name(method)} runs on the reactor thread only")
        return method(*args, **kwargs)

    return checked


def _name(func: Callable[..., object]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
