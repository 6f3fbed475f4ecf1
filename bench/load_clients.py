"""Client load in its own process: N threads calling unary RPCs for S seconds.

usage: load_clients.py ADDRESS THREADS SECONDS   (prints "calls=<n> errors=<n>")
"""

from __future__ import annotations

import sys
import threading
import time

import common  # noqa: F401  (puts the checkout on sys.path)
import grpc
from google.protobuf import empty_pb2

from quantix.proto import node_grpc, node_pb2


def main() -> None:
    address, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    channel = grpc.insecure_channel(address)
    stub = node_grpc.NodeDaemonServiceStub(channel)
    calls = [(stub.HealthCheck, node_pb2.HealthCheckRequest()), (stub.ListVMs, empty_pb2.Empty())]
    counts = {"calls": 0}
    codes: dict[str, int] = {}
    deadline = time.monotonic() + seconds

    def worker(n: int) -> None:
        call, req = calls[n % len(calls)]
        while time.monotonic() < deadline:
            try:
                call(req, timeout=30)
                counts["calls"] += 1
            except grpc.RpcError as exc:
                key = f"{exc.code().name}: {exc.details()}"[:80]
                codes[key] = codes.get(key, 0) + 1

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print(f"calls={counts['calls']} errors={codes or 0}", flush=True)


if __name__ == "__main__":
    main()
