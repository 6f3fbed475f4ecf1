"""Guest-agent channel: ping round trip, and the host CPU cost of many agents sending telemetry.

* Ping: ``AgentManager.request(PingRequest)`` to the reference guest peer (another process) vs.
  the floor: a raw protocol writing the same pre-encoded frame and waiting for the reply bytes.
* Telemetry: N agents (default 500) each sending telemetry every 5 s, decoded into the guest-info
  cache, vs. the floor: the same connections read by a protocol that discards the bytes. The
  figure is this process's CPU time over the window.

usage: python bench/bench_agent.py [--pings 2000] [--agents 500] [--window 20]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, median, pct, table
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import UNIXClientEndpoint

from quantix.agent import codec
from quantix.agent.manager import AgentManager
from quantix.proto import agent_pb2


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peers(directory: str, count: int, telemetry: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "agent_peers.py"),
            directory,
            str(count),
            str(telemetry),
        ],
        stdout=subprocess.PIPE,
    )
    proc.stdout.readline()
    return proc


class Raw(protocol.Protocol):
    """The floor: no decoding, no Deferred bookkeeping."""

    def __init__(self) -> None:
        self.waiting: defer.Deferred | None = None

    def dataReceived(self, data: bytes) -> None:
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.callback(None)


class Sink(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


@defer.inlineCallbacks
def ping_bench(directory: str, pings: int):
    proc = peers(directory, 1, 0)
    try:
        path = os.path.join(directory, "vm-0000.agent.sock")
        manager = AgentManager(reactor, socket_dir=directory, channel_roots=())
        manager.vm_started("vm-0000", socket_path=path)
        yield manager.when_connected("vm-0000")
        ours = []
        for seq in range(pings):
            t = time.perf_counter()
            yield manager.request("vm-0000", agent_pb2.PingRequest(sequence=seq), 10)
            ours.append(time.perf_counter() - t)
        yield manager.stop_all()

        raw = yield UNIXClientEndpoint(reactor, path).connect(protocol.Factory.forProtocol(Raw))
        frame = codec.encode(agent_pb2.AgentMessage(message_id="raw", ping=agent_pb2.PingRequest(sequence=1)))
        floor = []
        for _ in range(pings):
            raw.waiting = defer.Deferred()
            t = time.perf_counter()
            raw.transport.write(frame)
            yield raw.waiting
            floor.append(time.perf_counter() - t)
        raw.transport.loseConnection()
    finally:
        proc.terminate()
        proc.wait()
    return floor, ours


@defer.inlineCallbacks
def telemetry_bench(directory: str, agents: int, window: float):
    proc = peers(directory, agents, 5.0)
    try:
        paths = [os.path.join(directory, f"vm-{n:04d}.agent.sock") for n in range(agents)]
        sinks = yield defer.gatherResults(
            [UNIXClientEndpoint(reactor, p).connect(protocol.Factory.forProtocol(Sink)) for p in paths]
        )
        yield task.deferLater(reactor, 1, lambda: None)
        start = cpu()
        yield task.deferLater(reactor, window, lambda: None)
        floor = cpu() - start
        for s in sinks:
            s.transport.loseConnection()

        manager = AgentManager(reactor, socket_dir=directory, channel_roots=())
        for n, path in enumerate(paths):
            manager.vm_started(f"vm-{n:04d}", socket_path=path)
        yield defer.gatherResults([manager.when_connected(f"vm-{n:04d}") for n in range(agents)])
        yield task.deferLater(reactor, 6, lambda: None)  # every agent said ready and sent telemetry
        connected = sum(manager.info(f"vm-{n:04d}").connected for n in range(agents))
        start = cpu()
        yield task.deferLater(reactor, window, lambda: None)
        ours = cpu() - start
        yield manager.stop_all()
    finally:
        proc.terminate()
        proc.wait()
    return floor, ours, connected


@defer.inlineCallbacks
def run(args):
    directory = tempfile.mkdtemp(prefix="qtx-agent-bench-")
    try:
        floor, ours = yield ping_bench(directory, args.pings)
        table(
            f"Agent ping round trip, {args.pings} sequential pings (ms)",
            ["path", "p50", "p99", "ratio p50"],
            [
                ["raw frame echo (floor)", median(floor) * 1e3, pct(floor, 0.99) * 1e3, 1.0],
                [
                    "AgentManager.request",
                    median(ours) * 1e3,
                    pct(ours, 0.99) * 1e3,
                    median(ours) / median(floor),
                ],
            ],
        )
        floor_cpu, our_cpu, connected = yield telemetry_bench(directory, args.agents, args.window)
        msgs = args.agents * args.window / 5.0
        table(
            f"{args.agents} agents, telemetry every 5 s, {args.window:.0f} s window ({connected} connected)",
            ["reader", "CPU s", "% of one core", "µs per message", "ratio"],
            [
                [name, spent, 100 * spent / args.window, spent / msgs * 1e6, spent / max(floor_cpu, 1e-9)]
                for name, spent in (
                    ("discard bytes (floor)", floor_cpu),
                    ("decode + guest-info cache", our_cpu),
                )
            ],
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--window", type=float, default=20.0)
    args = parser.parse_args()
    task.react(lambda _reactor: run(args))


if __name__ == "__main__":
    main()
