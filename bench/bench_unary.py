"""Unary throughput and latency: the daemon vs. a bare grpcio servicer returning the same message.

Both servers run as separate processes on this machine; the client threads share one channel
per server. Absolute numbers drift on shared machines; the ratio column is what to read.
Target: daemon throughput >= 0.7x the bare servicer.

When the real libvirtd answers on qemu:///system, GetVMStatus is also measured there, for a
tiny running TCG domain defined for the run (the daemon then pays real libvirt round trips).

Each server is measured in ``--rounds`` alternating windows (bare, daemon, daemon, bare, ...) that
share ``--seconds`` between them; the rates are the medians of the windows.

usage: python bench/bench_unary.py [--seconds 3] [--rounds 6] [--concurrency 1,8,64] [--no-libvirtd]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import threading
import time

import grpc
from common import ROOT, baseline_argv, free_port, median, pct, start_daemon, stop, table

from quantix.proto import node_grpc, node_pb2

VM_ID = "11111111-2222-3333-4444-555555555555"


LIBVIRTD = "qemu:///system"


def requests(vm_id: str = VM_ID) -> dict[str, object]:
    return {
        "HealthCheck": node_pb2.HealthCheckRequest(),
        "GetVMStatus": node_pb2.VMIdRequest(vm_id=vm_id),
    }


def load(call: object, request: object, threads: int, seconds: float) -> tuple[float, list[float]]:
    """Calls/s and per-call latencies of ``call`` with ``threads`` callers for ``seconds``."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        mine = []
        while time.monotonic() < deadline:
            t = time.perf_counter()
            call(request)
            mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    started = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - started
    return len(latencies) / elapsed, latencies


def compare(
    addresses: tuple[str, str], method: str, request: object, threads: int, seconds: float, rounds: int
) -> list[object]:
    """(bare, daemon) in alternating windows, ``rounds`` each, ``seconds`` in all per server:
    load from other processes, and drift, hit both alike. One row: rates are the medians of
    the windows, the ratio theirs; latencies are pooled."""
    channels = [grpc.insecure_channel(a) for a in addresses]
    calls = [getattr(node_grpc.NodeDaemonServiceStub(c), method) for c in channels]
    for call in calls:
        for _ in range(50):  # warm-up
            call(request)
    rates: list[list[float]] = [[], []]
    lats: list[list[float]] = [[], []]
    for r in range(rounds):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            rps, lat = load(calls[side], request, threads, seconds / rounds)
            rates[side].append(rps)
            lats[side].extend(lat)
    for c in channels:
        c.close()
    base, ours = median(rates[0]), median(rates[1])
    ms = [median(lats[0]), median(lats[1]), pct(lats[0], 0.99), pct(lats[1], 0.99)]
    return [round(base), round(ours), ours / base, *(x * 1e3 for x in ms)]


def measure(
    uri: str, vm_id: str, methods: list[str], levels: list[int], seconds: float, rounds: int, tier: str
) -> list:
    """Rows for ``methods`` against a daemon on ``uri`` and a bare servicer with its answers."""
    daemon, address, _ = start_daemon(uri=uri)
    baseline = None
    rows = []
    try:
        # Record the daemon's real answers; the baseline serves exactly those bytes.
        channel = grpc.insecure_channel(address)
        stub = node_grpc.NodeDaemonServiceStub(channel)
        canned, served = [], []
        tmp = tempfile.mkdtemp(prefix="qtx-bench-")
        for method in methods:
            try:
                reply = getattr(stub, method)(requests(vm_id)[method])
            except grpc.RpcError as exc:
                print(f"skipping {method} on {tier}: {exc.code().name}")
                continue
            path = os.path.join(tmp, method)
            with open(path, "wb") as fh:
                fh.write(method.encode() + b"\n" + reply.SerializeToString())
            canned.append(path)
            served.append(method)
        channel.close()
        port = free_port()
        baseline = subprocess.Popen(
            baseline_argv(port, canned),
            stdout=subprocess.PIPE,
        )
        baseline.stdout.readline()
        for method in served:
            request = requests(vm_id)[method]
            for n in levels:
                pair = (f"127.0.0.1:{port}", address)
                rows.append([method, tier, n, *compare(pair, method, request, n, seconds, rounds)])
    finally:
        stop(daemon)
        if baseline is not None:
            stop(baseline)
    return rows


def libvirtd_domain() -> tuple[object, str] | None:
    """A tiny running TCG domain on ``qemu:///system`` (connection, uuid), or None without libvirtd."""
    import libvirt

    libvirt.registerErrorHandler(lambda *a: None, None)
    try:
        conn = libvirt.open(LIBVIRTD)
    except libvirt.libvirtError:
        return None
    from tests.libvirtd import tiny_domain_xml, unique_name

    _, xml = tiny_domain_xml(unique_name("qtx-bench"))
    dom = conn.defineXML(xml)
    dom.create()
    return (conn, dom), dom.UUIDString()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,8,64")
    parser.add_argument("--rounds", type=int, default=6, help="alternating windows per server")
    parser.add_argument("--no-libvirtd", action="store_true", help="skip the qemu:///system GetVMStatus rows")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    fixture = f"test://{os.path.join(ROOT, 'tests', 'fixtures', 'node.xml')}"
    rows = measure(
        fixture, VM_ID, ["HealthCheck", "GetVMStatus"], levels, args.seconds, args.rounds, "test driver"
    )
    found = None if args.no_libvirtd else libvirtd_domain()
    if found is not None:
        (conn, dom), uuid = found
        try:
            rows += measure(
                LIBVIRTD, uuid, ["GetVMStatus"], levels, args.seconds, args.rounds, "libvirtd, TCG VM"
            )
        finally:
            dom.destroy()
            dom.undefine()
            conn.close()
    table(
        "Unary RPCs: daemon vs bare grpcio servicer (target ratio >= 0.7)",
        ["rpc", "host", "clients", "bare rps", "daemon rps", "ratio", "bare p50 ms", "daemon p50 ms",
         "bare p99 ms", "daemon p99 ms"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
