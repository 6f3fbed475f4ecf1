"""Event latency and fan-out: a libvirt state change to the gRPC client receiving the NodeEvent.

The daemon (NodeService) runs in this process on the test driver; a driver thread suspends and
resumes a domain through the daemon's own libvirt connection, as any libvirt client would, and
subscribers in a separate process read StreamEvents over real gRPC. The baseline is a raw libvirt
callback in the same process (no reactor hop, no bus, no gRPC), measured in the same run. The
floor is a bare grpcio server in the same process handing pre-serialized events to its streams
through plain queues, read by the same client process: grpcio's per-message cost (a thread
wakeup and a completion-queue round trip per message per stream, on both sides) bounds fan-out
latency and rate, so read the daemon against it.

Everything is measured ``--runs`` times (five by default) and reported as min / median / max,
so one lucky or unlucky run on a shared machine shows as spread rather than as the result.

usage: python bench/bench_events.py [--toggles 300] [--burst 5000] [--pace 0.02] [--runs 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import libvirt
from common import median, pct, table
from google.protobuf.empty_pb2 import Empty
from twisted.internet import reactor, threads

from quantix.events.bus import RESUME_HEADER
from quantix.proto import node_grpc, node_pb2
from quantix.rpc.server import SERVICE
from tests.support import test_config

VM = "vm-running"


def read_streams(address: str, n: int, count: int, out) -> None:
    """Child process: ``n`` StreamEvents clients, each reads ``count`` events and, like a real
    client, resumes after the last id it saw when it is cut off for being slow. Sends back
    per-client ``(ids, arrival times, reconnects, gaps)``; ``perf_counter`` is CLOCK_MONOTONIC,
    shared with the parent."""
    channel = grpc.insecure_channel(address)
    stub = node_grpc.NodeDaemonServiceStub(channel)
    results: list = [None] * n

    def read(i: int) -> None:
        ids, times, reconnects, gaps = [], [], 0, 0
        while len(ids) < count:
            md = [(RESUME_HEADER, str(ids[-1]))] if ids else None
            stream = stub.StreamEvents(Empty(), metadata=md, timeout=300)
            try:
                for event in stream:
                    if event.metadata.get("gap") == "true":
                        gaps += 1
                        continue
                    times.append(time.perf_counter())
                    ids.append(int(event.id))
                    if len(ids) >= count:
                        break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    results[i] = exc.code().name
                    return
                reconnects += 1
            finally:
                stream.cancel()
        results[i] = (ids, times, reconnects, gaps)

    workers = [threading.Thread(target=read, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    channel.close()
    out.send(results)


class Readers:
    """Subscribers in a separate process, so client work does not share the daemon's GIL."""

    def __init__(self, node, n: int, count: int, port: int | None = None, connected=None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.node = node
        self.recv, send = ctx.Pipe(duplex=False)
        address = f"127.0.0.1:{port or node.grpc.port}"
        self.proc = ctx.Process(target=read_streams, args=(address, n, count, send), daemon=True)
        self.proc.start()
        connected = connected or (lambda: node.bus.subscriber_count)
        deadline = time.monotonic() + 60
        while connected() < n:
            if time.monotonic() > deadline:
                raise RuntimeError("subscribers did not connect")
            time.sleep(0.01)

    def results(self, timeout: float = 300) -> list[tuple[list[int], list[float]]]:
        if not self.recv.poll(timeout):
            self.proc.kill()
            raise RuntimeError("subscribers stalled")
        results = self.recv.recv()
        self.proc.join()
        errors = [r for r in results if isinstance(r, str)]
        if errors:
            raise RuntimeError(f"subscribers failed: {errors}")
        while self.node.bus.subscriber_count:
            time.sleep(0.01)
        return results


def toggle(dom: libvirt.virDomain, i: int) -> None:
    if i % 2 == 0:
        dom.suspend()
    else:
        dom.resume()


def raw_baseline(conn: libvirt.virConnect, toggles: int, burst: int) -> tuple[list[float], float]:
    """Latency and rate of a plain libvirt callback on the libvirt event thread."""
    seen: list[float] = []
    cond = threading.Condition()

    def cb(_conn, _dom, _event, _detail, _opaque):
        with cond:
            seen.append(time.perf_counter())
            cond.notify_all()

    cid = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)
    dom = conn.lookupByName(VM)
    lat = []
    try:
        for i in range(toggles):
            t0 = time.perf_counter()
            toggle(dom, i)
            with cond:
                cond.wait_for(lambda i=i: len(seen) > i, 10)
            lat.append(seen[i] - t0)
        seen.clear()
        t0 = time.perf_counter()
        for i in range(burst):
            toggle(dom, i)
        with cond:
            cond.wait_for(lambda: len(seen) >= burst, 60)
        rate = len(seen) / (seen[-1] - t0)
    finally:
        conn.domainEventDeregisterAny(cid)
    return lat, rate


