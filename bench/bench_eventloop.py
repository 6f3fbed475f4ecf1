"""Throughput of the two libvirt event loops against the real daemon (not run by the tests).

Each run is a child process (libvirt takes one event implementation per process): N worker
threads make ``lookupByName(name).info()`` pairs on one shared ``qemu:///system`` connection
while another thread suspends and resumes a tiny TCG domain, whose lifecycle events must all
reach the reactor. The parent prints the median pairs/s and CPU seconds per kind and the ratio
reactor/thread.

    python bench/bench_eventloop.py [--pairs 8000] [--threads 1 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import libvirt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URI = "qemu:///system"
TOGGLES = 20  # suspend/resume pairs per run: 40 events


def child(kind: str, name: str, pairs: int, nthreads: int) -> None:
    from twisted.internet import defer, reactor, task, threads

    from quantix.hypervisor.eventloop import install

    loop = install(kind, reactor)
    reactor.suggestThreadPoolSize(nthreads + 2)
    events = {"n": 0, "off_reactor": 0}
    done_events: defer.Deferred[None] = defer.Deferred()

    def on_event(conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        from twisted.python import threadable

        if not threadable.isInIOThread():
            events["off_reactor"] += 1
        if event in (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            events["n"] += 1
            if events["n"] >= 2 * TOGGLES and not done_events.called:
                done_events.callback(None)

    state: dict[str, Any] = {}

    def worker(count: int) -> None:
        conn = state["conn"]
        for _ in range(count):
            conn.lookupByName(name).info()

    def toggler() -> None:
        dom = state["conn"].lookupByName(name)
        for _ in range(TOGGLES):
            dom.suspend()
            time.sleep(0.005)
            dom.resume()
            time.sleep(0.005)

    @defer.inlineCallbacks
    def run(reactor: Any) -> Any:
        conn = state["conn"] = yield threads.deferToThread(libvirt.open, URI)
        cb_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, loop.dispatch(on_event), None
        )
        cpu0, t0 = time.process_time(), time.monotonic()
        share = [pairs // nthreads + (1 if i < pairs % nthreads else 0) for i in range(nthreads)]
        yield defer.gatherResults(
            [threads.deferToThread(worker, n) for n in share] + [threads.deferToThread(toggler)]
        )
        yield done_events.addTimeout(30, reactor)
        wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
        yield threads.deferToThread(conn.domainEventDeregisterAny, cb_id)
        yield threads.deferToThread(conn.close)
        print(
            json.dumps(
                {
                    "pairs_per_s": pairs / wall,
                    "cpu_s": cpu,
                    "events": events["n"],
                    "off_reactor": events["off_reactor"],
                }
            ),
            flush=True,
        )
        yield task.deferLater(reactor, 0.05, lambda: None)

    task.react(run)


def parent(pairs: int, thread_counts: list[int], runs: int) -> None:
    from tests.libvirtd import tiny_domain_xml, unique_name

    name, xml = tiny_domain_xml(unique_name("qtx-bench"))
    conn = libvirt.open(URI)
    dom = conn.defineXML(xml)
    try:
        dom.create()
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for nthreads in thread_counts:
            for _ in range(runs):
                for kind in ("thread", "reactor"):  # interleaved, so drift hits both alike
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", kind, name, str(pairs), str(nthreads)],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    line = json.loads(out.strip().splitlines()[-1])
                    if line["events"] < 2 * TOGGLES or line["off_reactor"]:
                        raise SystemExit(f"{kind}: events wrong: {line}")
                    results.setdefault((kind, nthreads), []).append(line)
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()

    print(f"{pairs} lookupByName+info pairs, {2 * TOGGLES} lifecycle events, median of {runs} runs\n")
    print(
        f"{'threads':>7} | {'kind':>7} | {'pairs/s':>8} | {'CPU s':>6} | "
        f"{'ratio pairs/s':>13} | {'ratio CPU':>9}"
    )
    print("-" * 66)
    for nthreads in thread_counts:
        med = {
            kind: {
                k: statistics.median(r[k] for r in results[(kind, nthreads)])
                for k in ("pairs_per_s", "cpu_s")
            }
            for kind in ("thread", "reactor")
        }
        for kind in ("thread", "reactor"):
            m = med[kind]
            rp = m["pairs_per_s"] / med["thread"]["pairs_per_s"]
            rc = m["cpu_s"] / med["thread"]["cpu_s"]
            print(
                f"{nthreads:>7} | {kind:>7} | {m['pairs_per_s']:>8.0f} | {m['cpu_s']:>6.2f} | "
                f"{rp:>13.2f} | {rc:>9.2f}"
            )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, name, pairs, nthreads = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        child(kind, name, pairs, nthreads)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8000)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    parent(args.pairs, args.threads, args.runs)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
