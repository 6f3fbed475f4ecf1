"""The shared web layer against a real port and a real HTTP client (treq)."""

from __future__ import annotations

import json
import threading

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Protocol
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from quantix.config import ListenError
from quantix.web import ClientAllowList, HttpError, Router, WebListener
from quantix.web.allow import resolve_host
from quantix.web.router import Reply
from tests.support import wait_for


def _router() -> Router:
    router = Router()
    router.add(
        "GET", "/api/v1/things/{thingId}", lambda call: {"thingId": call.params["thingId"], "n": 2**40}
    )
    router.add("DELETE", "/api/v1/things/{thingId}", lambda call: Reply(202, {"deleted": True}))
    router.add("POST", "/api/v1/echo", lambda call: call.json())
    router.add("GET", "/api/v1/query", lambda call: {"n": call.query("n"), "missing": call.query("x")})

    def refuse(call):
        raise HttpError(409, "conflict_here", "not now")

    def broken(call):
        raise RuntimeError("secret detail")

    def later(call):
        return task.deferLater(reactor, 0, lambda: {"late": None})

    def where(call):
        return call.in_thread(
            lambda: {"reactorThread": threading.current_thread() is threading.main_thread()}
        )

    router.add("GET", "/api/v1/refuse", refuse)
    router.add("GET", "/api/v1/broken", broken)
    router.add("GET", "/api/v1/later", later)
    router.add("GET", "/api/v1/where", where)
    return router


