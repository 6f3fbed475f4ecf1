"""Idle RSS and time from exec to SERVING: the daemon vs. a bare grpcio server process.

A third process, the *design floor*, is the same bare server after importing what the fixed design
requires of any daemon (twistd, the Twisted reactor, libvirt-python; see ``baseline_server.py``):
what is above it is the daemon's own, what is between the two floors is the design's.

usage: python bench/bench_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import psutil
from common import baseline_argv, free_port, median, start_daemon, stop, table, wait_serving

from quantix.proto import node_pb2


def bare_server(stack: bool = False) -> tuple[subprocess.Popen, float]:
    canned = os.path.join(tempfile.mkdtemp(prefix="qtx-bench-"), "HealthCheck")
    with open(canned, "wb") as fh:
        fh.write(b"HealthCheck\n" + node_pb2.HealthCheckResponse(healthy=True).SerializeToString())
    port = free_port()
    argv = baseline_argv(port, [canned], stack=stack)
    started = time.monotonic()
    proc = subprocess.Popen(argv)
    wait_serving(f"127.0.0.1:{port}")
    return proc, time.monotonic() - started


def daemon() -> tuple[subprocess.Popen, float]:
    proc, _, seconds = start_daemon()
    return proc, seconds


def rss_mib(proc: subprocess.Popen) -> float:
    time.sleep(1.0)  # let start-up work settle
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    starts = {
        "bare": lambda: bare_server(),
        "floor": lambda: bare_server(stack=True),
        "daemon": daemon,
    }
    t: dict[str, list[float]] = {name: [] for name in starts}
    rss: dict[str, list[float]] = {name: [] for name in starts}
    for _ in range(args.runs):
        for name, start in starts.items():  # interleaved, so drift hits all three alike
            proc, seconds = start()
            t[name].append(seconds)
            rss[name].append(rss_mib(proc))
            stop(proc)

    def row(label: str, samples: dict[str, list[float]]) -> list[object]:
        bare, floor, daemon = (median(samples[name]) for name in starts)
        return [label, bare, floor, daemon, daemon / bare, daemon / floor]

    table(
        f"Start-up and idle memory (median of {args.runs})",
        ["measure", "bare grpcio", "design floor", "daemon", "x bare", "x floor"],
        [row("exec to SERVING, s", t), row("idle RSS, MiB", rss)],
    )


if __name__ == "__main__":
    main()
