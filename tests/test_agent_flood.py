"""A guest that floods the channel with a million bad and good frames cannot hurt the host.

The guest side writes random garbage, truncated frames, oversize and zero lengths, undecodable
payloads and valid telemetry through a real UNIX socket; afterwards the channel still answers a
ping, the decoder never buffered more than one frame, and the guest-info cache did not grow.
"""

from __future__ import annotations

import random
import struct

from twisted.internet import defer
from twisted.trial import unittest

from quantix.agent import codec
from quantix.proto import agent_pb2
from tests.guestpeer import ChannelFixture, default_telemetry

FRAMES = 1_000_000
CHUNK = 1 << 20


def flood(rng: random.Random, count: int) -> bytes:
    """``count`` frames of every kind, deterministic for the seed."""
    good = codec.encode(agent_pb2.AgentMessage(message_id="flood", telemetry=default_telemetry()))
    header = struct.Struct(">I")
    parts = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            parts.append(rng.randbytes(rng.randrange(1, 64)))  # noise
        elif kind == 1:
            parts.append(
                codec.MAGIC + header.pack(rng.randrange(1, 512)) + rng.randbytes(rng.randrange(0, 16))
            )
        elif kind == 2:
            parts.append(codec.MAGIC + header.pack(codec.MAX_FRAME + rng.randrange(1, 1 << 30)))  # oversize
        elif kind == 3:
            parts.append(codec.MAGIC + header.pack(0))  # zero length
        elif kind == 4:
            body = rng.randbytes(rng.randrange(1, 48))
            parts.append(codec.MAGIC + header.pack(len(body)) + body)  # undecodable (mostly)
        else:
            parts.append(good)
    # Whatever length a last truncated header claimed (< 512), noise without magic completes it.
    parts.append(b"\0" * 1024)
    return b"".join(parts)


class FloodTests(unittest.TestCase):
    timeout = 300

    @defer.inlineCallbacks
    def test_million_frame_flood(self):
        channel = ChannelFixture()
        channel.setup(self)
        yield channel.start()
        proto = yield channel.manager.when_connected(channel.vm)
        peak = {"buffered": 0}
        original = proto.dataReceived

        def watched(data: bytes) -> None:
            original(data)
            peak["buffered"] = max(peak["buffered"], proto.decoder.buffered)

        proto.dataReceived = watched
        blob = flood(random.Random(1234), FRAMES)
        for offset in range(0, len(blob), CHUNK):
            channel.peer.inject(blob[offset : offset + CHUNK])
        reply = yield channel.manager.request(channel.vm, agent_pb2.PingRequest(sequence=7), timeout=120)
        self.assertEqual(reply.sequence, 7)
        self.assertLessEqual(peak["buffered"], codec.MAX_FRAME + codec.HEADER_SIZE)
        self.assertEqual(proto.decoder.buffered, 0)
        self.assertTrue(channel.manager.info(channel.vm).connected)
        self.assertEqual(len(channel.manager.guests._info), 1)