@implementer(IBodyProducer)
class _Chunked:
    """A body of unknown length: sent with chunked transfer encoding."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes) -> None:
        self.data = data

    def startProducing(self, consumer):
        for i in range(0, len(self.data), 65536):
            consumer.write(self.data[i : i + 65536])
        return defer.succeed(None)

    def stopProducing(self):
        pass

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass


class WebTestCase(unittest.TestCase):
    def setUp(self):
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    @defer.inlineCallbacks
    def listen(self, router=None, **kwargs):
        listener = WebListener(reactor, "127.0.0.1:0", router or _router(), **kwargs)
        listener.startService()
        self.addCleanup(listener.stopService)
        self.base = f"http://127.0.0.1:{listener.port}"
        yield None
        return listener

    @defer.inlineCallbacks
    def request(self, method, path, **kwargs):
        response = yield treq.request(method, self.base + path, pool=self.pool, **kwargs)
        body = yield response.content()
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"], body
        )
        return response.code, json.loads(body), response


class RouterTests(WebTestCase):
    @defer.inlineCallbacks
    def test_path_params_and_integers_as_numbers(self):
        yield self.listen()
        code, body, _ = yield self.request("GET", "/api/v1/things/a%20b")
        self.assertEqual((code, body), (200, {"thingId": "a b", "n": 2**40}))

    @defer.inlineCallbacks
    def test_reply_status_and_query(self):
        yield self.listen()
        code, body, _ = yield self.request("DELETE", "/api/v1/things/x")
        self.assertEqual((code, body), (202, {"deleted": True}))
        code, body, _ = yield self.request("GET", "/api/v1/query?n=5")
        self.assertEqual(body, {"n": "5", "missing": None})

    @defer.inlineCallbacks
    def test_unknown_path_is_json_404(self):
        yield self.listen()
        for path in ("/", "/nope", "/api/v1/things", "/api/v1/things/x/y", "/api/v1/things/%ff"):
            code, body, _ = yield self.request("GET", path)
            self.assertEqual(code, 404, path)
            self.assertEqual(body["error"], "not_found")

    @defer.inlineCallbacks
    def test_wrong_method_is_json_405_with_allow(self):
        yield self.listen()
        code, body, response = yield self.request("PUT", "/api/v1/things/x")
        self.assertEqual((code, body["error"]), (405, "method_not_allowed"))
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"DELETE, GET"])

    @defer.inlineCallbacks
    def test_http_error_and_internal_error(self):
        yield self.listen()
        code, body, _ = yield self.request("GET", "/api/v1/refuse")
        self.assertEqual((code, body), (409, {"error": "conflict_here", "message": "not now"}))
        code, body, _ = yield self.request("GET", "/api/v1/broken")
        self.assertEqual((code, body), (500, {"error": "internal_error", "message": "internal error"}))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_deferred_result_and_thread(self):
        yield self.listen()
        code, body, _ = yield self.request("GET", "/api/v1/later")
        self.assertEqual((code, body), (200, {"late": None}))
        code, body, _ = yield self.request("GET", "/api/v1/where")
        self.assertEqual(body, {"reactorThread": False})


class BodyTests(WebTestCase):
    @defer.inlineCallbacks
    def test_json_body(self):
        yield self.listen()
        code, body, _ = yield self.request("POST", "/api/v1/echo", json={"a": [1, None]})
        self.assertEqual((code, body), (200, {"a": [1, None]}))

    @defer.inlineCallbacks
    def test_invalid_json_and_non_objects(self):
        yield self.listen()
        for data in (b"", b"{", b"[1]", b"\xff\xfe", b'"x"'):
            code, body, _ = yield self.request("POST", "/api/v1/echo", data=data)
            self.assertEqual((code, body["error"]), (400, "invalid_json"), data)

    @defer.inlineCallbacks
    def test_body_over_limit_is_413_declared_or_chunked(self):
        yield self.listen()
        big = b"[" + b"0," * (600 * 1024) + b"0]"
        code, body, _ = yield self.request("POST", "/api/v1/echo", data=big)
        self.assertEqual((code, body["error"]), (413, "body_too_large"))
        code, body, _ = yield self.request("POST", "/api/v1/echo", data=_Chunked(big))
        self.assertEqual((code, body["error"]), (413, "body_too_large"))
        # Exactly at the limit is fine (and is not JSON here, so 400).
        code, body, _ = yield self.request("POST", "/api/v1/echo", data=b" " * (1024 * 1024))
        self.assertEqual(code, 400)

    @defer.inlineCallbacks
    def test_small_limit(self):
        yield self.listen(max_body=10)
        code, _, _ = yield self.request("POST", "/api/v1/echo", json={"long": "x" * 20})
        self.assertEqual(code, 413)
        code, _, _ = yield self.request("POST", "/api/v1/echo", json={})
        self.assertEqual(code, 200)


class PolicyTests(WebTestCase):
    @defer.inlineCallbacks
    def test_refused_client_gets_json_403(self):
        yield self.listen(allow=lambda host: False)
        code, body, _ = yield self.request("POST", "/api/v1/echo", json={})
        self.assertEqual((code, body["error"]), (403, "forbidden"))

    def test_allow_list(self):
        self.assertTrue(ClientAllowList.from_cidrs(None)("203.0.113.9"))
        policy = ClientAllowList.from_cidrs(["10.0.0.0/8", "192.0.2.7"])
        for host in ("10.1.2.3", "192.0.2.7", "127.0.0.1", "::1", "::ffff:10.9.9.9"):
            self.assertTrue(policy(host), host)
        for host in ("192.0.2.8", "11.0.0.1", "", "not-an-ip", "2001:db8::1"):
            self.assertFalse(policy(host), host)
        self.assertTrue(policy.with_addresses(["2001:db8::1", "junk"])("2001:db8::1"))
        self.assertRaises(ValueError, ClientAllowList.from_cidrs, ["10.0.0.0/33"])

    def test_resolve_host(self):
        self.assertEqual(resolve_host("http://127.0.0.1:8080/x"), ["127.0.0.1"])
        self.assertEqual(resolve_host(None), [])
        self.assertEqual(resolve_host("http://name.invalid/"), [])

    @defer.inlineCallbacks
    def test_control_plane_address_added_at_start(self):
        listener = yield self.listen(
            allow=ClientAllowList.from_cidrs(["10.0.0.0/8"]), control_plane_url="http://192.0.2.5:8080"
        )
        yield wait_for(lambda: listener.site.allow("192.0.2.5"))
        self.assertFalse(listener.site.allow("192.0.2.6"))


class ListenerTests(WebTestCase):
    def test_null_address_is_off(self):
        listener = WebListener(reactor, None, _router())
        listener.startService()
        self.assertIsNone(listener.port)
        return listener.stopService()

    @defer.inlineCallbacks
    def test_busy_port_is_one_line_error(self):
        first = yield self.listen()
        busy = WebListener(reactor, f"127.0.0.1:{first.port}", _router(), name="downloads")
        with self.assertRaises(ListenError) as caught:
            busy.startService()
        message = str(caught.exception)
        self.assertIn(f"downloads listener: cannot listen on 127.0.0.1:{first.port}", message)
        self.assertIn("choose another with downloads.listen", message)  # how to move it
        self.assertRaises(ListenError, WebListener(reactor, "nonsense", _router()).startService)

    @defer.inlineCallbacks
    def test_stop_closes_keepalive_connections(self):
        listener = yield self.listen()
        lost = defer.Deferred()

        class Client(Protocol):
            def connectionLost(self, reason):
                lost.callback(None)

        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        proto = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", listener.port), Client())
        proto.transport.write(b"GET /api/v1/things/x HTTP/1.1\r\nHost: x\r\n\r\n")
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(listener._factory.protocols), 1)
        yield listener.stopService()
        yield lost
