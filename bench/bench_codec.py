"""Guest-agent frame decoder: host CPU per MiB of hostile input vs. valid frames.

The guest is untrusted, so the decoder's cost must be linear in what it sends. Each input is fed
in 64 KiB reads (what the reactor hands over) to a fresh ``FrameDecoder``; the figure is this
process's CPU time per MiB, the median of ``--runs``. The floor, in the same run, is a stream of
valid telemetry frames.

Hostile inputs: random bytes; a false ``QTX1`` header every 8 bytes claiming 64 KiB or 1 MiB
(each claimed payload covers thousands of later headers: the quadratic case); and short
headers with undecodable payloads. The ``unbudgeted`` rows run the same dense-header input
through a decoder whose parse budget is disabled and which copies every candidate payload (the
decoder before the budget) at two small sizes: its cost per MiB grows with the input size.

usage: python bench/bench_codec.py [--mib 4] [--runs 5]
"""

from __future__ import annotations

import argparse
import random
import struct
import time

from common import median, table

from quantix.agent import codec
from quantix.proto import agent_pb2

READ = 64 * 1024
MIB = 1024 * 1024


def valid(size: int) -> bytes:
    report = agent_pb2.TelemetryReport(cpu_usage_percent=12.5, memory_total_bytes=1 << 30, hostname="bench")
    report.interfaces.add(name="eth0", mac_address="52:54:00:12:34:56", ipv4_addresses=["10.0.0.5/24"])
    frame = codec.encode(agent_pb2.AgentMessage(message_id="bench", telemetry=report))
    return frame * (size // len(frame))


def noise(size: int) -> bytes:
    return random.Random(1).randbytes(size).replace(codec.MAGIC, b"QTXX")


def dense_headers(claim: int) -> callable:
    def make(size: int) -> bytes:
        return (codec.MAGIC + struct.pack(">I", claim)) * (size // 8)

    return make


def undecodable(size: int) -> bytes:
    unit = codec.MAGIC + struct.pack(">I", 24) + b"\xff" * 24
    return unit * (size // len(unit))


def cpu_per_mib(data: bytes, runs: int, make_decoder=codec.FrameDecoder) -> tuple[float, codec.FrameDecoder]:
    samples = []
    dec = None
    for _ in range(runs):
        dec = make_decoder()
        start = time.process_time()
        for offset in range(0, len(data), READ):
            dec.feed(data[offset : offset + READ])
        samples.append((time.process_time() - start) / (len(data) / MIB))
    return median(samples), dec


def unbudgeted() -> codec.FrameDecoder:
    return codec.FrameDecoder(work_ratio=1 << 40, parse=lambda view: codec._parse(bytes(view)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=float, default=4.0, help="input size per row")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    size = int(args.mib * MIB)

    floor, _ = cpu_per_mib(valid(size), args.runs)
    rows = [["valid telemetry frames (floor)", floor * 1e3, 1.0, "-"]]
    for name, make in (
        ("random bytes", noise),
        ("false header every 8 B claiming 64 KiB", dense_headers(64 * 1024)),
        ("false header every 8 B claiming 1 MiB", dense_headers(MIB)),
        ("short headers, undecodable payloads", undecodable),
    ):
        spent, dec = cpu_per_mib(make(size), args.runs)
        rows.append([name, spent * 1e3, spent / floor, dec.hostile or "-"])
    for kib in (128, 256):
        spent, _ = cpu_per_mib(dense_headers(64 * 1024)(kib * 1024), 1, unbudgeted)
        rows.append(
            [f"unbudgeted, copying decoder, 64 KiB claims, {kib} KiB input", spent * 1e3, spent / floor, "-"]
        )
    table(
        f"Agent frame decoder, {args.mib:g} MiB per input fed in 64 KiB reads (CPU ms per MiB)",
        ["input", "CPU ms/MiB", "x valid", "flagged hostile"],
        rows,
    )


if __name__ == "__main__":
    main()
