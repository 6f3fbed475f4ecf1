"""An OVSDB JSON-RPC client (RFC 7047) on the reactor: one Deferred per request, every call bounded.

OVS's own Python library drives its sockets from a blocking poll loop; on the reactor the
protocol is small enough to own: JSON objects back to back on a unix socket, each request with an
``id`` its answer carries back, and ``echo`` requests from the server that must be answered. The
framing is found by a linear scan (:class:`JsonSplitter`), so a large answer costs one pass.

Everything here runs on the reactor. The connection is opened on first use and again after it is
lost, so ovsdb-server going away and coming back costs the calls in flight (they fail with
:class:`~quantix.errors.Unavailable`) and nothing else.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from quantix.errors import QuantixError, Unavailable
from quantix.util.reactor import INodeReactor

log = Logger(namespace="quantix.network.ovsdb")

#: The database ovs-vswitchd serves.
DATABASE = "Open_vSwitch"
#: An answer larger than this is a broken server, not a big switch: the connection is dropped.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_STRUCTURE = re.compile(rb'["\\{}\[\]]')
_IN_STRING = re.compile(rb'["\\]')


class OvsdbError(QuantixError):
    """The server answered a request with an error (a failed transaction operation included)."""


class JsonSplitter:
    """Cuts a byte stream into top-level JSON texts (objects or arrays), linear in the input.

    Only structure is tracked (depth, strings, escapes); each complete text is handed to
    :func:`json.loads` once. Bytes between texts must be whitespace.
    """

    def __init__(self, limit: int = MAX_MESSAGE_BYTES) -> None:
        self._buf = bytearray()
        self._scan = 0  # where the next scan starts; everything before it is classified
        self._depth = 0
        self._in_string = False
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        texts: list[bytes] = []
        start = 0
        pos = self._scan
        while pos < len(buf):
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                if m.group() == b"\\":
                    if m.end() >= len(buf):  # the escaped byte has not arrived yet
                        pos = m.start()
                        break
                    pos = m.end() + 1
                    continue
                self._in_string = False
                pos = m.end()
                continue
            if self._depth == 0:
                # Between texts: skip whitespace, then a text must open.
                while pos < len(buf) and buf[pos] in b" \t\r\n":
                    pos += 1
                start = pos
                if pos == len(buf):
                    break
                if buf[pos] not in b"{[":
                    raise ValueError(f"unexpected byte {buf[pos]!r} between JSON texts")
            m = _STRUCTURE.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            token = m.group()
            pos = m.end()
            if token == b'"':
                self._in_string = True
            elif token == b"\\":
                raise ValueError("backslash outside a JSON string")
            elif token in b"{[":
                self._depth += 1
            else:
                self._depth -= 1
                if self._depth == 0:
                    texts.append(bytes(buf[start:pos]))
                    start = pos
        del buf[:start]
        self._scan = pos - start
        if len(buf) > self._limit:
            raise ValueError(f"JSON text over {self._limit} bytes")
        return texts


class OvsdbProtocol(Protocol):
    """One connection: numbered requests, answers matched by id, server echoes answered."""

    def __init__(self) -> None:
        self._splitter = JsonSplitter()
        self._ids = itertools.count(1)
        self._pending: dict[int, defer.Deferred] = {}
        self.lost: defer.Deferred = defer.Deferred()

    def request(self, method: str, params: list) -> defer.Deferred:
        rid = next(self._ids)

        def forget(_: defer.Deferred) -> None:
            self._pending.pop(rid, None)

        d: defer.Deferred = defer.Deferred(forget)
        self._pending[rid] = d
        self._send({"method": method, "params": params, "id": rid})
        return d

    def _send(self, message: dict) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(message, separators=(",", ":")).encode())

    def dataReceived(self, data: bytes) -> None:
        try:
            for text in self._splitter.feed(data):
                self._message(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:
            log.warn("dropping the OVSDB connection: {err}", err=exc)
            assert self.transport is not None
            self.transport.loseConnection()

    def _message(self, msg: dict) -> None:
        if msg.get("method") == "echo":
            self._send({"id": msg["id"], "result": msg.get("params", []), "error": None})
            return
        if "method" in msg:
            return  # notifications (monitors) are not used
        d = self._pending.pop(msg.get("id"), None)  # type: ignore[arg-type]
        if d is None:
            return
        if msg.get("error") is not None:
            d.errback(OvsdbError(f"OVSDB error: {msg['error']}"))
        else:
            d.callback(msg.get("result"))

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(Unavailable("Open vSwitch database connection lost"))
        self.lost.callback(None)


class OvsdbClient:
    """Calls on one (re)opened connection to ``socket_path``; each bounded by ``timeout`` seconds.

    Reactor only. Errors: :class:`Unavailable` when the database cannot be reached or the call
    times out, :class:`OvsdbError` when it answers with an error.
    """

    def __init__(self, reactor: INodeReactor, socket_path: str, timeout: float = 5.0) -> None:
        self._reactor = reactor
        self.socket_path = socket_path
        self.timeout = timeout
        self._proto: OvsdbProtocol | None = None
        self._connecting: defer.Deferred | None = None

    def call(self, method: str, params: list) -> defer.Deferred:
        d = self._connection()
        d.addCallback(lambda proto: proto.request(method, params))
        d.addTimeout(self.timeout, self._reactor)
        d.addErrback(self._translate, method)
        return d

    def transact(self, *operations: dict) -> defer.Deferred:
        """One atomic transaction on ``Open_vSwitch``; fires with the per-operation results."""
        d = self.call("transact", [DATABASE, *operations])
        d.addCallback(_check_transaction)
        return d

    def close(self) -> None:
        if self._proto is not None and self._proto.transport is not None:
            self._proto.transport.loseConnection()

    def _connection(self) -> defer.Deferred:
        if self._proto is not None:
            return defer.succeed(self._proto)
        if self._connecting is None:
            endpoint = UNIXClientEndpoint(self._reactor, self.socket_path, timeout=self.timeout)
            self._connecting = connectProtocol(endpoint, OvsdbProtocol())
            self._connecting.addBoth(self._connected)
        # Every caller waits on its own Deferred, so one caller's timeout cancels only itself.
        mine: defer.Deferred = defer.Deferred()
        self._connecting.addBoth(_relay, mine)
        return mine

    def _connected(self, result: OvsdbProtocol | Failure) -> OvsdbProtocol | Failure:
        self._connecting = None
        if isinstance(result, OvsdbProtocol):
            self._proto = result
            result.lost.addCallback(self._forget, result)
        return result

    def _forget(self, _: None, proto: OvsdbProtocol) -> None:
        if self._proto is proto:
            self._proto = None

    def _translate(self, failure: Failure, method: str) -> Failure:
        if failure.check(QuantixError):
            return failure
        if failure.check(defer.CancelledError, defer.TimeoutError):
            self.close()  # a server that let a request time out is not trusted with the next one
            raise Unavailable(f"Open vSwitch database did not answer {method} within {self.timeout:g}s")
        raise Unavailable(
            f"Open vSwitch database unreachable at {self.socket_path}: {failure.getErrorMessage()}"
        )


def _relay(result: OvsdbProtocol | Failure, target: defer.Deferred[OvsdbProtocol]) -> OvsdbProtocol | None:
    if not target.called:
        if isinstance(result, Failure):
            target.errback(result)
        else:
            target.callback(result)
    return None if isinstance(result, Failure) else result


def _check_transaction(results: list) -> list:
    """OVSDB reports a failed operation inside a successful answer: make it an error."""
    for res in results:
        if isinstance(res, dict) and res.get("error"):
            raise OvsdbError(
                f"OVSDB transaction failed: {res['error']}: {res.get('details', '')}".rstrip(": ")
            )
    return results


# -- value helpers (OVSDB's typed JSON) -----------------------------------------------------------


def omap(pairs: dict[str, str]) -> list:
    """A Python dict as an OVSDB map value."""
    return ["map", [[k, v] for k, v in sorted(pairs.items())]]


def oset(items: list) -> list:
    return ["set", list(items)]


def from_map(value: Any) -> dict[str, Any]:
    """An OVSDB map value (``["map", [[k, v], ...]]``) as a dict."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "map":
        return {k: v for k, v in value[1]}
    return {}


def scalar(value: Any, default: Any = None) -> Any:
    """An optional column: a bare atom, or ``["set", []]`` when empty (one item sets unwrapped)."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "set":
        return value[1][0] if len(value[1]) == 1 else default
    return default if value is None else value
