"""A Connect-RPC unary client: protobuf messages as JSON over HTTP/1.1 POST, on treq.

The Go control plane serves Connect on its plain HTTP listener (no h2c), so gRPC proper is not an
option. A call is ``POST <base>/<package>.<Service>/<Method>`` with the request in protobuf's JSON
mapping (camelCase names); the answer is the response message in the same mapping (64-bit
integers as strings, enums as names), or, on a non-200 status, ``{"code", "message"}``.
Every failure, including transport ones, surfaces as :class:`ConnectError` so callers branch on
one code string.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import treq
import treq.client
from google.protobuf import json_format
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet import error as net_error
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from quantix.util.jsontypes import JsonValue
from quantix.util.reactor import INodeReactor

M = TypeVar("M", bound=Message)
T = TypeVar("T")

# The codes of the Connect protocol (the gRPC codes in snake_case).
CODES = frozenset(
    {
        "canceled",
        "unknown",
        "invalid_argument",
        "deadline_exceeded",
        "not_found",
        "already_exists",
        "permission_denied",
        "resource_exhausted",
        "failed_precondition",
        "aborted",
        "out_of_range",
        "unimplemented",
        "internal",
        "unavailable",
        "data_loss",
        "unauthenticated",
    }
)

# The Connect spec's fallback when a non-200 answer carries no Connect error body (a proxy, the
# control plane's maintenance gate, a plain mux 404).
_CODE_FROM_HTTP = {
    400: "internal",
    401: "unauthenticated",
    403: "permission_denied",
    404: "unimplemented",
    429: "unavailable",
    502: "unavailable",
    503: "unavailable",
    504: "unavailable",
}

# Longest Retry-After we accept; a bigger value is clamped rather than trusted blindly.
MAX_RETRY_AFTER = 3600.0


class ConnectError(Exception):
    """A failed call: ``code`` is a Connect code, ``http_status`` is None for transport failures."""

    def __init__(
        self,
        code: str,
        message: str,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(int(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def error_from_response(status: int, body: bytes, retry_after: str | None = None) -> ConnectError:
    """Turn a non-200 answer into a ConnectError, preferring the JSON ``code`` over the status."""
    code = _CODE_FROM_HTTP.get(status, "unknown")
    message = ""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if doc.get("code") in CODES:
            code = doc["code"]
        raw = doc.get("message") or doc.get("error") or ""
        message = raw if isinstance(raw, str) else json.dumps(raw)
    if not message:
        message = body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    return ConnectError(code, message, status, parse_retry_after(retry_after))


def encode(request: Message) -> bytes:
    """Protobuf JSON, camelCase, enums as names, zero values left out (what connect-go sends)."""
    return json.dumps(json_format.MessageToDict(request), separators=(",", ":")).encode()


def decode(body: bytes, response_cls: type[M]) -> M:
    """Parse protobuf JSON, ignoring fields a newer control plane may add."""
    try:
        return json_format.Parse(body or b"{}", response_cls(), ignore_unknown_fields=True)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise ConnectError("internal", f"undecodable {response_cls.__name__}: {exc}", 200) from exc


def read_pem_certificates(path: str | Path) -> list[Certificate]:
    """Every certificate of a PEM bundle (a CA file may hold several)."""
    data = Path(path).read_bytes()
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + chunk for chunk in data.split(marker)[1:]]
    certs = [Certificate.loadPEM(block) for block in blocks]
    if not certs:
        raise ValueError(f"no PEM certificate in {path}")
    return certs


def tls_policy(ca_file: str | Path | None) -> BrowserLikePolicyForHTTPS:
    """Verify the control plane against ``ca_file`` only, or the system store when None."""
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(read_pem_certificates(ca_file)))


_TRANSPORT_ERRORS = (
    net_error.ConnectError,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    RequestNotSent,
)


class _QuietHTTP11ClientFactory(_HTTP11ClientFactory):
    """Twisted's per-connection client factory, minus its "Starting factory" line at info for
    every request (heartbeats every 30 s made that most of an idle daemon's log)."""

    noisy = False


class ConnectClient:
    """Unary Connect calls against one control-plane base URL.

    ``reactor`` drives the sockets and the per-call timeout. Connections are not kept alive: a
    call every 30 s gains nothing from reuse, and a POST on a connection the server closed while
    idle would fail instead of being retried.
    """

    def __init__(
        self,
        reactor: INodeReactor,
        base_url: str,
        *,
        ca_file: str | Path | None = None,
        token: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        base = base_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(f"control plane URL must be http:// or https://: {base_url!r}")
        self.base_url = base
        self._reactor = reactor
        self._timeout = timeout
        self._headers = {
            b"Content-Type": [b"application/json"],
            # Optional for connect-go unless it is told to require it; correct either way.
            b"Connect-Protocol-Version": [b"1"],
        }
        if token:
            self._headers[b"Authorization"] = [b"Bearer " + token.encode()]
        policy = tls_policy(ca_file) if base.startswith("https://") else BrowserLikePolicyForHTTPS()
        pool = HTTPConnectionPool(reactor, persistent=False)
        pool._factory = _QuietHTTP11ClientFactory
        self._http = treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool))

    def call(self, service: str, method: str, request: Message, response_cls: type[M]) -> defer.Deferred[M]:
        """POST ``request`` to ``/<service>/<method>``; fires with a ``response_cls`` or ConnectError."""
        url = f"{self.base_url}/{service}/{method}"
        return self._post(url, encode(request), lambda response: self._read(response, response_cls))

    def post_json(self, path: str, body: Mapping[str, object]) -> defer.Deferred[JsonValue]:
        """POST plain JSON (not a Connect call, e.g. ``/api/v1/images/notify``) to ``<base><path>``;
        fires with the decoded answer, or ConnectError for a non-200 status or a transport error."""
        return self._post(self.base_url + path, json.dumps(body).encode(), self._read_json)

    def _post(
        self, url: str, data: bytes, read: Callable[[IResponse], defer.Deferred[T]]
    ) -> defer.Deferred[T]:
        posted = self._http.post(
            url,
            data=data,
            headers=Headers(self._headers),
            allow_redirects=False,
        )
        d = posted.addCallback(read)
        # Our own timer rather than addTimeout: a cancelled Agent request fails with a wrapped
        # CancelledError, so only the timer knows whether the deadline or the caller cancelled.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._timeout, expire)

        def settle(result: object) -> object:
            if timer.active():
                timer.cancel()
            if expired and isinstance(result, Failure):
                raise ConnectError("deadline_exceeded", f"no answer from {url} within {self._timeout:g} s")
            return result

        d.addBoth(settle)  # the result passes unchanged, or the failure becomes a ConnectError
        d.addErrback(self._translate, url)
        return d

    def _read(self, response: IResponse, response_cls: type[M]) -> defer.Deferred[M]:
        retry_after = response.headers.getRawHeaders(b"Retry-After", [b""])[0].decode("latin-1")

        def done(body: bytes) -> M:
            if response.code != 200:
                raise error_from_response(response.code, body, retry_after)
            return decode(body, response_cls)

        return treq.content(response).addCallback(done)

    def _read_json(self, response: IResponse) -> defer.Deferred[JsonValue]:
        def done(body: bytes) -> JsonValue:
            if response.code != 200:
                raise error_from_response(response.code, body)
            try:
                return json.loads(body or b"{}")
            except ValueError:
                return {}

        return treq.content(response).addCallback(done)

    def _translate(self, failure: Failure, url: str) -> Failure:
        if failure.check(ConnectError, defer.CancelledError):
            return failure
        if failure.check(*_TRANSPORT_ERRORS):
            raise ConnectError("unavailable", f"{url}: {_describe(failure.value)}")
        return failure


def _describe(exc: BaseException | None) -> str:
    """One line for a transport failure; treq wraps the real reasons in a list."""
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    return str(exc) or type(exc).__name__
