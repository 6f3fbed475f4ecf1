"""A real HTTP image server for download tests: files with Range/If-Range, and faults on demand.

Knobs per path: a redirect, an HTML page, a status code, a connection dropped after N body bytes
(the first ``drops`` times), a stall after N bytes (the first ``stalls`` times; the
connection stays open, silent), a rate
limit, a declared Content-Length that is a lie. Every request's path and headers are recorded.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.web import resource, server

CHUNK = 64 * 1024


@attrs.define
class Entry:
    data: bytes = b""
    etag: str = '"v1"'
    content_type: str = "application/octet-stream"
    redirect: str | None = None
    status: int = 200
    drop_after: int | None = None
    drops: int = 0
    stall_after: int | None = None
    stalls: int = 1
    rate: int | None = None  # bytes per second
    declared_length: int | None = None
    ranges: bool = True


class ImageServer(resource.Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.entries: dict[str, Entry] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.port: Any = None

    def add(self, path: str, data: bytes = b"", **knobs: Any) -> Entry:
        entry = self.entries[path] = Entry(data=data, **knobs)
        return entry

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"

    def start(self, testcase: Any) -> ImageServer:
        site = server.Site(self)
        site.noisy = False
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        testcase.addCleanup(self.port.stopListening)
        return self

    def seen(self, path: str) -> list[dict[str, str]]:
        return [headers for p, headers in self.requests if p == path]

    def render_GET(self, request: Any) -> Any:
        path = request.path.decode()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((path, headers))
        entry = self.entries.get(path)
        if entry is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/html")
            return b"<html>not found</html>"
        if entry.redirect:
            request.redirect(entry.redirect.encode())
            return b""
        if entry.status != 200:
            request.setResponseCode(entry.status)
            return b"error"
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", headers.get("range", ""))
        if_range = headers.get("if-range")
        if entry.ranges and match and (if_range is None or if_range == entry.etag):
            start = int(match.group(1))
            if start >= len(entry.data):
                request.setResponseCode(416)
                request.setHeader(b"content-range", f"bytes */{len(entry.data)}".encode())
                return b""
            request.setResponseCode(206)
            request.setHeader(
                b"content-range", f"bytes {start}-{len(entry.data) - 1}/{len(entry.data)}".encode()
            )
        request.setHeader(b"etag", entry.etag.encode())
        request.setHeader(b"content-type", entry.content_type.encode())
        length = entry.declared_length if entry.declared_length is not None else len(entry.data) - start
        request.setHeader(b"content-length", str(length).encode())
        _Sender(request, entry, start).go()
        return server.NOT_DONE_YET


class _Sender:
    """Writes one response body in chunks; faults are decided once, when the response starts."""

    def __init__(self, request: Any, entry: Entry, start: int) -> None:
        self.request = request
        self.entry = entry
        self.data = entry.data  # a file replaced meanwhile does not change a running response
        self.pos = start
        self.sent = 0
        self.gone = False
        request.notifyFinish().addErrback(lambda _: setattr(self, "gone", True))
        self.drop_at = self.stall_at = None
        if entry.drop_after is not None and entry.drops > 0:
            entry.drops -= 1
            self.drop_at = entry.drop_after
        if entry.stall_after is not None and entry.stalls > 0:
            entry.stalls -= 1
            self.stall_at = entry.stall_after

    def go(self) -> None:
        if self.gone:
            return
        if self.drop_at is not None and self.sent >= self.drop_at:
            self.request.channel.transport.abortConnection()
            return
        if self.stall_at is not None and self.sent >= self.stall_at:
            return  # silent until the client gives up
        data = self.data
        if self.pos >= len(data):
            self.request.finish()
            return
        size = CHUNK
        for limit in (self.drop_at, self.stall_at):
            if limit is not None:
                size = min(size, max(limit - self.sent, 1))
        chunk = data[self.pos : self.pos + size]
        self.request.write(chunk)
        self.pos += len(chunk)
        self.sent += len(chunk)
        if self.pos >= len(data):
            # Finished now, not a tick later: a client holding every byte may end its test first.
            self.request.finish()
            return
        rate = self.entry.rate
        reactor.callLater(len(chunk) / rate if rate else 0, self.go)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
