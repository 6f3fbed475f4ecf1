"""Unary throughput and latency: the daemon vs. a bare grpcio servicer returning the same message.

Both servers run as separate processes on this machine; the client threads share one channel
per server. Absolute numbers drift on shared machines; the ratio column is what to read.
Target: daemon throughput >= 0.7x the bare servicer.

usage: python bench/bench_unary.py [--seconds 3] [--concurrency 1,8,64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

import grpc
from common import ROOT, free_port, median, pct, start_daemon, stop, table

from quantix.proto import node_grpc, node_pb2

VM_ID = "11111111-2222-3333-4444-555555555555"


def requests() -> dict[str, object]:
    return {
        "HealthCheck": node_pb2.HealthCheckRequest(),
        "GetVMStatus": node_pb2.VMIdRequest(vm_id=VM_ID),
    }


def load(
    address: str, method: str, request: object, threads: int, seconds: float
) -> tuple[float, list[float]]:
    """Calls/s and per-call latencies with ``threads`` callers for ``seconds``."""
    channel = grpc.insecure_channel(address)
    call = getattr(node_grpc.NodeDaemonServiceStub(channel), method)
    for _ in range(50):  # warm-up
        call(request)
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
    channel.close()
    return len(latencies) / elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,8,64")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    fixture = f"test://{os.path.join(ROOT, 'tests', 'fixtures', 'node.xml')}"
    daemon, address, _ = start_daemon(uri=fixture)
    baseline = None
    try:
        # Record the daemon's real answers; the baseline serves exactly those bytes.
        channel = grpc.insecure_channel(address)
        stub = node_grpc.NodeDaemonServiceStub(channel)
        canned, methods = [], []
        tmp = tempfile.mkdtemp(prefix="qtx-bench-")
        for method, request in requests().items():
            try:
                reply = getattr(stub, method)(request)
            except grpc.RpcError as exc:
                print(f"skipping {method}: {exc.code().name}")
                continue
            path = os.path.join(tmp, method)
            with open(path, "wb") as fh:
                fh.write(method.encode() + b"\n" + reply.SerializeToString())
            canned.append(path)
            methods.append(method)
        channel.close()
        port = free_port()
        baseline = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bench", "baseline_server.py"), str(port), *canned],
            stdout=subprocess.PIPE,
        )
        baseline.stdout.readline()
        rows = []
        for method in methods:
            for n in levels:
                base_rps, base_lat = load(f"127.0.0.1:{port}", method, requests()[method], n, args.seconds)
                rps, lat = load(address, method, requests()[method], n, args.seconds)
                ms = [median(base_lat), median(lat), pct(base_lat, 0.99), pct(lat, 0.99)]
                rows.append([method, n, round(base_rps), round(rps), rps / base_rps, *(x * 1e3 for x in ms)])
        table(
            "Unary RPCs: daemon vs bare grpcio servicer (target ratio >= 0.7)",
            ["rpc", "clients", "bare rps", "daemon rps", "ratio", "bare p50 ms", "daemon p50 ms",
             "bare p99 ms", "daemon p99 ms"],
            rows,
        )  # fmt: skip
    finally:
        stop(daemon)
        if baseline is not None:
            stop(baseline)


if __name__ == "__main__":
    main()
