"""Call any RPC of a running daemon by name with a JSON request, learning its types by reflection.

``quantix-nodectl call GetVMStatus '{"vm_id": "..."}'`` needs no generated code and no
``grpcurl``: the server's reflection service (always on) describes its services, the
descriptors go into a private pool, and ``json_format`` turns the JSON text into the request
message and the replies back into JSON (proto field names, enums as names).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

#: Services every server of ours has that are not the node's API.
_PLUMBING = ("grpc.reflection.", "grpc.health.")


class CallError(Exception):
    """The RPC name or the JSON request is unusable (a usage error, not an RPC failure)."""


class Reflector:
    """Descriptors of the services ``channel``'s server offers, fetched on first use."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._db = ProtoReflectionDescriptorDatabase(channel)
        self._pool = descriptor_pool.DescriptorPool(self._db)
        self._services: list[ServiceDescriptor] | None = None

    def services(self) -> list[ServiceDescriptor]:
        if self._services is None:
            names = sorted(self._db.get_services())
            self._services = [self._pool.FindServiceByName(n) for n in names]
        return self._services

    def methods(self, include_plumbing: bool = False) -> list[MethodDescriptor]:
        return [
            m
            for s in self.services()
            if include_plumbing or not s.full_name.startswith(_PLUMBING)
            for m in s.methods
        ]

    def find(self, name: str) -> MethodDescriptor:
        """``HealthCheck``, ``NodeDaemonService/HealthCheck`` or the full
        ``limiquantix.node.v1.NodeDaemonService/HealthCheck`` (``.`` also separates)."""
        service, sep, method = name.replace("/", ".").rpartition(".")
        candidates = [
            m
            for m in self.methods(include_plumbing=bool(sep))
            if m.name == method
            and (
                not sep
                or m.containing_service.full_name in (service,)
                or m.containing_service.name == service
            )
        ]
        if not candidates:
            raise CallError(f"unknown RPC {name!r}; `quantix-nodectl list` shows the server's RPCs")
        if len(candidates) > 1:
            names = ", ".join(full_name(m) for m in candidates)
            raise CallError(f"RPC {name!r} is ambiguous: {names}")
        return candidates[0]


def full_name(method: MethodDescriptor) -> str:
    return f"{method.containing_service.full_name}/{method.name}"


def describe(method: MethodDescriptor) -> str:
    """``limiquantix.node.v1.NodeDaemonService/GetVMStatus(VMIdRequest) returns VMStatusResponse``."""
    stream = "stream " if method.server_streaming else ""
    return f"{full_name(method)}({method.input_type.name}) returns {stream}{method.output_type.name}"


def request_from_json(method: MethodDescriptor, text: str) -> Message:
    """The request message for ``method`` from JSON text (empty text: the empty request)."""
    cls = message_factory.GetMessageClass(method.input_type)
    try:
        return json_format.Parse(text or "{}", cls())
    except json_format.ParseError as exc:
        raise CallError(f"{method.input_type.name}: {exc}") from None


def to_json(message: Message, indent: int | None = None) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=indent)


def invoke(
    channel: grpc.Channel,
    method: MethodDescriptor,
    request: Message,
    timeout: float | None,
    metadata: tuple[tuple[str, str | bytes], ...] | None = None,
) -> Iterator[Message]:
    """Call ``method``: an iterator over the one reply of a unary RPC or each message of a stream."""
    if method.client_streaming:
        raise CallError(f"{full_name(method)} takes a client stream; nodectl sends one request")
    response = message_factory.GetMessageClass(method.output_type)
    path = f"/{full_name(method)}"
    encode: Callable[[Message], bytes] = type(request).SerializeToString
    decode: Callable[[bytes], Message] = response.FromString
    if method.server_streaming:
        stream = channel.unary_stream(path, encode, decode)
        return _stream(stream(request, timeout=timeout, metadata=metadata))
    return iter([channel.unary_unary(path, encode, decode)(request, timeout=timeout, metadata=metadata)])


class _Replies(Protocol):
    """A server stream's call: its messages, and a way to stop it."""

    def __iter__(self) -> Iterator[Message]: ...

    def cancel(self) -> bool: ...


def _stream(call: _Replies) -> Iterator[Message]:
    try:
        yield from call
    finally:
        call.cancel()
