"""A fake control plane: the node-facing Connect-JSON endpoints of the Go control plane.

It speaks what connect-go speaks: ``POST /<package>.<Service>/<Method>`` with a JSON body parsed
strictly into our generated messages (a misspelt field fails the request, which is the point),
protojson answers (64-bit integers as strings, enums as names), and errors as a non-200 status
with ``{"code", "message"}``. Knobs let a test make it forget nodes, fail calls, go into
maintenance (503 + Retry-After, like the control plane's update gate) or vanish entirely
(:class:`FakeCPServer.stop`, connection refused). Every request is recorded.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
from google.protobuf import json_format
from twisted.internet import defer
from twisted.web import resource, server

from quantix.proto import compute_pb2, storage_pb2

# connect-go's HTTP status for each code it may answer here.
HTTP_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "not_found": 404,
    "internal": 500,
    "unimplemented": 501,
    "unavailable": 503,
}


@attrs.define
class Recorded:
    method: str  # "NodeService/RegisterNode"
    headers: dict[str, str]
    body: dict[str, Any]  # the raw JSON as sent
    at: float


class _Reply(Exception):
    def __init__(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers or {}


def connect_error(code: str, message: str, status: int | None = None) -> _Reply:
    return _Reply(status or HTTP_STATUS[code], {"code": code, "message": message})


class FakeControlPlane(resource.Resource):
    isLeaf = True

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.now = now
        self.requests: list[Recorded] = []
        self.count = 0  # requests served, recorded or not
        self.record = True  # off for long runs, so the fake's own memory stays flat
        self.nodes: dict[str, str] = {}  # hostname -> node id
        self.assigned_pool_ids: list[str] = []
        self.pools: dict[str, storage_pb2.StoragePool] = {}
        # Seconds for Retry-After while in maintenance; None when serving normally.
        self.maintenance: int | None = None
        # A proxy in front of a dead control plane: 503, no Connect body, no Retry-After.
        self.down = False
        # Status for `unimplemented`: connect-go answers 501 today, older releases 404.
        self.unimplemented_status = 501
        self.required_token: str | None = None
        # method name -> list of (code, message) to answer instead of serving, one per call.
        self.failures: dict[str, list[tuple[str, str]]] = {}
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred]] = []
        #: (node id, path) -> image, as ScanLocalImages and images/notify leave them.
        self.images: dict[tuple[str, str], dict[str, Any]] = {}

    # -- knobs and queries -------------------------------------------------------------------

    def forget_nodes(self) -> None:
        """Lose every node record, like a control plane restarted on its in-memory store."""
        self.nodes.clear()

    def fail(self, method: str, code: str, times: int = 1, message: str = "injected") -> None:
        self.failures.setdefault(method, []).extend([(code, message)] * times)

    def calls(self, method: str) -> list[Recorded]:
        return [r for r in self.requests if r.method.endswith("/" + method)]

    def methods(self) -> list[str]:
        return [r.method.rsplit("/", 1)[1] for r in self.requests]

    def wait_for(self, predicate: Callable[[], bool]) -> defer.Deferred:
        """Fires once ``predicate()`` holds after some request (or right away)."""
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((predicate, d))
        self._wake()
        return d

    def _wake(self) -> None:
        # Swapped out first: a callback may add a waiter (and wake) while this loop runs.
        waiters, self._waiters = self._waiters, []
        for predicate, d in waiters:
            if predicate():
                d.callback(None)
            else:
                self._waiters.append((predicate, d))

    # -- HTTP --------------------------------------------------------------------------------

    def render_POST(self, request: server.Request) -> bytes:
        path = request.path.decode()
        raw = request.content.read()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_unparsed": raw.decode("utf-8", "replace")}
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.count += 1
        if self.record:
            self.requests.append(Recorded(path.lstrip("/"), headers, body, self.now()))
        try:
            answer = self._serve(path, headers, raw)
            status, out, extra = 200, json_format.MessageToDict(answer), {}
        except _Reply as reply:
            status, out, extra = reply.status, reply.body, reply.headers
        request.setResponseCode(status)
        if status == 404 and not out:
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            payload = b"404 page not found\n"
        else:
            request.setHeader(b"Content-Type", b"application/json")
            payload = json.dumps(out).encode()
        for name, value in extra.items():
            request.setHeader(name.encode(), value.encode())
        self._wake()
        return payload

    def _serve(self, path: str, headers: dict[str, str], raw: bytes) -> Any:
        if path == "/api/v1/images/notify" and not (self.down or self.maintenance is not None):
            raise _Reply(200, self._notify(raw))
        if self.down:
            raise _Reply(503, {"error": "no healthy upstream"})
        if self.maintenance is not None:
            # The control plane's update gate: not a Connect error body.
            raise _Reply(
                503,
                {"error": "control plane is updating", "maintenance": True},
                {"Retry-After": str(self.maintenance)},
            )
        service, _, method = path.strip("/").partition("/")
        handler = self._handlers().get((service, method))
        if handler is None:
            raise _Reply(404, {})  # the Go mux's plain 404 for a path nothing serves
        if not headers.get("content-type", "").startswith("application/json"):
            raise connect_error("unimplemented", "unsupported content type", 415)
        if (
            self.required_token is not None
            and headers.get("authorization") != f"Bearer {self.required_token}"
        ):
            raise connect_error("unauthenticated", "bad token")
        queued = self.failures.get(method)
        if queued:
            code, message = queued.pop(0)
            raise connect_error(code, message)
        request_cls, func = handler
        try:
            message = json_format.Parse(raw or b"{}", request_cls())
        except json_format.ParseError as exc:
            raise connect_error("invalid_argument", f"bad JSON: {exc}") from exc
        return func(message)

    def _handlers(self) -> dict[tuple[str, str], tuple[type, Callable[[Any], Any]]]:
        node = "limiquantix.compute.v1.NodeService"
        unimplemented = self._unimplemented
        return {
            (node, "RegisterNode"): (compute_pb2.RegisterNodeRequest, self._register),
            (node, "UpdateHeartbeat"): (compute_pb2.UpdateHeartbeatRequest, self._heartbeat),
            (node, "SyncNodeVMs"): (compute_pb2.SyncNodeVMsRequest, self._sync_vms),
            (node, "SyncFullState"): (compute_pb2.SyncFullStateRequest, unimplemented),
            (node, "NotifyVMChange"): (compute_pb2.VMChangeNotification, unimplemented),
            ("limiquantix.storage.v1.StoragePoolService", "GetPool"): (
                storage_pb2.GetPoolRequest,
                self._get_pool,
            ),
            ("limiquantix.storage.v1.ImageService", "ScanLocalImages"): (
                storage_pb2.ScanLocalImagesRequest,
                self._scan_images,
            ),
        }

    # -- methods -----------------------------------------------------------------------------

    def _unimplemented(self, message: Any) -> Any:
        name = message.DESCRIPTOR.name
        raise connect_error("unimplemented", f"{name} is not implemented", self.unimplemented_status)

    def _register(self, req: compute_pb2.RegisterNodeRequest) -> compute_pb2.Node:
        if not req.hostname or not req.management_ip:
            raise connect_error("invalid_argument", "hostname and management_ip are required")
        node_id = self.nodes.setdefault(req.hostname, str(uuid.uuid4()))
        node = compute_pb2.Node(
            id=node_id,
            hostname=req.hostname,
            management_ip=req.management_ip.rsplit(":", 1)[0]
            if "." in req.management_ip
            else req.management_ip,
            labels=dict(req.labels),
        )
        node.spec.cpu.CopyFrom(req.cpu_info)
        node.spec.memory.CopyFrom(req.memory_info)
        node.spec.role.CopyFrom(req.role)
        node.spec.scheduling.schedulable = True
        node.status.phase = compute_pb2.NodeStatus.READY
        node.status.last_heartbeat.FromSeconds(int(self.now()))
        node.created_at.FromSeconds(int(self.now()))
        return node

    def _known(self, node_id: str) -> None:
        if not node_id or node_id not in self.nodes.values():
            raise connect_error("not_found", f"node not found: {node_id}")

    def _heartbeat(self, req: compute_pb2.UpdateHeartbeatRequest) -> compute_pb2.UpdateHeartbeatResponse:
        self._known(req.node_id)
        return compute_pb2.UpdateHeartbeatResponse(
            acknowledged=True,
            server_time_unix=int(self.now()),
            heartbeat_interval_secs=30,
            assigned_pool_ids=list(self.assigned_pool_ids),
        )

    def _sync_vms(self, req: compute_pb2.SyncNodeVMsRequest) -> compute_pb2.SyncNodeVMsResponse:
        self._known(req.node_id)
        return compute_pb2.SyncNodeVMsResponse(imported_count=len(req.vms))

    def _scan_images(self, req: storage_pb2.ScanLocalImagesRequest) -> storage_pb2.ScanLocalImagesResponse:
        """Like the control plane: a known (node, path) is left alone, a new one is added."""
        answer = storage_pb2.ScanLocalImagesResponse()
        for image in req.images:
            key = (req.node_id, image.path)
            if key in self.images:
                answer.existing_count += 1
            else:
                self.images[key] = json_format.MessageToDict(image)
                answer.registered_count += 1
        return answer

    def _notify(self, raw: bytes) -> dict[str, Any]:
        """``POST /api/v1/images/notify``: snake_case keys; an unknown event type is ignored."""
        body = json.loads(raw or b"{}")
        key = (body.get("node_id", ""), body.get("path", ""))
        if body.get("event_type") == "deleted":
            self.images.pop(key, None)
        elif body.get("event_type") in ("created", "updated"):
            self.images[key] = body
        return {"success": True, "message": "ok"}

    def _get_pool(self, req: storage_pb2.GetPoolRequest) -> storage_pb2.StoragePool:
        pool = self.pools.get(req.id)
        if pool is None:
            raise connect_error("not_found", f"storage pool not found: {req.id}")
        return pool


class FakeCPServer:
    """Serves a FakeControlPlane on 127.0.0.1, stoppable and restartable on the same port."""

    def __init__(self, reactor: Any, cp: FakeControlPlane, tls: Any = None) -> None:
        self.reactor = reactor
        self.cp = cp
        self.tls = tls
        self.site = server.Site(cp)
        self.site.noisy = False
        self.site.displayTracebacks = False
        self.port_number = 0
        self._port: Any = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port_number}"

    def start(self) -> None:
        if self.tls is not None:
            self._port = self.reactor.listenSSL(self.port_number, self.site, self.tls, interface="127.0.0.1")
        else:
            self._port = self.reactor.listenTCP(self.port_number, self.site, interface="127.0.0.1")
        self.port_number = self._port.getHost().port

    def stop(self) -> defer.Deferred:
        port, self._port = self._port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


class _Silent(resource.Resource):
    isLeaf = True

    def __init__(self, requests: list[defer.Deferred]) -> None:
        super().__init__()
        self.requests = requests

    def render_POST(self, request: server.Request) -> object:
        self.requests.append(request.notifyFinish())
        return server.NOT_DONE_YET


def listen_silent(testcase: Any) -> tuple[int, list[defer.Deferred]]:
    """An HTTP server on loopback that takes requests and never answers (timeouts, cancellation).

    Returns its port and the list of ``notifyFinish`` Deferreds of the requests it received.
    """
    from twisted.internet import reactor

    requests: list[defer.Deferred] = []
    site = server.Site(_Silent(requests))
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port, requests
