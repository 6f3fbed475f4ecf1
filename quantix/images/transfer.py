"""One HTTP attempt of a download: a streaming GET appended to ``<final>.part``, hashed as it goes.

The reactor receives the body; a worker thread (:class:`PartWriter`) writes and hashes it, so
neither disk nor hashing ever blocks the reactor. Between them sits a bounded queue: above
:data:`HIGH_WATER` bytes the TCP transport is paused, below :data:`LOW_WATER` it resumes, so a
slow disk slows the sender instead of growing memory (peak RSS stays flat with file size).

Resuming: with a ``.part`` and a sidecar recording the URL and the server's validator (ETag or
Last-Modified), the request carries ``Range: bytes=<size>-`` and ``If-Range: <validator>``.
206 appends; 200 (the file changed, or no range support) starts over; 416 with the recorded
total means the part is already complete. A resumed part is re-hashed from disk first.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import threading
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from quantix import bridge
from quantix.images.checksum import Expected
from quantix.util.files import atomic_write
from quantix.util.jsontypes import JsonObject
from quantix.util.reactor import INodeReactor

if TYPE_CHECKING:
    # The HTTP client side of twisted.web is imported by the first download only (idle memory).
    from treq.client import HTTPClient
    from twisted.web.iweb import IResponse

HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
#: Chunks from the socket are gathered up to this size before crossing to the writer thread.
BATCH = 1024 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class TransferError(Exception):
    """An attempt failed; ``retryable`` says whether another attempt (resuming) may succeed."""

    def __init__(self, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@attrs.frozen
class Result:
    size: int
    algorithm: str
    hexdigest: str


@attrs.frozen
class Sidecar:
    """What a ``.part`` was fetched from, so a later attempt can resume it safely."""

    url: str
    etag: str | None = None
    last_modified: str | None = None
    total_bytes: int = 0

    @property
    def validator(self) -> str | None:
        return self.etag or self.last_modified

    @classmethod
    def read(cls, path: str) -> Sidecar | None:
        """Blocking: the sidecar at ``path``, or ``None`` when absent or unreadable."""
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            return cls(
                url=str(data["url"]),
                etag=data.get("etag"),
                last_modified=data.get("lastModified"),
                total_bytes=int(data.get("totalBytes") or 0),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write(self, path: str) -> None:
        """Blocking: replace the sidecar atomically."""
        body: JsonObject = {
            "url": self.url,
            "etag": self.etag,
            "lastModified": self.last_modified,
            "totalBytes": self.total_bytes,
        }
        atomic_write(path, json.dumps(body))


def resume_point(part: str, sidecar_path: str, url: str) -> tuple[int, Sidecar | None]:
    """Blocking: how many bytes of ``part`` can be kept, and the sidecar they came with."""
    side = Sidecar.read(sidecar_path)
    try:
        size = os.path.getsize(part)
    except OSError:
        return 0, None
    if side is None or side.url != url or not side.validator:
        return 0, None
    return size, side


def free_space(directory: str) -> int:
    """Blocking: bytes available to us in ``directory``."""
    return shutil.disk_usage(directory).free


class PartWriter:
    """Worker-thread side: appends batches to the part file and hashes them.

    ``put`` and ``finish`` are called on the reactor; :meth:`run` runs in a worker thread and
    returns the :class:`Result` once everything put before ``finish`` is on disk (fsynced).
    """

    def __init__(self, path: str, offset: int, expected_algorithm: str, on_drained: Callable[[], None]):
        self.path = path
        self.offset = offset
        self.algorithm = expected_algorithm
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # None: the end
        self._lock = threading.Lock()
        self._queued = 0
        self._paused = False
        self._on_drained = on_drained

    def put(self, data: bytes) -> bool:
        """Reactor: queue ``data``; True when the sender should pause (the queue is full)."""
        with self._lock:
            self._queued += len(data)
            full = self._queued > HIGH_WATER
            self._paused = self._paused or full
        self._queue.put(data)
        return full

    def finish(self) -> None:
        self._queue.put(None)

    def run(self, reactor: IReactorThreads) -> Result:
        import hashlib

        hasher = hashlib.new(self.algorithm)
        mode = "r+b" if os.path.exists(self.path) else "wb"
        with open(self.path, mode) as fh:
            fh.truncate(self.offset)
            while fh.tell() < self.offset:
                block = fh.read(min(BATCH, self.offset - fh.tell()))
                if not block:
                    break
                hasher.update(block)
            fh.seek(self.offset)
            size = self.offset
            while (item := self._queue.get()) is not None:
                fh.write(item)
                hasher.update(item)
                size += len(item)
                with self._lock:
                    self._queued -= len(item)
                    drained = self._paused and self._queued < LOW_WATER
                    if drained:
                        self._paused = False
                if drained:
                    bridge.post_to_reactor(reactor, self._on_drained)
            fh.flush()
            os.fsync(fh.fileno())
        return Result(size, self.algorithm, hasher.hexdigest())


@typing.runtime_checkable
class _Producer(typing.Protocol):
    """What a response body's transport is (the client's ``TransportProxyProducer``): Twisted
    types ``Protocol.transport`` as a plain ``ITransport``, which cannot pause."""

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


def _producer(transport: object) -> _Producer | None:
    return transport if isinstance(transport, _Producer) else None


class _Body(Protocol):
    """Reactor side of the body: batches, back-pressure and the idle-read timeout."""

    def __init__(
        self, writer: PartWriter, reactor: IReactorTime, idle_timeout: float, on_bytes: Callable[[int], None]
    ):
        self.writer = writer
        self.reactor = reactor
        self.idle_timeout = idle_timeout
        self.on_bytes = on_bytes
        self.done: defer.Deferred[None] = defer.Deferred()
        self._batch: list[bytes] = []
        self._batched = 0
        self._paused = False
        self._timer: IDelayedCall | None = None
        self.timed_out = False
        self.stopped = False

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self.idle_timeout)
        else:
            self._timer = self.reactor.callLater(self.idle_timeout, self._idle)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _idle(self) -> None:
        self.timed_out = True
        self.stop()

    def stop(self) -> None:
        """Abort the transfer (idle timeout, cancel, daemon stop): ``done`` errbacks."""
        self.stopped = True
        producer = _producer(self.transport)
        if producer is not None:
            producer.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self._batch.append(data)
        self._batched += len(data)
        self.on_bytes(len(data))
        if self._batched >= BATCH:
            self._flush()
        if not self._paused:
            self._arm()

    def _flush(self) -> None:
        if not self._batch:
            return
        data = self._batch[0] if len(self._batch) == 1 else b"".join(self._batch)
        self._batch, self._batched = [], 0
        if self.writer.put(data) and not self._paused:
            # Our own pause: not the server's silence, so the idle timer stops meanwhile.
            self._paused = True
            self._disarm()
            producer = _producer(self.transport)
            if producer is not None:
                producer.pauseProducing()

    def drained(self) -> None:
        if self._paused and not self.stopped:
            self._paused = False
            producer = _producer(self.transport)
            if producer is not None:
                producer.resumeProducing()
            self._arm()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        from twisted.web._newclient import ResponseDone  # twisted.web.client's, without its TLS
        from twisted.web.http import PotentialDataLoss

        self._disarm()
        self._flush()
        if reason.check(ResponseDone, PotentialDataLoss) and not self.stopped:
            self.done.callback(None)
        else:
            self.done.errback(reason)


@attrs.frozen
class Request:
    """One attempt's inputs."""

    url: str
    part: str
    sidecar: str
    algorithm: str
    idle_timeout: float


