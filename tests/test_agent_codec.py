"""The QTX1 frame codec: exact bytes, and resynchronisation properties under hypothesis."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from quantix.agent import codec
from quantix.agent.codec import HEADER_SIZE, MAGIC, FrameDecoder
from quantix.proto import agent_pb2

SMALL = 4096  # a small frame limit keeps oversize cases cheap
CAP = SMALL + HEADER_SIZE
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ping(seq: int, mid: str = "m") -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(message_id=f"{mid}{seq}", ping=agent_pb2.PingRequest(sequence=seq))


def feed_chunks(dec: FrameDecoder, data: bytes, cuts: list[int]) -> list[agent_pb2.AgentMessage]:
    """Feed ``data`` split at ``cuts``, checking the memory bound after every call."""
    out = []
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += dec.feed(data[last:cut])
        assert dec.buffered <= dec.max_frame + HEADER_SIZE, dec.buffered
        last = cut
    return out


messages = st.builds(
    lambda seq, mid, stdout: agent_pb2.AgentMessage(
        message_id=mid, execute_response=agent_pb2.ExecuteResponse(exit_code=seq, stdout=stdout)
    ),
    st.integers(-5, 5),
    st.text(max_size=20),
    st.text(max_size=300),
)
garbage = st.binary(max_size=600).map(lambda b: b.replace(MAGIC, b"QTXX"))
zero_header = st.just(MAGIC + b"\0\0\0\0")
oversize_header = st.integers(SMALL + 1, 2**32 - 1).map(lambda n: MAGIC + struct.pack(">I", n))
# A false header whose claimed payload is exactly present and does not decode.
undecodable = st.integers(1, 64).map(lambda n: MAGIC + struct.pack(">I", n) + b"\xff" * n)
safe_noise = st.one_of(garbage, zero_header, oversize_header, undecodable)
cuts = st.lists(st.integers(0, 100_000), max_size=12)


class EncodeTests(unittest.TestCase):
    def test_exact_bytes(self) -> None:
        msg = ping(7)
        body = msg.SerializeToString()
        self.assertEqual(codec.encode(msg), b"QTX1" + len(body).to_bytes(4, "big") + body)

    def test_limit(self) -> None:
        big = agent_pb2.AgentMessage(file_write=agent_pb2.FileWriteRequest(data=b"x" * 100))
        self.assertRaises(codec.FrameTooLarge, codec.encode, big, 50)
        self.assertRaises(ValueError, codec.encode, agent_pb2.AgentMessage())

    def test_sixteen_mib_is_the_default_limit(self) -> None:
        self.assertEqual(codec.MAX_FRAME, 16 * 1024 * 1024)
        dec = FrameDecoder()
        self.assertEqual(
            dec.feed(MAGIC + struct.pack(">I", 16 * 1024 * 1024 + 1) + codec.encode(ping(1))), [ping(1)]
        )

    def test_one_byte_at_a_time(self) -> None:
        data = codec.encode(ping(1)) + b"noise" + codec.encode(ping(2))
        dec = FrameDecoder()
        got = [m for i in range(len(data)) for m in dec.feed(data[i : i + 1])]
        self.assertEqual(got, [ping(1), ping(2)])
        self.assertEqual(dec.buffered, 0)

    def test_magic_split_across_garbage_tail(self) -> None:
        dec = FrameDecoder()
        self.assertEqual(dec.feed(b"xxQTX"), [])
        self.assertEqual(dec.buffered, 3)  # only a possible magic prefix is kept
        self.assertEqual(dec.feed(codec.encode(ping(3))[3:]), [ping(3)])
        dec2 = FrameDecoder()
        self.assertEqual(dec2.feed(b"QTX" + codec.encode(ping(4))), [ping(4)])

    def test_message_without_payload_is_noise(self) -> None:
        empty = agent_pb2.AgentMessage(message_id="x").SerializeToString()
        data = MAGIC + struct.pack(">I", len(empty)) + empty + codec.encode(ping(1))
        dec = FrameDecoder()
        self.assertEqual(dec.feed(data), [ping(1)])
        self.assertEqual(dec.false_headers, 1)

    def test_scan_limit_counts_overruns_without_buffering(self) -> None:
        dec = FrameDecoder(scan_limit=1000)
        for _ in range(10):
            dec.feed(b"z" * 500)
            self.assertLessEqual(dec.buffered, 3)
        self.assertEqual(dec.overruns, 4)
        self.assertEqual(dec.discarded, 5000)
        self.assertEqual(dec.feed(codec.encode(ping(9))), [ping(9)])

    def test_resync_releases_frames_behind_a_long_false_header(self) -> None:
        dec = FrameDecoder(max_frame=SMALL)
        good = codec.encode(ping(1)) + codec.encode(ping(2))
        self.assertEqual(dec.feed(MAGIC + struct.pack(">I", SMALL) + good), [])
        self.assertEqual(dec.resync(), [ping(1), ping(2)])
        self.assertEqual(dec.buffered, 0)


class PropertyTests(unittest.TestCase):
    @SETTINGS
    @given(st.lists(messages, max_size=8), cuts)
    def test_round_trip_any_split(self, msgs, cut) -> None:
        data = b"".join(codec.encode(m) for m in msgs)
        self.assertEqual(feed_chunks(FrameDecoder(max_frame=SMALL), data, cut), msgs)

    @SETTINGS
    @given(st.lists(st.one_of(messages, safe_noise), max_size=16), cuts)
    def test_good_frames_after_noise_are_all_recovered(self, parts, cut) -> None:
        """Guaranteed: garbage without the magic, zero and oversize lengths, undecodable payloads."""
        data = b"".join(codec.encode(p) if isinstance(p, agent_pb2.AgentMessage) else p for p in parts)
        expected = [p for p in parts if isinstance(p, agent_pb2.AgentMessage)]
        dec = FrameDecoder(max_frame=SMALL)
        self.assertEqual(feed_chunks(dec, data, cut), expected)
        self.assertIsNone(dec.hostile)  # recovering from noise is within the parse budget

    @SETTINGS
    @given(st.lists(messages, max_size=6), messages, st.integers(1, 40), cuts)
    def test_truncated_frame_then_resync(self, before, cut_msg, keep, cut) -> None:
        """A frame cut short (writer died) loses only itself: earlier frames come out at once,
        later ones on ``resync()`` once its claimed length cannot be met."""
        trunc = codec.encode(cut_msg)[: HEADER_SIZE + keep]
        trunc = trunc[:4] + struct.pack(">I", SMALL) + trunc[8:]  # claims more than will come
        after = [ping(i, "after") for i in range(3)]
        data = b"".join(map(codec.encode, before)) + trunc + b"".join(map(codec.encode, after))
        dec = FrameDecoder(max_frame=SMALL)
        got = feed_chunks(dec, data, cut)
        self.assertEqual(got, before)
        self.assertEqual(dec.resync(), after)

    @SETTINGS
    @given(
        st.lists(
            st.one_of(
                messages,
                safe_noise,
                st.binary(max_size=SMALL * 2),
                st.tuples(messages, st.integers(0, 200)).map(lambda t: codec.encode(t[0])[: t[1]]),
                st.integers(1, SMALL).map(lambda n: MAGIC + struct.pack(">I", n)),
            ),
            max_size=20,
        ),
        cuts,
    )
    def test_arbitrary_streams_never_crash_and_stay_bounded(self, parts, cut) -> None:
        data = b"".join(codec.encode(p) if isinstance(p, agent_pb2.AgentMessage) else p for p in parts)
        dec = FrameDecoder(max_frame=SMALL)
        for m in feed_chunks(dec, data, cut) + dec.resync():
            self.assertIsNotNone(m.WhichOneof("payload"))
        self.assertLessEqual(dec.buffered, CAP)

    @settings(max_examples=30, deadline=None)
    @given(st.integers(1, 5))
    def test_flood_larger_than_limit_stays_bounded(self, n) -> None:
        dec = FrameDecoder(max_frame=SMALL)
        flood = (MAGIC + struct.pack(">I", SMALL) + b"\xff" * SMALL) * n + b"y" * (CAP * 3)
        self.assertEqual(dec.feed(flood + codec.encode(ping(1))), [ping(1)])
        self.assertLessEqual(dec.buffered, CAP)


class HostileInputTests(unittest.TestCase):
    """A guest crafting false headers cannot make the host's work grow faster than its bytes."""

    def counting_decoder(self, **kw) -> tuple[FrameDecoder, dict]:
        seen = {"bytes": 0, "calls": 0, "types": set()}

        def parse(payload):
            seen["bytes"] += len(payload)
            seen["calls"] += 1
            seen["types"].add(type(payload))
            return codec._parse(payload)

        return FrameDecoder(parse=parse, **kw), seen

    def test_overlapping_false_headers_cost_linear_parse_work(self) -> None:
        # Every 8 bytes a header claiming 64 KiB: each one's payload covers the next 8,000 headers.
        claim = 64 * 1024
        data = (MAGIC + struct.pack(">I", claim)) * 32_768 + b"\0" * (claim + 8)
        dec, seen = self.counting_decoder()
        self.assertEqual(dec.feed(data + codec.encode(ping(1))), [ping(1)])
        self.assertLessEqual(seen["bytes"], codec.WORK_RATIO * (len(data) + 100))
        self.assertEqual(seen["types"], {memoryview})  # parsed in place, never copied
        self.assertIn("false frame headers", dec.hostile)
        self.assertGreater(dec.throttled, 30_000)

    def test_parse_budget_is_per_byte_received_not_banked(self) -> None:
        """A long honest history does not buy a later burst of unbounded parsing."""
        dec, seen = self.counting_decoder(max_frame=SMALL)
        for i in range(2000):
            dec.feed(codec.encode(ping(i)))
        honest = seen["bytes"]
        burst = (MAGIC + struct.pack(">I", SMALL)) * 4096 + b"\0" * CAP
        dec.feed(burst)
        self.assertLessEqual(seen["bytes"] - honest, codec.WORK_RATIO * (len(burst) + CAP))
        self.assertIsNotNone(dec.hostile)

    def test_honest_stream_behind_a_stale_false_header_is_not_hostile(self) -> None:
        dec = FrameDecoder(max_frame=SMALL)
        stale = MAGIC + struct.pack(">I", 2000) + b"stale"
        frames = [ping(i) for i in range(300)]
        got = dec.feed(stale + b"".join(map(codec.encode, frames)))
        self.assertEqual(got[-150:], frames[-150:])
        self.assertIsNone(dec.hostile)

    def test_endless_garbage_is_hostile(self) -> None:
        dec = FrameDecoder(garbage_limit=100_000)
        for _ in range(9):
            dec.feed(b"z" * 10_000)
            dec.feed(codec.encode(ping(1)))  # a valid frame resets the run
        self.assertIsNone(dec.hostile)
        dec.feed(b"z" * 100_001)
        self.assertIn("without a valid frame", dec.hostile)
        self.assertLessEqual(dec.buffered, 3)
