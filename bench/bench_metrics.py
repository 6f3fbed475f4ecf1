"""StreamMetrics cost with 1 vs 50 subscribers on a host of 1,000 test-driver domains.

Each condition runs for ``--seconds`` with every subscriber asking for a 1 s interval; the daemon's
CPU (all threads, ``/proc/<pid>/task/*/schedstat``) per second is compared with the idle daemon
in the same run, and ``ListVMs`` is timed meanwhile (what per-subscriber sampling starved).
Shared sampling makes 50 subscribers cost about what one does (the sample is taken and
serialized once; each subscriber adds only its transport): the target is <= 2x.

The conditions are alternated over ``--rounds`` (idle, 1, 50, idle, 1, 50, ...) and each round's
ratio is taken against that round's idle figure: the difference being measured (a few ms of CPU
per second) is smaller than the drift of the idle daemon's own CPU between windows.

usage: python bench/bench_metrics.py [--domains 1000] [--subscribers 1,50] [--seconds 10] [--rounds 3]
       [--settle 60]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time

import grpc
from bench_vms import node_xml, task_cpu
from common import AGENT_RETRIES_SETTLE, median, start_daemon, stop, table
from google.protobuf import empty_pb2

from quantix.proto import node_grpc, node_pb2


def measure(address: str, pid: int, subscribers: int, seconds: float) -> tuple[float, float, int]:
    """(daemon CPU ms per second, ListVMs median ms, samples received) with ``subscribers`` open."""
    channel = grpc.insecure_channel(address)
    stub = node_grpc.NodeDaemonServiceStub(channel)
    request = node_pb2.StreamMetricsRequest(interval_seconds=1)
    streams = [stub.StreamMetrics(request) for _ in range(subscribers)]
    received = [0]
    lock = threading.Lock()

    def read(stream) -> None:
        try:
            for _ in stream:
                with lock:
                    received[0] += 1
        except grpc.RpcError:
            pass

    readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in streams]
    for r in readers:
        r.start()
    time.sleep(1.5)  # every stream open and past its first sample
    received[0] = 0
    cpu0, wall0 = task_cpu(pid), time.monotonic()
    lists = []
    while time.monotonic() - wall0 < seconds:
        t = time.perf_counter()
        stub.ListVMs(empty_pb2.Empty(), timeout=30)
        lists.append(time.perf_counter() - t)
        time.sleep(1.0)
    cpu = (task_cpu(pid) - cpu0) / (time.monotonic() - wall0)
    got = received[0]
    for s in streams:
        s.cancel()
    channel.close()
    return cpu * 1e3, median(lists) * 1e3, got


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--subscribers", default="1,50")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="idle and each count, alternated")
    parser.add_argument(
        "--settle", type=float, default=AGENT_RETRIES_SETTLE, help="seconds before the first window"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.subscribers.split(",")]
    path, _ = node_xml(args.domains, tempfile.mkdtemp(prefix="qtx-metrics-"))
    proc, address, _ = start_daemon(uri=f"test://{path}")
    # condition (0 = idle) -> per-round (CPU ms/s, ListVMs ms, samples)
    runs: dict[int, list[tuple[float, float, int]]] = {n: [] for n in [0, *counts]}
    try:
        time.sleep(args.settle)  # see AGENT_RETRIES_SETTLE
        for _ in range(args.rounds):
            for n in runs:  # alternated, so drift and neighbours hit every condition alike
                runs[n].append(measure(address, proc.pid, n, args.seconds))
    finally:
        stop(proc)

    def over_idle(n: int, i: int) -> float:
        """Round ``i``'s CPU with ``n`` subscribers above that round's idle CPU."""
        return runs[n][i][0] - runs[0][i][0]

    first = counts[0]
    rows = [["idle daemon (floor)", median([r[0] for r in runs[0]]), "", median([r[1] for r in runs[0]]), 0]]
    for n in counts:
        ratios = sorted(
            over_idle(n, i) / over_idle(first, i) for i in range(args.rounds) if over_idle(first, i) > 0
        )
        spread = " / ".join(f"{x:.2f}" for x in (ratios[0], median(ratios), ratios[-1])) if ratios else ""
        rows.append([
            f"{n} subscriber(s), 1 s interval",
            median([r[0] for r in runs[n]]),
            spread,
            median([r[1] for r in runs[n]]),
            sum(r[2] for r in runs[n]),
        ])  # fmt: skip
    table(
        f"StreamMetrics, {args.domains} domains, {args.rounds} alternated rounds of {args.seconds:.0f} s "
        f"(medians; target: {counts[-1]} subscribers <= 2x the CPU of {first} over idle)",
        [
            "condition",
            "daemon CPU ms/s",
            f"x {first} over idle, min / median / max",
            "ListVMs p50 ms",
            "samples",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
