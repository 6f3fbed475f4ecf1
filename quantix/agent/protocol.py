"""One guest agent connection as a Twisted protocol: framing, request/reply correlation, timeouts.

Each request gets a fresh ``message_id`` and its own Deferred and timer; the guest may answer out
of order. Unsolicited ``agent_ready``/``telemetry``/``error`` frames go to a callback. When the
connection drops every request in flight fails at once (instead of waiting for its timeout).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from quantix.agent import codec
from quantix.errors import Invalid, QuantixError, Timeout, Unavailable
from quantix.proto import agent_pb2

_PAYLOAD = agent_pb2.AgentMessage.DESCRIPTOR.oneofs_by_name["payload"]
#: request message type name -> oneof field name ("PingRequest" -> "ping")
_REQUEST_FIELD = {
    f.message_type.full_name: f.name for f in _PAYLOAD.fields if f.number < 50 and f.message_type
}
#: request field name -> the response field name the guest answers with (tag + 40)
_REPLY_FIELD = {
    f.name: agent_pb2.AgentMessage.DESCRIPTOR.fields_by_number[f.number + 40].name
    for f in _PAYLOAD.fields
    if f.number < 50 and f.number + 40 in agent_pb2.AgentMessage.DESCRIPTOR.fields_by_number
}
#: A reply message class.
R = TypeVar("R", bound=Message)
UNSOLICITED = frozenset({"telemetry", "agent_ready", "error", "clipboard_changed"})


class AgentError(QuantixError):
    """The guest answered a request with an ``ErrorEvent`` or a mismatched reply."""


class ConnectionLost(Unavailable):
    """The channel dropped while the request was in flight (it may have been carried out)."""


def request_field(payload: Message) -> str:
    """The ``AgentMessage`` oneof field that carries this request message."""
    try:
        return _REQUEST_FIELD[payload.DESCRIPTOR.full_name]
    except KeyError:
        raise Invalid(f"{payload.DESCRIPTOR.full_name} is not an agent request") from None


def expect(reply: Message, kind: type[R]) -> R:
    """``reply`` as the message its request is answered with. :meth:`AgentProtocol.request`
    already refuses a reply of another kind; this says so to the type checker."""
    if not isinstance(reply, kind):
        raise AgentError(f"guest answered with {reply.DESCRIPTOR.name}, expected {kind.DESCRIPTOR.name}")
    return reply


def set_timestamp(ts: Timestamp, seconds: float) -> None:
    """Set a protobuf Timestamp from a clock reading (float seconds)."""
    whole = int(seconds)
    ts.seconds = whole
    ts.nanos = int((seconds - whole) * 1e9)


class _Pending:
    __slots__ = ("deferred", "op", "reply_field", "timer")

    def __init__(
        self, deferred: defer.Deferred[Message], timer: IDelayedCall, reply_field: str, op: str
    ) -> None:
        self.deferred = deferred
        self.timer = timer
        self.reply_field = reply_field
        self.op = op


class AgentProtocol(Protocol):
    """Host side of one channel connection."""

    log = Logger()
    #: seconds without input after which a half-received frame is suspect (see _timed_out)
    stall = 1.0
    #: names the channel in logs (the VM id when supervised by the manager)
    label = "agent"

    def __init__(
        self,
        clock: IReactorTime,
        on_unsolicited: Callable[[agent_pb2.AgentMessage], None] | None = None,
        decoder: codec.FrameDecoder | None = None,
    ) -> None:
        self.clock = clock
        self.on_unsolicited = on_unsolicited
        self.decoder = decoder or codec.FrameDecoder()
        self.connected = False
        self._pending: dict[str, _Pending] = {}
        self._overruns = 0
        self._last_rx = clock.seconds()
        self.dropped: str | None = None  # why we hung up on a hostile stream

    # -- requests ---------------------------------------------------------------------------

    def request(self, payload: Message, timeout: float) -> defer.Deferred[Message]:
        """Send ``payload`` (e.g. ``PingRequest``); fire with the guest's reply payload message.

        Fails with :class:`Unavailable` when not connected or when the channel drops,
        :class:`Timeout` after ``timeout`` seconds, :class:`AgentError` on an error reply.
        """
        try:
            field = request_field(payload)
        except Invalid as e:
            return defer.fail(e)
        if not self.connected:
            return defer.fail(Unavailable("agent channel is not connected"))
        msg = agent_pb2.AgentMessage(message_id=str(uuid.uuid4()))
        set_timestamp(msg.timestamp, self.clock.seconds())
        getattr(msg, field).CopyFrom(payload)
        try:
            frame = codec.encode(msg, self.decoder.max_frame)
        except codec.FrameTooLarge as e:
            return defer.fail(Invalid(str(e)))
        mid = msg.message_id

        def cancel(_: defer.Deferred[Message]) -> None:
            p = self._pending.pop(mid, None)
            if p is not None and p.timer.active():
                p.timer.cancel()

        d: defer.Deferred[Message] = defer.Deferred(cancel)
        timer = self.clock.callLater(timeout, self._timed_out, mid, timeout)
        self._pending[mid] = _Pending(d, timer, _REPLY_FIELD.get(field, ""), field)
        assert self.transport is not None  # connected (checked above) implies a transport
        self.transport.write(frame)  # buffered by the transport, never blocks
        return d

    def _timed_out(self, mid: str, timeout: float) -> None:
        p = self._pending.pop(mid, None)
        if p is None:
            return
        if self.decoder.buffered and self.clock.seconds() - self._last_rx >= self.stall:
            # The stream is idle with a frame half received: its header was probably false and
            # swallowed the replies. Hunt for the magic again (qga clients re-sync after every
            # timeout). A frame still streaming in is left alone.
            for msg in self.decoder.resync():
                self._dispatch(msg)
        p.deferred.errback(Timeout(f"guest agent did not answer {p.op} within {timeout:g}s"))

    @property
    def pending(self) -> int:
        """Requests in flight."""
        return len(self._pending)

    # -- stream -----------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        if self.dropped:
            return  # hung up on a hostile stream; bytes still in flight are not worth decoding
        self._last_rx = self.clock.seconds()
        for msg in self.decoder.feed(data):
            self._dispatch(msg)
        if self.decoder.overruns != self._overruns:
            self._overruns = self.decoder.overruns
            self.log.warn(
                "agent channel {label}: {n} bytes of noise discarded so far",
                label=self.label,
                n=self.decoder.discarded,
            )
        if self.decoder.hostile:
            self._drop_hostile(self.decoder.hostile)

    def _drop_hostile(self, reason: str) -> None:
        """Hang up on a stream that keeps sending garbage; the supervisor decides when to retry."""
        self.dropped = reason
        self.log.warn(
            "agent channel {label}: hanging up on a hostile stream: {reason} ({n} bytes discarded)",
            label=self.label,
            reason=reason,
            n=self.decoder.discarded,
        )
        self.transport.abortConnection()  # type: ignore[union-attr]  # a connected TCP/UNIX transport

    def _dispatch(self, msg: agent_pb2.AgentMessage) -> None:
        kind = msg.WhichOneof("payload")
        if kind in UNSOLICITED:
            p = self._pending.pop(msg.message_id, None) if kind == "error" else None
            if p is not None:
                # An ErrorEvent carrying a request's id is the guest's answer to it.
                p.timer.cancel()
                err = msg.error
                p.deferred.errback(AgentError(f"{err.code}: {err.message}" if err.code else err.message))
            elif self.on_unsolicited is not None:
                try:
                    self.on_unsolicited(msg)
                except Exception:
                    self.log.failure("agent unsolicited-message callback failed")
            return
        p = self._pending.pop(msg.message_id, None)
        if p is None:
            self.log.debug("agent reply {kind} for unknown request {mid}", kind=kind, mid=msg.message_id)
            return
        p.timer.cancel()
        if kind is None or (p.reply_field and kind != p.reply_field):
            p.deferred.errback(AgentError(f"guest answered {p.op} with {kind}"))
            return
        p.deferred.callback(getattr(msg, kind))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.timer.active():
                p.timer.cancel()
            p.deferred.errback(ConnectionLost(f"agent channel closed during {p.op}"))


def payload_of(msg: agent_pb2.AgentMessage) -> Message | None:
    """The message inside the oneof, or None."""
    kind = msg.WhichOneof("payload")
    return getattr(msg, kind) if kind else None
