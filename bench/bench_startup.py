"""Idle RSS and time from exec to SERVING: the daemon vs. a bare grpcio server process.

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


def bare_server() -> tuple[subprocess.Popen, float]:
    canned = os.path.join(tempfile.mkdtemp(prefix="qtx-bench-"), "HealthCheck")
    with open(canned, "wb") as fh:
        fh.write(b"HealthCheck\n" + node_pb2.HealthCheckResponse(healthy=True).SerializeToString())
    port = free_port()
    argv = baseline_argv(port, [canned])
    started = time.monotonic()
    proc = subprocess.Popen(argv)
    wait_serving(f"127.0.0.1:{port}")
    return proc, time.monotonic() - started


def rss_mib(proc: subprocess.Popen) -> float:
    time.sleep(1.0)  # let start-up work settle
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    base_t, base_rss, t, rss = [], [], [], []
    for _ in range(args.runs):
        proc, seconds = bare_server()
        base_t.append(seconds)
        base_rss.append(rss_mib(proc))
        stop(proc)
        proc, _, seconds = start_daemon()
        t.append(seconds)
        rss.append(rss_mib(proc))
        stop(proc)
    table(
        f"Start-up and idle memory (median of {args.runs})",
        ["measure", "bare grpcio", "daemon", "ratio"],
        [
            ["exec to SERVING, s", median(base_t), median(t), median(t) / median(base_t)],
            ["idle RSS, MiB", median(base_rss), median(rss), median(rss) / median(base_rss)],
        ],
    )


if __name__ == "__main__":
    main()
