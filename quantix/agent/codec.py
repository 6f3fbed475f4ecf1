"""QTX1 framing of ``AgentMessage`` on the virtio-serial channel; pure, no I/O.

A frame is ``b"QTX1"``, a 4-byte big-endian length and that many bytes of a serialized
``limiquantix.agent.v1.AgentMessage``. A virtio-serial port keeps stale bytes across guest and
host restarts, so the decoder never trusts the stream: it hunts for the magic, and treats a zero
or oversize length, an undecodable payload, or a payload with no ``payload`` oneof as a false
header, resuming the hunt one byte after that false magic.

Recovery guarantees (checked by property tests in ``tests/test_agent_codec.py``):

* Memory: the buffer never holds more than ``max_frame + HEADER_SIZE`` bytes, whatever is fed.
* A good frame preceded by bytes that contain no ``QTX1`` is always decoded.
* A good frame preceded by a false header whose length is zero or oversize, or whose claimed
  payload (which may overlap the good frame) fails to decode, is decoded as soon as the false
  header's claimed length has arrived.
* Not guaranteed: a false header whose claimed payload parses as a valid message swallows the
  bytes it claims; and a false header with a large valid length holds back the frames after it
  until that many bytes arrive, or until :meth:`FrameDecoder.resync` is called (the protocol does
  so after a request times out).

Cost: the guest is untrusted, so the work is linear in the bytes received. The hunt is
``bytearray.find`` (C speed, each byte looked at once); a candidate payload is parsed in place
through a ``memoryview`` (never copied); and parsing is paid from a budget that grows by
``work_ratio`` bytes per byte received (capped, so credit cannot be banked for a burst). Crafted
input can otherwise make every byte offset a header whose claimed payload overlaps the next ones,
which costs the claimed length each time: quadratic. A candidate the budget cannot pay for is
skipped unparsed, and the stream is flagged :attr:`FrameDecoder.hostile` (so is one that sends
``garbage_limit`` bytes without a valid frame); the protocol drops such a channel. An honest
stream, even one recovering from stale bytes, needs at most about twice its size in parsing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from google.protobuf.message import DecodeError

from quantix.proto import agent_pb2

MAGIC = b"QTX1"
HEADER_SIZE = 8
MAX_FRAME = 16 * 1024 * 1024
SCAN_LIMIT = 64 * 1024
#: parse budget: bytes of candidate payload that may be parsed per byte received
WORK_RATIO = 4
#: bytes without one valid frame after which a stream counts as hostile
GARBAGE_LIMIT = 1024 * 1024
_LEN = struct.Struct(">I")


class FrameTooLarge(ValueError):
    """An outgoing message exceeds the frame limit the guest accepts."""


def encode(message: agent_pb2.AgentMessage, max_frame: int = MAX_FRAME) -> bytes:
    """Serialize one message into one frame."""
    body = message.SerializeToString()
    if not body:
        raise ValueError("an empty AgentMessage cannot be framed (zero length means resync)")
    if len(body) > max_frame:
        raise FrameTooLarge(f"agent message of {len(body)} bytes exceeds {max_frame}")
    return MAGIC + _LEN.pack(len(body)) + body


def _parse(data: memoryview) -> agent_pb2.AgentMessage | None:
    try:
        msg = agent_pb2.AgentMessage.FromString(data)  # type: ignore[arg-type]  # any buffer, no copy
    except DecodeError:
        return None
    # A message without a payload is useless to either side; treating it as noise also rejects
    # most random byte strings that protobuf would otherwise accept as unknown fields.
    return msg if msg.WhichOneof("payload") else None


class FrameDecoder:
    """Incremental decoder: feed bytes, get complete messages; resynchronises on the magic."""

    def __init__(
        self,
        max_frame: int = MAX_FRAME,
        scan_limit: int = SCAN_LIMIT,
        parse: Callable[[memoryview], agent_pb2.AgentMessage | None] = _parse,
        work_ratio: int = WORK_RATIO,
        garbage_limit: int = GARBAGE_LIMIT,
    ) -> None:
        self.max_frame = max_frame
        self.scan_limit = scan_limit
        self.garbage_limit = garbage_limit
        self._parse = parse
        self._buf = bytearray()
        self._cap = max_frame + HEADER_SIZE
        self._ratio = work_ratio
        self._credit = 0
        self._credit_cap = work_ratio * self._cap
        self._run = 0  # garbage bytes skipped since the last overrun signal
        self._garbage = 0  # garbage bytes skipped since the last good frame
        #: bytes discarded as noise, false headers rejected, scan-limit overruns (for logs/metrics)
        self.discarded = 0
        self.false_headers = 0
        self.overruns = 0
        #: candidate payloads skipped unparsed because the parse budget was spent
        self.throttled = 0
        #: why this stream counts as hostile, or None (it stays set once set)
        self.hostile: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held right now (always <= max_frame + HEADER_SIZE)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[agent_pb2.AgentMessage]:
        """Consume ``data``; return every message completed by it, in stream order."""
        out: list[agent_pb2.AgentMessage] = []
        view = memoryview(data)
        while view:
            chunk = view[: self._cap - len(self._buf)]
            view = view[len(chunk) :]
            self._buf += chunk
            self._credit = min(self._credit_cap, self._credit + self._ratio * len(chunk))
            self._drain(out)
        return out

    def resync(self) -> list[agent_pb2.AgentMessage]:
        """Give up on a partially received frame and hunt again from just after its magic.

        Used when the peer went quiet while we wait for a long payload: the header was
        probably false.
        """
        out: list[agent_pb2.AgentMessage] = []
        if self._buf[:4] == MAGIC:
            self._skip(1)
            self.false_headers += 1
            del self._buf[:1]
        self._drain(out)
        return out

    def _skip(self, n: int) -> None:
        self.discarded += n
        self._garbage += n
        if self._garbage > self.garbage_limit and self.hostile is None:
            self.hostile = f"{self._garbage} bytes without a valid frame"
        self._run += n
        while self._run > self.scan_limit:
            # Garbage is never kept, so this is a signal for the logs, not a memory guard.
            self.overruns += 1
            self._run -= self.scan_limit

    def _candidate(self, view: memoryview, pos: int, length: int) -> agent_pb2.AgentMessage | None:
        """Parse the payload a header at ``pos`` claims, in place, if the budget allows."""
        if length > self._credit:
            self.throttled += 1
            if self.hostile is None:
                self.hostile = f"false frame headers cost more than {self._ratio}x the bytes received"
            return None
        self._credit -= length
        with view[pos + HEADER_SIZE : pos + HEADER_SIZE + length] as payload:
            return self._parse(payload)

    def _drain(self, out: list[agent_pb2.AgentMessage]) -> None:
        buf = self._buf
        pos = 0
        end = len(buf)
        with memoryview(buf) as view:
            while True:
                at = buf.find(MAGIC, pos)
                if at < 0:
                    # Keep only a tail that could be the start of the magic.
                    keep = end
                    for k in (3, 2, 1):
                        if end - pos >= k and buf.endswith(MAGIC[:k]):
                            keep = end - k
                            break
                    self._skip(keep - pos)
                    pos = keep
                    break
                if at > pos:
                    self._skip(at - pos)
                    pos = at
                if end - pos < HEADER_SIZE:
                    break
                (length,) = _LEN.unpack_from(buf, pos + 4)
                if length == 0 or length > self.max_frame:
                    self.false_headers += 1
                    self._skip(1)
                    pos += 1
                    continue
                if end - pos < HEADER_SIZE + length:
                    break
                msg = self._candidate(view, pos, length)
                if msg is None:
                    self.false_headers += 1
                    self._skip(1)
                    pos += 1
                    continue
                out.append(msg)
                pos += HEADER_SIZE + length
                self._run = self._garbage = 0
        del buf[:pos]