def daemon_latency(node, subscribers: int, toggles: int, pace: float) -> tuple[list[float], list[float]]:
    """Per event: latency to the median subscriber and to the last one (paced toggles)."""
    readers = Readers(node, subscribers, toggles)
    dom = node.hypervisor.conn().lookupByName(VM)
    sent = []
    for i in range(toggles):
        sent.append(time.perf_counter())
        toggle(dom, i)
        time.sleep(pace)
    return spread(sent, readers.results())


def spread(sent: list[float], results: list) -> tuple[list[float], list[float]]:
    """Per event: latency to the median subscriber and to the last one."""
    to_median, to_last = [], []
    for i, t0 in enumerate(sent):
        got = sorted(times[i] - t0 for _, times, *_ in results)
        to_median.append(median(got))
        to_last.append(got[-1])
    return to_median, to_last


def daemon_burst(node, subscribers: int, burst: int) -> tuple[float, int, int]:
    """Events/s until every subscriber has every event; events lost; resumes after a cut-off."""
    readers = Readers(node, subscribers, burst)
    dom = node.hypervisor.conn().lookupByName(VM)
    t0 = time.perf_counter()
    for i in range(burst):
        toggle(dom, i)
    results = readers.results()
    elapsed = max(times[-1] for _, times, *_ in results) - t0
    lost = 0
    for ids, _, _, gaps in results:
        expected = list(range(ids[0], ids[0] + burst))
        lost += gaps + (burst - len(set(ids) & set(expected)))
    return burst / elapsed, lost, sum(r[2] for r in results)


class BareServer:
    """The floor under StreamEvents: a bare grpcio server in this process whose streams send
    pre-serialized NodeEvents handed to them through plain queues (no libvirt, reactor or bus)."""

    def __init__(self, subscribers: int) -> None:
        self.queues: list[queue.SimpleQueue] = []
        lock = threading.Lock()

        def stream(_request, _context):
            q: queue.SimpleQueue = queue.SimpleQueue()
            with lock:
                self.queues.append(q)
            while (item := q.get()) is not None:
                yield item

        handler = grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=Empty.FromString, response_serializer=lambda b: b
        )
        self.server = grpc.server(ThreadPoolExecutor(subscribers + 4))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE.full_name, {"StreamEvents": handler})]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def publish(self, items: list[bytes]) -> None:
        for q in self.queues:
            for item in items:
                q.put(item)

    def stop(self) -> None:
        self.publish([None])
        self.server.stop(0)


def wire_events(count: int) -> list[bytes]:
    return [node_pb2.NodeEvent(id=str(i + 1), type=1, vm_id=VM, message="x").SerializeToString()
            for i in range(count)]  # fmt: skip


def bare_latency(node, subscribers: int, count: int, pace: float) -> tuple[list[float], list[float]]:
    """Like :func:`daemon_latency`, through :class:`BareServer`."""
    bare, wire = BareServer(subscribers), wire_events(count)
    try:
        readers = Readers(node, subscribers, count, port=bare.port, connected=lambda: len(bare.queues))
        sent = []
        for item in wire:
            sent.append(time.perf_counter())
            bare.publish([item])
            time.sleep(pace)
        results = readers.results()
    finally:
        bare.stop()
    return spread(sent, results)


def bare_burst(node, subscribers: int, burst: int) -> float:
    """Like :func:`daemon_burst`, through :class:`BareServer` (every event queued at once)."""
    bare, wire = BareServer(subscribers), wire_events(burst)
    try:
        readers = Readers(node, subscribers, burst, port=bare.port, connected=lambda: len(bare.queues))
        t0 = time.perf_counter()
        bare.publish(wire)
        results = readers.results()
    finally:
        bare.stop()
    return burst / (max(times[-1] for _, times, *_ in results) - t0)


RAW = ("raw libvirt callback (baseline)", "-", "")


