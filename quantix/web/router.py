"""A leaf resource that maps ``METHOD /path/{param}`` to a function and answers in JSON.

Routes are a few lines that parse, call a box and shape the answer; this module owns the rest:
matching, path parameters, 404/405, turning :class:`HttpError` into the error shape and any
other exception into a logged 500, and Deferred results. Twisted's own resource tree would
answer unknown paths and methods with HTML, so the router is the site's only resource.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import ParamSpec, TypeVar
from urllib.parse import unquote

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from quantix import bridge
from quantix.util.jsontypes import JsonObject
from quantix.util.reactor import INodeReactor
from quantix.web.errors import HttpError, encode

log = Logger(namespace="quantix.web")

JSON_TYPE = b"application/json; charset=utf-8"

P = ParamSpec("P")
R = TypeVar("R")


@attrs.frozen
class Reply:
    """A successful answer other than plain 200, e.g. ``Reply(202, {...})``."""

    status: int
    body: object  # anything :func:`~quantix.web.errors.encode` takes
    headers: dict[str, str] = attrs.field(factory=dict)


@attrs.define
class Call:
    """What a route function receives: the request, its path parameters and helpers."""

    request: Request
    params: dict[str, str]

    @property
    def peer(self) -> str:
        return getattr(self.request.getClientAddress(), "host", "")

    def query(self, name: str, default: str | None = None) -> str | None:
        """First value of query argument ``name`` (decoded UTF-8), or ``default``."""
        values = self.request.args.get(name.encode(), [])
        return values[0].decode("utf-8", "replace") if values else default

    def json(self) -> JsonObject:
        """The body as a JSON object; anything else is 400 ``invalid_json``. The size limit was
        enforced before the body was buffered (:mod:`quantix.web.request`)."""
        content = self.request.content  # a BytesIO from JsonRequest.gotLength
        if isinstance(content, io.BytesIO):
            raw = content.getvalue()
        else:
            raw = content.read() if content is not None else b""
        try:
            body: object = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise HttpError(400, "invalid_json", "request body must be a JSON object")
        return body

    @property
    def reactor(self) -> INodeReactor:
        """The site's reactor (its thread pool runs :meth:`in_thread`; its clock bounds waits)."""
        from quantix.web.request import JsonSite  # imports this module

        site = self.request.site  # set by Request.process, before any resource renders
        if not isinstance(site, JsonSite):
            raise RuntimeError(f"a Router is served by a JsonSite, not {site!r}")
        return site.reactor

    def in_thread(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> defer.Deferred[R]:
        """Run blocking ``fn`` in a worker thread (through :mod:`quantix.bridge`); the reactor
        keeps serving meanwhile."""
        return bridge.run_in_worker(fn, *args, reactor=self.reactor, **kwargs)


#: A route: its answer (a JSON-encodable value or a :class:`Reply`), or a Deferred or coroutine
#: of one; :meth:`Router.render` resolves it with ``maybeDeferred``.
Handler = Callable[[Call], object]


def _pattern(path: str) -> tuple[str, ...]:
    if not path.startswith("/"):
        raise ValueError(f"route path must start with '/': {path!r}")
    return tuple(path.strip("/").split("/"))


def _match(pattern: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params = {}
    for want, got in zip(pattern, segments, strict=True):
        if want.startswith("{") and want.endswith("}"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


class Router(Resource):
    """The JSON resource of one listener. ``add("GET", "/api/v1/jobs/{jobId}", fn)``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self._routes: list[tuple[bytes, tuple[str, ...], Handler]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes.append((method.upper().encode(), _pattern(path), handler))

    def resolve(self, method: bytes, path: bytes) -> tuple[Handler, dict[str, str]]:
        """The handler and parameters for a request, or :class:`HttpError` 404/405."""
        try:
            segments = [unquote(s, errors="strict") for s in path.decode("utf-8").strip("/").split("/")]
        except UnicodeDecodeError:
            raise HttpError(404, "not_found", "no such route") from None
        allowed = []
        for want, pattern, handler in self._routes:
            params = _match(pattern, segments)
            if params is None:
                continue
            if want == method:
                return handler, params
            allowed.append(want.decode())
        if allowed:
            raise HttpError(
                405,
                "method_not_allowed",
                f"{method.decode('latin-1')} is not allowed here",
                headers={"Allow": ", ".join(sorted(set(allowed)))},
            )
        raise HttpError(404, "not_found", "no such route")

    def render(self, request: Request) -> int:
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        try:
            handler, params = self.resolve(request.method, request.path)
        except HttpError as exc:
            write_error(request, exc)
            return NOT_DONE_YET
        d = defer.maybeDeferred(handler, Call(request, params))
        d.addCallbacks(lambda result: None if gone else write_result(request, result), _failed(request, gone))
        d.addErrback(lambda f: log.failure("writing a response failed", f))
        return NOT_DONE_YET


def _failed(request: Request, gone: list[bool]) -> Callable[[Failure], None]:
    def failed(failure: Failure) -> None:
        if isinstance(failure.value, HttpError):
            error = failure.value
        else:
            log.failure(
                "{method} {path} failed",
                failure,
                method=request.method.decode("latin-1"),
                path=request.path.decode("latin-1"),
            )
            error = HttpError(500, "internal_error", "internal error")
        if not gone:
            write_error(request, error)

    return failed


def write_result(request: Request, result: object) -> None:
    if isinstance(result, Reply):
        write_json(request, result.status, result.body, result.headers)
    else:
        write_json(request, 200, result)


def write_error(request: Request, error: HttpError) -> None:
    write_json(request, error.status, error.body(), error.headers)


def write_json(request: Request, status: int, body: object, headers: dict[str, str] | None = None) -> None:
    """Answer and finish: JSON content type, exact length, never cached."""
    data = encode(body)
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"content-length", str(len(data)).encode())
    for name, value in (headers or {}).items():
        request.setHeader(name.encode(), value.encode())
    request.write(data)
    request.finish()
