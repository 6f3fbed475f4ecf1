"""The one table from domain errors to gRPC status codes, and the wrapper every RPC runs in.

Handlers raise :mod:`quantix.errors` exceptions (or let a ``libvirtError`` escape); this module
turns them into a status code and a short message. An unexpected exception is logged with its
traceback and answered ``INTERNAL`` with a one-line message: never ``UNKNOWN``, never a
traceback on the wire.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
from google.protobuf.message import Message
from twisted.logger import Logger

from quantix import errors
from quantix.rpc import inputs

log = Logger(namespace="quantix.rpc")

#: Most specific class first: the first ``isinstance`` match wins.
STATUS_MAP: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.WrongState, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Invalid, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.HypervisorDown, grpc.StatusCode.UNAVAILABLE),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Timeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unsupported, grpc.StatusCode.UNIMPLEMENTED),
)

#: Longest status message sent: a message quoting a huge request field (a 1 MiB id) would exceed
#: the peer's metadata limit, and the client would see RESOURCE_EXHAUSTED instead of our status.
#: Percent-encoded UTF-8 takes up to 12 bytes a character: 1000 stay under grpc's 16 KiB.
MAX_MESSAGE_CHARS = 1000

#: ``observer(method, code, seconds)``, called after every RPC (metrics).
Observer = Callable[[str, grpc.StatusCode, float], None]
#: Also given the peer and the request, for its ``vm_id`` (the access log). Asking grpc for the
#: peer is a large share of this wrapper's cost, so it is only asked when such an observer is
#: registered.
RequestObserver = Callable[[str, grpc.StatusCode, float, str, object], None]
#: An RPC handler, called with its request message and the call's context: each is typed with
#: its own messages, so the common shape leaves the parameters open. A server-streaming one
#: returns an iterator of messages; which one a handler is, the service descriptor says.
Handler = Callable[..., object]
StreamHandler = Callable[..., Iterator[object]]


class RpcObservers:
    """Who hears about every finished RPC. The node makes one and hands it to the gRPC server
    (which reports into it) and to the ops box (which registers its metrics and access log);
    two nodes in one process, as in tests, never hear each other's calls."""

    def __init__(self) -> None:
        self._observers: list[Observer] = []
        self._request_observers: list[RequestObserver] = []

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def remove(self, observer: Observer) -> None:
        """Forget ``observer``; nothing happens when it was not registered."""
        if observer in self._observers:
            self._observers.remove(observer)

    def add_with_request(self, observer: RequestObserver) -> None:
        self._request_observers.append(observer)

    def remove_with_request(self, observer: RequestObserver) -> None:
        if observer in self._request_observers:
            self._request_observers.remove(observer)

    def finished(
        self,
        method: str,
        code: grpc.StatusCode,
        seconds: float,
        peer: Callable[[], str],
        request: object,
    ) -> None:
        """Tell every observer; one that raises is logged and does not stop the others.
        ``peer()`` is called once, and only when a request observer needs it."""
        for observer in self._observers:
            try:
                observer(method, code, seconds)
            except Exception:
                log.failure("RPC observer failed")
        if not self._request_observers:
            return
        who = peer()
        for request_observer in self._request_observers:
            try:
                request_observer(method, code, seconds, who, request)
            except Exception:
                log.failure("RPC observer failed")


def _libvirt_translate(exc: BaseException) -> errors.QuantixError | None:
    try:
        from quantix.hypervisor.errors import translate
    except ImportError:  # pragma: no cover - the hypervisor box is always present
        return None
    return translate(exc)


def shorten(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(message) <= limit:
        return message
    return f"{message[: limit - 40]}... ({len(message)} characters)"


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Status code and client-safe message for an exception raised by a handler."""
    code, message = _classify(exc)
    return code, shorten(message)


def _classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    translated = _libvirt_translate(exc)
    if translated is not None:
        exc = translated
    for cls, code in STATUS_MAP:
        if isinstance(exc, cls):
            return code, str(exc)
    if isinstance(exc, errors.QuantixError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def _finish(
    observers: RpcObservers | None,
    method: str,
    code: grpc.StatusCode,
    started: float,
    context: grpc.ServicerContext,
    request: object = None,
) -> None:
    if observers is None:
        return
    elapsed = time.monotonic() - started
    peer = context.peer if context is not None else str
    observers.finished(method, code, elapsed, peer, request)


def _abort(method: str, exc: BaseException, context: grpc.ServicerContext) -> grpc.StatusCode:
    code, message = classify(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.failure("{method} failed unexpectedly", method=method)
    context.abort(code, message)
    return code  # not reached: abort raises


class MalformedRequest:
    """Stands in for a request whose bytes do not decode: grpc answers a failing deserializer
    with INTERNAL, so the handler wrappers turn this into INVALID_ARGUMENT instead."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def decoder(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    """Request deserializer that never raises (see :class:`MalformedRequest`)."""

    def decode(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except Exception as exc:  # DecodeError; RecursionError on absurd nesting
            return MalformedRequest(str(exc) or type(exc).__name__)

    return decode


def _check_decoded(request: object) -> None:
    if isinstance(request, MalformedRequest):
        raise errors.Invalid(f"malformed request: {request.reason}")
    inputs.check(request)  # entry counts and string characters, before any work


def unary(method: str, handler: Handler, observers: RpcObservers | None = None) -> Handler:
    """Wrap a unary handler with the error map and the observers."""

    def call(request: object, context: grpc.ServicerContext) -> object:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            _check_decoded(request)
            return handler(request, context)
        except Exception as exc:
            code = classify(exc)[0]
            _abort(method, exc, context)
            return None  # not reached: abort raises
        finally:
            _finish(observers, method, code, started, context, request)

    return call


def stream(
    method: str,
    handler: StreamHandler,
    observers: RpcObservers | None = None,
) -> StreamHandler:
    """Wrap a server-streaming handler the same way as :func:`unary`."""

    def call(request: object, context: grpc.ServicerContext) -> Iterator[object]:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            _check_decoded(request)
            yield from handler(request, context)
        except grpc.RpcError:
            # A bidi handler (reflection) reading the requests of a client that went away: the
            # call is over, there is no one to answer and nothing went wrong here.
            if context is not None and context.is_active():
                raise
            code = grpc.StatusCode.CANCELLED
        except Exception as exc:
            code = classify(exc)[0]
            _abort(method, exc, context)
        finally:
            if code is grpc.StatusCode.OK and context is not None and not context.is_active():
                code = grpc.StatusCode.CANCELLED  # the client went away; streams never end OK
            _finish(observers, method, code, started, context, request)

    return call


def unimplemented(method: str) -> Handler:
    """Handler for an RPC no box has claimed yet."""

    def call(request: object, context: grpc.ServicerContext) -> object:
        raise errors.Unsupported(f"{method} is not implemented on this node")

    return call