def one_run(node, args) -> dict[tuple, tuple]:
    """Every measurement once: {row key: values}."""
    # libvirt-python allows one callback per event id on a connection (the daemon's), so the
    # baseline uses a second connection to a private copy of the same test host.
    conn = libvirt.open(node.hypervisor.uri)
    try:
        raw_lat, raw_rate = raw_baseline(conn, args.toggles, args.burst)
    finally:
        conn.close()
    out: dict[tuple, tuple] = {
        ("raw libvirt callback (baseline)", "-", ""): (median(raw_lat), pct(raw_lat, 0.99))
    }
    for n in (1, 100):
        for name, measure in (("bare grpcio (floor)", bare_latency), ("StreamEvents", daemon_latency)):
            med, last = measure(node, n, args.toggles, args.pace)
            for who, lat in (("median", med), ("last", last))[: 1 if n == 1 else 2]:
                out[(name, n, who)] = (median(lat), pct(lat, 0.99))
    bare = bare_burst(node, 10, args.burst)
    rate, lost, resumes = daemon_burst(node, 10, args.burst)
    out[("burst",)] = (raw_rate, bare, rate, lost, resumes)
    return out


def spread3(values: list[float], scale: float = 1.0, fmt: str = "{:.3g}") -> str:
    """min / median / max."""
    ordered = sorted(v * scale for v in values)
    return " / ".join(fmt.format(v) for v in (ordered[0], median(ordered), ordered[-1]))


def body(node, args) -> None:
    while node.watcher.reconciliations == 0:
        time.sleep(0.01)
    runs = []
    for n in range(args.runs):
        runs.append(one_run(node, args))
        print(f"run {n + 1}/{args.runs} done", file=sys.stderr, flush=True)
    rows = []
    for key in runs[0]:
        if key == ("burst",):
            continue
        p50s = [r[key][0] for r in runs]
        p99s = [r[key][1] for r in runs]
        floor = ("bare grpcio (floor)", *key[1:])
        ratio = spread3([r[key][1] / r[floor][1] for r in runs]) if key[0] == "StreamEvents" else ""
        label = key[0] if not key[2] else f"{key[0]}, {key[2]} client"
        rows.append([label, key[1], median(p50s) * 1e3, spread3(p99s, 1e3), ratio])
    table(
        f"Latency: libvirt state change -> event received ({args.runs} runs)",
        ["path", "subs", "p50 ms (median)", "p99 ms min / median / max", "p99 x floor, min / median / max"],
        rows,
    )
    bursts = [r[("burst",)] for r in runs]
    raw_rates = [b[0] for b in bursts]
    bares = [b[1] for b in bursts]
    rates = [b[2] for b in bursts]
    lost = sum(b[3] for b in bursts)
    resumes = sum(b[4] for b in bursts)
    ratios = [b[2] / b[1] for b in bursts]
    table(
        f"Throughput: {args.burst} back-to-back suspend/resume events, subscriber queue {args.queue} "
        f"({args.runs} runs; events/s min / median / max)",
        ["path", "subscribers", "events/s", "lost", "resumes", "ratio to bare grpcio"],
        [["raw libvirt callback", 1, spread3(raw_rates, fmt="{:.0f}"), 0, 0, ""],
         ["bare grpcio stream, pre-serialized (floor)", 10, spread3(bares, fmt="{:.0f}"), 0, 0, "1"],
         ["StreamEvents", 10, spread3(rates, fmt="{:.0f}"), lost, resumes, spread3(ratios, fmt="{:.2f}")]],
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--toggles", type=int, default=300)
    parser.add_argument("--burst", type=int, default=5000)
    parser.add_argument("--queue", type=int, default=10000, help="events.subscriber_queue (daemon default)")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between paced state changes")
    parser.add_argument("--runs", type=int, default=5, help="repeat everything; min/median/max")
    parser.add_argument("--switch-interval-ms", type=float, default=0.0, help="server.switch_interval_ms")
    args = parser.parse_args()
    from quantix.node import NodeService

    tmp = tempfile.mkdtemp(prefix="qtx-bench-")
    overrides = {
        "server.max_workers": 0,
        "events.subscriber_queue": args.queue,
        "server.switch_interval_ms": args.switch_interval_ms,
    }
    node = NodeService(test_config(tmp, **overrides), reactor)
    failed: list[BaseException] = []

    def run():
        node.startService()
        d = threads.deferToThread(body, node, args)
        d.addErrback(lambda f: failed.append(f.value) or f.printTraceback())
        d.addBoth(lambda _: node.stopService())
        d.addBoth(lambda _: reactor.stop())

    from twisted.python import log

    log.startLogging(sys.stderr, setStdout=False)
    reactor.callWhenRunning(run)
    reactor.suggestThreadPoolSize(16)
    reactor.run()
    shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