class Attempt:
    """A single GET of ``request.url`` into the part file; :meth:`run` fires with a
    :class:`Result` or fails with :class:`TransferError`. :meth:`stop` aborts it."""

    def __init__(
        self, reactor: INodeReactor, client: HTTPClient, request: Request, on_bytes: Callable[[int], None]
    ):
        self.reactor = reactor
        self.client = client
        self.request = request
        self.on_bytes = on_bytes
        self.total = 0
        self.offset = 0
        self._cancel_pending: Callable[[], None] | None = None  # while waiting for the response
        self._body: _Body | None = None
        self._stopped = False

    def stop(self) -> None:
        self._stopped = True
        if self._body is not None:
            self._body.stop()
        elif self._cancel_pending is not None:
            self._cancel_pending()

    def run(self) -> defer.Deferred[Result]:
        return defer.Deferred.fromCoroutine(self._run())

    async def _run(self) -> Result:
        req = self.request
        offset, side = await bridge.run_in_worker(
            resume_point, req.part, req.sidecar, req.url, reactor=self.reactor
        )
        headers: dict[bytes | str, bytes | str] = {}
        validator = side.validator if side is not None else None
        if offset and validator:
            headers = {"Range": f"bytes={offset}-", "If-Range": validator}
        try:
            pending = self.client.get(req.url, headers=headers, unbuffered=True, timeout=req.idle_timeout)
            self._cancel_pending = pending.cancel
            response: IResponse = await pending
        except defer.CancelledError:
            raise TransferError(
                "stopped" if self._stopped else f"no response in {req.idle_timeout:.0f} s", True
            ) from None
        except Exception as exc:
            raise TransferError(f"cannot reach {_host(req.url)}: {_reason(exc)}", True) from None
        finally:
            self._cancel_pending = None
        try:
            offset, total = self._range(response, offset, side)
        except TransferError:
            drop(response)
            raise
        if offset == -1:  # 416 for a part that is already whole
            drop(response)
            return await self._write(response, total, writer_only=True)  # total: the part's size
        if offset == -2:  # 416 for a part the server does not know: start over
            drop(response)
            await bridge.run_in_worker(_discard_part, req.part, req.sidecar, reactor=self.reactor)
            raise TransferError("server refused the resume range; starting over", True)
        self.offset, self.total = offset, total
        try:
            await self._check_space(total - offset if total else 0)
        except TransferError:
            drop(response)
            raise
        new_side = Sidecar(
            url=req.url,
            etag=_header(response, b"etag"),
            last_modified=_header(response, b"last-modified"),
            total_bytes=total,
        )
        await bridge.run_in_worker(new_side.write, req.sidecar, reactor=self.reactor)
        result = await self._write(response, offset)
        if total and result.size != total:
            raise TransferError(f"server sent {result.size} of {total} bytes", True)
        return result

    def _range(self, response: IResponse, offset: int, side: Sidecar | None) -> tuple[int, int]:
        """(offset to write at, total size or 0) for the answer; offset -1: the part is already
        complete, -2: the part must be discarded."""
        code = response.code
        # Twisted's client moves Content-Length out of the headers into ``length``.
        length = response.length if isinstance(response.length, int) else None
        if code == 416 and offset and side is not None and side.total_bytes == offset:
            return -1, offset
        if code == 206:
            match = _CONTENT_RANGE.fullmatch(_header(response, b"content-range") or "")
            if match is None or int(match.group(1)) != offset:
                raise TransferError("server answered a range that was not asked for", True)
            total = match.group(3)
            return offset, int(total) if total != "*" else 0
        if code == 200:
            ctype = (_header(response, b"content-type") or "").lower()
            if ctype.startswith(("text/html", "application/xhtml")):
                raise TransferError("server answered an HTML page, not an image", False)
            return 0, length or 0
        if code == 416:
            return -2, 0
        retry = code in (408, 425, 429) or code >= 500
        raise TransferError(f"server answered HTTP {code}", retry)

    async def _check_space(self, needed: int) -> None:
        if not needed:
            return
        directory = os.path.dirname(self.request.part)
        free = await bridge.run_in_worker(free_space, directory, reactor=self.reactor)
        if needed > free:
            raise TransferError(f"insufficient space: need {needed} bytes, {free} free in {directory}", False)

    async def _write(self, response: IResponse, offset: int, writer_only: bool = False) -> Result:
        req = self.request
        body: _Body | None = None
        writer = PartWriter(req.part, offset, req.algorithm, lambda: body.drained() if body else None)
        written = bridge.run_in_worker(writer.run, self.reactor, reactor=self.reactor)
        failure: Exception | None = None
        if not writer_only:
            body = self._body = _Body(writer, self.reactor, req.idle_timeout, self.on_bytes)
            response.deliverBody(body)
            try:
                await body.done
            except Exception as exc:
                failure = exc
            finally:
                self._body = None
        # Whatever arrived is kept (and fsynced) for the next attempt to resume from.
        writer.finish()
        result = await written
        if failure is not None:
            if self._stopped:
                raise TransferError("stopped", True)
            if body is not None and body.timed_out:
                raise TransferError(f"no data for {req.idle_timeout:.0f} s", True)
            raise TransferError(f"connection lost: {_reason(failure)}", True)
        return result


class _Discard(Protocol):
    def connectionMade(self) -> None:
        producer = _producer(self.transport)
        if producer is not None:
            producer.stopProducing()


def drop(response: IResponse) -> None:
    """Close a response whose body we will not read (it must not hold the connection)."""
    try:
        response.deliverBody(_Discard())
    except Exception:  # already delivered or finished
        pass


def _header(response: IResponse, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


def _discard_part(part: str, sidecar: str) -> None:
    for path in (part, sidecar):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc


def _reason(exc: BaseException) -> str:
    reasons = getattr(exc, "reasons", None)
    if reasons:
        exc = reasons[0].value
    return str(exc) or type(exc).__name__


def expected_algorithm(expected: Expected | None) -> str:
    return expected.algorithm if expected is not None else "sha256"
