"""Reactor lag while 200 clients call RPCs and an event storm runs (target p99 <= 5 ms).

The daemon runs in this process on the test driver. A 10 ms LoopingCall records how late each
tick fires; the baseline is the same measurement on the idle daemon in the same run. Clients run
in another process; the storm suspends and resumes test-driver domains from worker threads, so
every change comes back as libvirt events through the bus.

usage: python bench/bench_reactor_lag.py [--clients 200] [--seconds 10] [--storm-rate 2000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

from common import ROOT, median, pct, table
from twisted.internet import defer, reactor, task, threads

from quantix import config as cfg
from quantix.node import NodeService

TICK = 0.010


def lag_sampler(seconds: float) -> defer.Deferred:
    """Tick lags over ``seconds``; the last element is the reactor thread's CPU share."""
    lags: list[float] = []
    expected = [time.monotonic() + TICK]
    cpu0, wall0 = time.thread_time(), time.monotonic()

    def tick() -> None:
        now = time.monotonic()
        lags.append(max(0.0, now - expected[0]))
        expected[0] = now + TICK

    loop = task.LoopingCall(tick)
    loop.start(TICK, now=False)

    def done() -> tuple[list[float], float]:
        loop.stop()
        return lags, (time.thread_time() - cpu0) / (time.monotonic() - wall0)

    return task.deferLater(reactor, seconds, done)


def storm(node: NodeService, stop: threading.Event, count: list[int], rate: float) -> None:
    """Suspend/resume domains at ``rate`` state changes per second (the test driver is µs-fast)."""
    conn = node.hypervisor.conn()
    domains = [d for d in conn.listAllDomains() if d.isActive()]
    started = time.monotonic()
    while not stop.is_set():
        for dom in domains:
            dom.suspend()
            dom.resume()
            count[0] += 2
        ahead = count[0] / rate - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)


@defer.inlineCallbacks
def run(args):
    tmp = tempfile.mkdtemp(prefix="qtx-lag-")
    node_xml = os.path.join(tmp, "node.xml")
    with open(node_xml, "w") as fh:
        fh.write("<node>")
        for n in range(20):
            fh.write(
                "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
                f"<name>lag-{n}</name><memory>65536</memory><vcpu>1</vcpu>"
                "<os><type arch='x86_64'>hvm</type></os><test:runstate>1</test:runstate></domain>"
            )
        fh.write("</node>")
    values = {
        "listen_address": ("127.0.0.1:0", "bench"),
        "state_dir": (os.path.join(tmp, "state"), "bench"),
        "hypervisor.uri": (f"test://{node_xml}", "bench"),
        "agent.socket_dir": (os.path.join(tmp, "agents"), "bench"),
        "server.metrics_listen": (None, "bench"),
        "https.listen": (None, "bench"),
        "server.max_workers": (args.max_workers or args.clients + 16, "bench"),
        "server.switch_interval_ms": (args.switch_interval_ms, "bench"),
    }
    node = NodeService(cfg.build(values), reactor)
    node.startService()
    while not node.hypervisor.connected:
        yield task.deferLater(reactor, 0.05, lambda: None)
    yield task.deferLater(reactor, 1, lambda: None)
    idle, idle_cpu = yield lag_sampler(args.seconds)

    address = f"127.0.0.1:{node.grpc.port}"
    clients = subprocess.Popen(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "load_clients.py"),
            address,
            f"{args.clients}",
            f"{args.seconds}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    stop, count = threading.Event(), [0]
    storming = threads.deferToThread(storm, node, stop, count, args.storm_rate)
    loaded, loaded_cpu = yield lag_sampler(args.seconds)
    stop.set()
    yield storming
    out = yield threads.deferToThread(clients.communicate)
    published = node.bus.published
    yield node.stopService()
    rows = [
        ["idle daemon (baseline)", median(idle) * 1e3, pct(idle, 0.99) * 1e3, max(idle) * 1e3,
         idle_cpu * 100],
        [f"{args.clients} clients + {args.storm_rate:.0f} changes/s", median(loaded) * 1e3,
         pct(loaded, 0.99) * 1e3, max(loaded) * 1e3, loaded_cpu * 100],
    ]  # fmt: skip
    table(
        f"Reactor lag, {TICK * 1e3:.0f} ms ticks over {args.seconds:.0f} s (target p99 <= 5 ms)",
        ["condition", "p50 ms", "p99 ms", "max ms", "reactor CPU %"],
        rows,
    )
    print(f"clients: {out[0].strip()}; storm: {count[0]} libvirt state changes, {published} events published")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--storm-rate", type=float, default=2000.0, help="libvirt state changes per second")
    parser.add_argument("--max-workers", type=int, default=0, help="server.max_workers (0: clients + 16)")
    parser.add_argument("--switch-interval-ms", type=float, default=1.0, help="server.switch_interval_ms")
    args = parser.parse_args()
    task.react(lambda _reactor: run(args))


if __name__ == "__main__":
    main()
