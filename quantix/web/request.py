"""The site and request classes: body limit and client policy before any route runs.

Twisted buffers a request body in full (in a temporary file above 100 kB) before the resource
sees it. :class:`JsonRequest` decides at the headers instead: a declared ``Content-Length`` over
the limit, or a chunked body that grows past it, is dropped as it arrives and answered 413; a
client the policy refuses is answered 403 without its body being kept. A request that survives
holds at most ``max_body`` bytes in memory. A client that keeps streaming a refused body is cut
off after :data:`DISCARD_FACTOR` times the limit.
"""

from __future__ import annotations

import io
from collections.abc import Callable

from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource

from quantix.util.reactor import INodeReactor
from quantix.web.errors import HttpError
from quantix.web.router import log, write_error

MAX_BODY = 1024 * 1024
DISCARD_FACTOR = 16


class JsonRequest(server.Request):
    _refusal: HttpError | None = None
    _received = 0
    _body: io.BytesIO

    def _site(self) -> JsonSite:
        """The channel's site (``Site.buildProtocol`` sets it; ``HTTPChannel`` does not declare it)."""
        site = getattr(self.channel, "site", None)
        if not isinstance(site, JsonSite):
            raise TypeError(f"JsonRequest served by {site!r}, not a JsonSite")
        return site

    def _keep_body(self) -> None:
        self._body = io.BytesIO()
        self.content = self._body

    def gotLength(self, length: int | None) -> None:
        site = self._site()
        self._keep_body()
        self._received = 0
        self._refusal = None
        transport = self.channel.transport
        peer = getattr(transport.getPeer(), "host", "") if transport is not None else ""
        if site.allow is not None and not site.allow(peer):
            self._refusal = HttpError(403, "forbidden", f"client {peer} is not allowed")
        elif length is not None and length > site.max_body:
            self._refusal = _too_large(site.max_body)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        limit = self._site().max_body
        if self._refusal is None and self._received > limit:
            self._refusal = _too_large(limit)
            self._keep_body()
        if self._refusal is None:
            self._body.write(data)
        elif self._received > DISCARD_FACTOR * limit and self.channel.transport is not None:
            self.channel.transport.loseConnection()

    def process(self) -> None:
        if self._refusal is None:
            return super().process()
        self.site = self._site()
        write_error(self, self._refusal)

    def processingFailed(self, reason: Failure) -> None:
        """Twisted's version answers an HTML page; a failure outside any route is a JSON 500."""
        log.failure("request processing failed", reason)
        if not self.finished and not self.startedWriting:
            write_error(self, HttpError(500, "internal_error", "internal error"))


def _too_large(limit: int) -> HttpError:
    return HttpError(413, "body_too_large", f"request body exceeds {limit} bytes")


class JsonSite(server.Site):
    """A site for one :class:`~quantix.web.router.Router`.

    ``allow(host) -> bool`` is the client policy (``None``: everyone).
    """

    requestFactory = JsonRequest
    reactor: INodeReactor  # the routes' worker threads come from it too (``Call.in_thread``)
    displayTracebacks = False
    noisy = False

    def __init__(
        self,
        resource: IResource,
        *,
        reactor: INodeReactor | None = None,
        max_body: int = MAX_BODY,
        allow: Callable[[str], bool] | None = None,
    ) -> None:
        # Form bodies stay unparsed (routes read JSON); idle connections close after a minute.
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False, timeout=60)
        self.max_body = max_body
        self.allow = allow

    def log(self, request: http.Request) -> None:
        """No per-request access line at info level (a poller every 2 s would flood the log)."""
        log.debug(
            "{method} {path} {code}",
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            code=request.code,
        )
