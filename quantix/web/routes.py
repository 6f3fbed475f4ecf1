"""How a side-API route is served: access check, one error table, a deadline.

Route functions (:mod:`.vmroutes`, :mod:`.hostroutes`) raise the daemon's domain errors; this
module turns them into the JSON error shape, checks each route's access class first
(:mod:`.access`), and puts a deadline on every answer so the control plane (30 s client timeout)
always gets JSON, even when a guest never answers.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from quantix import errors
from quantix.web.access import Kind, RouteAccess
from quantix.web.errors import HttpError
from quantix.web.router import Call, Handler, Router

#: Every route answers within this (the control plane waits 30 s).
ROUTE_DEADLINE = 28.0

_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (errors.VMNotFound, 404, "vm_not_found"),
    (errors.NotFound, 404, "not_found"),
    (errors.Invalid, 400, "invalid_request"),
    (errors.WrongState, 409, "wrong_state"),
    (errors.HypervisorDown, 503, "hypervisor_unavailable"),
    (errors.Timeout, 504, "guest_timeout"),
    (errors.Unavailable, 503, "agent_unavailable"),
    (errors.Unsupported, 501, "not_supported"),
)


def http_error(exc: Exception) -> HttpError | None:
    """The JSON error for a domain error; None for anything else (a logged 500)."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, defer.TimeoutError):
        return HttpError(504, "guest_timeout", f"no answer within {ROUTE_DEADLINE:g} s")
    for cls, status, code in _ERRORS:
        if isinstance(exc, cls):
            return HttpError(status, code, str(exc))
    return None


def serve(access: RouteAccess, kind: Kind, fn: Handler, clock: IReactorTime) -> Handler:
    """``fn`` behind the access check, the error table and the route deadline."""

    def handler(call: Call) -> defer.Deferred[object]:
        access.check(kind, call.peer, call.request)
        d = defer.maybeDeferred(fn, call)
        d.addTimeout(ROUTE_DEADLINE, clock)

        def mapped(failure: Failure) -> Failure:
            err = http_error(failure.value) if isinstance(failure.value, Exception) else None
            if err is None:
                return failure
            raise err

        return d.addErrback(mapped)

    return handler


class Routes:
    """Collects ``(method, path, kind, fn)``; :meth:`router` serves them all."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, Kind, Handler]] = []

    def add(self, method: str, path: str, kind: Kind, fn: Handler) -> None:
        self.entries.append((method, path, kind, fn))

    def router(self, access: RouteAccess, clock: IReactorTime) -> Router:
        r = Router()
        for method, path, kind, fn in self.entries:
            r.add(method, path, serve(access, kind, fn, clock))
        return r
