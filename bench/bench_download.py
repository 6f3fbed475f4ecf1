"""Download throughput of the image engine vs curl from the same local server, in the same run.

A sparse file of ``--size`` MiB in a temporary directory is served by twisted.web's static.File
in its own process. ``curl`` fetches it to a file (the floor); then the daemon's download engine
(in a child process: treq, the writer thread, the streaming sha256, qemu-img info, fsync and
rename) fetches it too. Reported: wall-clock throughput and the ratio (target >= 0.8x curl),
CPU seconds per GiB of the engine process, and its peak RSS at two sizes (it must stay flat: no
whole-file buffering). Everything is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SERVER = """
import sys
from twisted.internet import reactor
from twisted.web import server, static
site = server.Site(static.File(sys.argv[1], defaultType="application/octet-stream"))
port = reactor.listenTCP(0, site, interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""

ENGINE = """
import os, resource, sys, time
sys.path.insert(0, sys.argv[3])
from twisted.internet import defer, reactor, task
from quantix.config import DownloadsConfig
from quantix.images.engine import DownloadEngine, DownloadRequest

url, out_dir = sys.argv[1], sys.argv[2]

@defer.inlineCallbacks
def main(reactor):
    settings = DownloadsConfig(verify_sums=False)
    engine = DownloadEngine(reactor, settings, out_dir, out_dir, roots=lambda: [out_dir])
    engine.startService()
    yield engine.ready()
    cpu0, t0 = time.process_time(), time.monotonic()
    job = yield engine.submit(DownloadRequest(url=url, image_id="bench", filename="image.raw"))
    while not engine.jobs[job.job_id].ended:
        yield task.deferLater(reactor, 0.02, lambda: None)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    final = engine.jobs[job.job_id]
    yield engine.stopService()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(final.status, final.bytes_downloaded, wall, cpu, rss, repr(final.error), flush=True)

task.react(main)
"""


def serve(directory: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, directory], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def curl(url: str, out: str) -> float:
    start = time.monotonic()
    subprocess.run(["curl", "-sS", "-o", out, url], check=True)
    with open(out, "rb+") as fh:
        os.fsync(fh.fileno())
    return time.monotonic() - start


def engine(url: str, out_dir: str) -> tuple[float, float, int]:
    done = subprocess.run(
        [sys.executable, "-c", ENGINE, url, out_dir, ROOT], capture_output=True, text=True, check=True
    )
    status, _size, wall, cpu, rss, error = done.stdout.split(maxsplit=5)
    if status != "completed":
        raise SystemExit(f"engine download ended {status}: {error}")
    return float(wall), float(cpu), int(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB [1024]")
    parser.add_argument("--small", type=int, default=128, help="MiB for the RSS comparison [128]")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="qtx-bench-dl-")
    proc = None
    try:
        src = os.path.join(tmp, "src")
        os.makedirs(src)
        for mib in (args.size, args.small):
            with open(os.path.join(src, f"{mib}.raw"), "wb") as fh:
                fh.truncate(mib << 20)  # sparse: no disk space, read as zeros
        proc, port = serve(src)
        base = f"http://127.0.0.1:{port}"
        results = {}
        for mib in (args.size, args.small):
            out_dir = os.path.join(tmp, f"out{mib}")
            os.makedirs(out_dir)
            curl_s = curl(f"{base}/{mib}.raw", os.path.join(tmp, f"curl{mib}.raw"))
            os.unlink(os.path.join(tmp, f"curl{mib}.raw"))
            wall, cpu, rss = engine(f"{base}/{mib}.raw", out_dir)
            shutil.rmtree(out_dir)
            gib = mib / 1024
            results[mib] = {
                "curl_mib_s": mib / curl_s,
                "engine_mib_s": mib / wall,
                "ratio": curl_s / wall,
                "engine_cpu_s_per_gib": cpu / gib,
                "engine_peak_rss_mib": rss / (1 << 20),
            }
        if args.json:
            print(json.dumps(results))
            return
        for mib, r in results.items():
            print(
                f"{mib:5d} MiB: curl {r['curl_mib_s']:.0f} MiB/s, engine {r['engine_mib_s']:.0f} MiB/s"
                f" ({r['ratio']:.2f}x curl), engine CPU {r['engine_cpu_s_per_gib']:.2f} s/GiB,"
                f" peak RSS {r['engine_peak_rss_mib']:.0f} MiB"
            )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
