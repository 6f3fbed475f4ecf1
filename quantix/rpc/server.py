"""Host the grpcio server inside the twistd process.

The server and its thread pool are created in ``startService`` (after twistd has forked), bound
synchronously so a busy port fails the start with one clear line, and stopped with a grace
period in a thread so the reactor keeps serving the hops in-flight RPCs make into it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import grpc
from google.protobuf import message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as reflection_pb
from twisted.application.service import Service
from twisted.internet import threads
from twisted.logger import Logger

from quantix.config import ListenError, ServerConfig, parse_address
from quantix.proto import node_pb2
from quantix.rpc import status
from quantix.rpc.streams import StreamBudget

log = Logger(namespace="quantix.rpc")

SERVICE = node_pb2.DESCRIPTOR.services_by_name["NodeDaemonService"]


#: How to move the gRPC endpoint when its port is taken.
CHANGE_HINT = "choose another with --listen HOST:PORT or listen_address"


def passthrough(serialize: Callable[[Message], bytes]) -> Callable[[Message | bytes], bytes]:
    """A response serializer that sends bytes as they are: a streamed message serialized once
    (a metrics sample for every subscriber) is not serialized again per stream."""

    def encode(message: Message | bytes) -> bytes:
        return message if isinstance(message, bytes) else serialize(message)

    return encode


def build_generic_handler(
    handlers: Mapping[str, status.Handler],
    observers: status.RpcObservers | None = None,
    streams: StreamBudget | None = None,
) -> grpc.GenericRpcHandler:
    """One grpc method handler per RPC of the service descriptor; unclaimed RPCs are UNIMPLEMENTED.
    Streaming RPCs run in the stream budget's pool and count against it (the default budget's
    when none is given)."""
    if streams is None:
        streams = StreamBudget(ServerConfig().max_streams)
    unknown = set(handlers) - set(SERVICE.methods_by_name)
    if unknown:
        raise ValueError(f"handlers for RPCs not in the contract: {sorted(unknown)}")
    methods = {}
    for method in SERVICE.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        impl = handlers.get(method.name) or status.unimplemented(method.name)
        serializer: Callable[..., bytes] = response.SerializeToString
        if method.server_streaming:
            factory = grpc.unary_stream_rpc_method_handler
            streaming = cast(status.StreamHandler, impl)  # the descriptor says it streams
            wrapped: status.Handler = streams.place(
                status.stream(method.name, streams.guard(streaming), observers)
            )
            serializer = passthrough(serializer)
        else:
            factory, wrapped = grpc.unary_unary_rpc_method_handler, status.unary(method.name, impl, observers)
        methods[method.name] = factory(
            wrapped,
            request_deserializer=status.decoder(request),
            response_serializer=serializer,
        )
    return grpc.method_handlers_generic_handler(SERVICE.full_name, methods)


def add_reflection(server: grpc.Server, names: tuple[str, ...], streams: StreamBudget) -> None:
    """Server reflection, its (bidirectional, long-lived) stream counted in the stream budget."""
    servicer = reflection.ReflectionServicer(names)
    info = streams.place(status.stream("ServerReflectionInfo", streams.guard(servicer.ServerReflectionInfo)))
    handler = grpc.stream_stream_rpc_method_handler(
        info,
        request_deserializer=reflection_pb.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, {"ServerReflectionInfo": handler})]
    )


def check_bindable(address: str) -> None:
    """Fail with one line when ``address`` is unusable, before grpc logs its own multi-line error."""
    if address.startswith("unix:"):
        path = address[len("unix:") :].removeprefix("//")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ListenError.of("gRPC", repr(address), "no such directory", CHANGE_HINT)
        return
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise ListenError.of("gRPC", repr(address), f"invalid address: {exc}", CHANGE_HINT) from None
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError.of("gRPC", address, exc.strerror or str(exc), CHANGE_HINT) from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise ListenError.of("gRPC", address, (exc.strerror or str(exc)).lower(), CHANGE_HINT) from None


class HealthOnItsOwnThread:
    """The standard health servicer with ``Check`` on a thread of its own: a probe is answered
    however busy the unary workers are (``Watch`` holds no thread: it is non-blocking)."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self._servicer = servicer
        pool = ThreadPoolExecutor(1, thread_name_prefix="grpc-health")

        def check(
            request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
        ) -> health_pb2.HealthCheckResponse:
            return servicer.Check(request, context)

        check.experimental_thread_pool = pool  # type: ignore[attr-defined]
        self.Check = check

    def __getattr__(self, name: str) -> object:
        return getattr(self._servicer, name)


class GrpcServer(Service):
    """The gRPC endpoint: NodeDaemonService, the standard health service and reflection."""

    def __init__(
        self,
        listen: str,
        handlers: Callable[[], Mapping[str, status.Handler]],
        *,
        max_workers: int,
        max_streams: int,
        grace: float,
        max_message_bytes: int,
        credentials: grpc.ServerCredentials | None = None,
        extra_options: tuple[tuple[str, int | str], ...] = (),
        observers: status.RpcObservers | None = None,
    ) -> None:
        self.listen = listen
        self._handlers = handlers
        self._max_workers = max_workers
        #: Open server streams (StreamEvents, StreamMetrics, reflection) and their thread pool.
        self.streams = StreamBudget(max_streams)
        #: Seconds in-flight calls get at stop; the node lowers it by the time its drain took.
        self.grace = grace
        self._max_message = max_message_bytes
        self._credentials = credentials
        self._extra_options = extra_options
        #: Told about every finished call (metrics, access log).
        self.observers = observers if observers is not None else status.RpcObservers()
        self.server: grpc.Server | None = None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.port: int | None = None

    def startService(self) -> None:
        check_bindable(self.listen)
        options = [
            # grpcio sets SO_REUSEPORT by default: a second daemon would silently share the port.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", self._max_message),
            ("grpc.max_send_message_length", self._max_message),
            # Keep idle event streams alive through NATs and let clients ping us.
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            *self._extra_options,
        ]
        server = grpc.server(
            ThreadPoolExecutor(self._max_workers, thread_name_prefix="grpc"), options=options
        )
        server.add_generic_rpc_handlers(
            [build_generic_handler(self._handlers(), self.observers, self.streams)]
        )
        # The wrapper stands in for the servicer it wraps (duck-typed through __getattr__).
        health_servicer = cast(health.HealthServicer, HealthOnItsOwnThread(self.health))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (
            SERVICE.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        add_reflection(server, names, self.streams)
        try:
            if self._credentials is not None:
                self.port = server.add_secure_port(self.listen, self._credentials)
            else:
                self.port = server.add_insecure_port(self.listen)
        except RuntimeError:
            reason = "address unavailable or in use"
            raise ListenError.of("gRPC", self.listen, reason, CHANGE_HINT) from None
        server.start()
        self.server = server
        self.set_serving(SERVICE.full_name, False)
        self.set_serving("", True)
        log.info("gRPC listening on {listen} (port {port})", listen=self.listen, port=self.port)
        super().startService()

    def set_serving(self, service: str, serving: bool) -> None:
        """Publish a health status; the node service ties NodeDaemonService to libvirt's state."""
        code = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set(service, code)

    def stopService(self):
        super().stopService()
        server, self.server = self.server, None
        if server is None:
            return None
        self.health.enter_graceful_shutdown()

        # The server's own stop, not a box call, so not through quantix.bridge: grpcio's
        # ``stop(grace).wait()`` blocks until the calls in flight end, and those may still hop
        # onto the reactor meanwhile.
        def stop() -> None:
            server.stop(self.grace).wait()
            self.streams.shutdown()

        return threads.deferToThread(stop)
