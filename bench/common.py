"""Shared benchmark plumbing: start the real daemon (or a baseline) as a process, time calls."""

from __future__ import annotations

import compileall
import functools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from quantix.proto import generated_dir, node_grpc, node_pb2  # noqa: E402


@functools.cache
def compile_bytecode() -> None:
    """Byte-compile the checkout and the generated protobuf modules, as installing the package
    does: with PYTHONDONTWRITEBYTECODE set (as on some CI hosts) every process started from the
    checkout would otherwise compile ~110 modules from source, about 0.3 s of each start. Done
    once, by the driver, before it starts a server (never in the timed servers themselves)."""
    for path in (os.path.join(ROOT, "quantix"), generated_dir()):
        compileall.compile_dir(path, quiet=1)


def baseline_argv(port: int, canned: Sequence[str], stack: bool = False) -> list[str]:
    """The command line of a bare grpcio server (``baseline_server.py``) serving ``canned``;
    ``stack``: after importing what the design requires (twistd, the reactor, libvirt)."""
    compile_bytecode()
    flags = ["--stack"] if stack else []
    return [sys.executable, os.path.join(ROOT, "bench", "baseline_server.py"), *flags, str(port), *canned]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Seconds to leave a daemon on many test-driver domains before measuring it. Each such domain
#: "runs" without an agent socket, so its agent channel retries the connect with a backoff that
#: reaches its 30 s cap about 56 s after start; until then thousands of attempts a second share
#: the daemon's CPU with what is measured (ListVMs of 5,000 domains read 2.2x the floor in one
#: run and 1.05x in the next; the idle daemon's CPU fell from tens of ms/s to a few).
AGENT_RETRIES_SETTLE = 60.0

RETRY_FAST = [
    ("grpc.initial_reconnect_backoff_ms", 10),
    ("grpc.min_reconnect_backoff_ms", 10),
    ("grpc.max_reconnect_backoff_ms", 10),
]


def wait_serving(address: str, timeout: float = 30.0) -> float:
    """Seconds until HealthCheck answers healthy on ``address``."""
    start = time.monotonic()
    # grpc waits about a second before redialling a refused address; that wait, not the server,
    # would be measured. Redial every 10 ms instead.
    channel = grpc.insecure_channel(address, options=RETRY_FAST)
    stub = node_grpc.NodeDaemonServiceStub(channel)
    try:
        while time.monotonic() - start < timeout:
            try:
                if stub.HealthCheck(node_pb2.HealthCheckRequest(), timeout=1).healthy:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            time.sleep(0.01)
    finally:
        channel.close()
    raise RuntimeError(f"{address} did not become healthy within {timeout}s")


def start_daemon(*flags: str, uri: str = "test:///default") -> tuple[subprocess.Popen, str, float]:
    """Run ``twistd -n quantix-node`` on a free port; returns (process, address, seconds to SERVING)."""
    compile_bytecode()
    port = free_port()
    state = tempfile.mkdtemp(prefix="qtx-bench-")
    address = f"127.0.0.1:{port}"
    cmd = [
        sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
        "-n", "--pidfile=", "--logfile", os.path.join(state, "twistd.log"), "quantix-node",
        "--listen", address, "--libvirt-uri", uri, "--state-dir", state,
        "--agent-socket-dir", os.path.join(state, "agents"), "--config", os.devnull, *flags,
    ]  # fmt: skip
    # Metrics and the 8080/8443 listeners off: the floor serves gRPC alone, and those fixed
    # ports may be taken on a shared machine.
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        QUANTIX_SERVER_METRICS_LISTEN="",
        QUANTIX_HTTP_LISTEN="off",
        QUANTIX_HTTPS_LISTEN="off",
    )
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=state)
    wait_serving(address)
    return proc, address, time.monotonic() - started


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def pct(samples: Sequence[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else float("nan")


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print an aligned plain-text table."""
    cells = [list(map(str, header))] + [
        [f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
