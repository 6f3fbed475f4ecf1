"""Live migration of a 256 MiB guest: MigrateVM through the daemon vs. ``virsh migrate``.

Both move the same running TCG guest (the counting boot sector of the test tier) between the
same two hosts (:mod:`tests.twohosts`: two libvirtds in their own namespaces on this machine,
joined by a veth pair) with the same flags: peer to peer, live, auto-converge, persist on the
target, undefine on the source, abort on error, shared storage. Each round moves it there with
one and back with the other, alternating which goes first. Wall time is from the request to
the end (the daemon's includes its checks of the target; virsh's includes starting virsh).
Downtime is libvirt's own figure, read from the target's completed-job statistics for both.

usage: bench_migration.py [--runs 3] [--memory-mib 256] [--progress-interval 1]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from common import median, table  # noqa: E402

from quantix.proto import node_pb2  # noqa: E402
from tests import counterguest  # noqa: E402
from tests.twohosts import Host, TwoHosts  # noqa: E402

VIRSH_FLAGS = ("--live", "--auto-converge", "--p2p", "--persistent", "--undefinesource", "--abort-on-error")


def virsh(host: Host, *args: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", host.uri, *args], capture_output=True, text=True, timeout=300, check=True
    ).stdout


def downtime_ms(host: Host, name: str) -> float:
    """libvirt's downtime of the migration that just ended on ``host`` (the target)."""
    text = virsh(host, "domjobinfo", "--completed", name)
    match = re.search(r"^Total downtime:\s+(\d+)\s*ms", text, re.M)
    return float(match.group(1)) if match else float("nan")


def by_daemon(source: Host, target: Host, vm_id: str) -> float:
    started = time.perf_counter()
    request = node_pb2.MigrateVMRequest(vm_id=vm_id, target_node_uri=target.address, live=True)
    last = list(source.stub.MigrateVM(request, timeout=600))[-1]
    elapsed = time.perf_counter() - started
    if last.phase != node_pb2.MIGRATION_PHASE_COMPLETE:
        raise RuntimeError(f"MigrateVM failed: {last.error}")
    return elapsed


def by_virsh(source: Host, target: Host, name: str) -> float:
    # --unsafe: what the daemon adds for a directory declared shared (migration.shared_paths).
    argv = ["virsh", "-c", "qemu:///system", "migrate", *VIRSH_FLAGS, "--unsafe", name]
    argv += [f"qemu+tcp://{target.address}/system", "--migrateuri", f"tcp://{target.address}"]
    started = time.perf_counter()
    subprocess.run(source.enter(*argv), capture_output=True, text=True, timeout=600, check=True)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds (each: one move with each tool)")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument(
        "--progress-interval", type=float, default=1.0, help="the daemon's migration.progress_interval"
    )
    args = parser.parse_args()

    hosts = TwoHosts()
    results: dict[str, list[tuple[float, float]]] = {"daemon": [], "virsh": []}
    try:
        hosts.start(**{"migration.progress_interval": args.progress_interval})
        a, b = hosts.a, hosts.b
        vm_id = str(uuid.uuid4())
        name = f"qtx-bench-{vm_id[:8]}"
        disk = os.path.join(hosts.shared, f"{name}.qcow2")
        counterguest.make_disk(disk)
        xml = os.path.join(a.dir, f"{name}.xml")
        serial = os.path.join(hosts.local, f"{name}.serial")
        with open(xml, "w") as fh:
            fh.write(counterguest.domain_xml(name, vm_id, disk, serial, args.memory_mib))
        virsh(a, "define", xml)
        virsh(a, "start", name)
        time.sleep(2)  # past the firmware: the guest counts
        here, there = a, b
        for run in range(args.runs):
            order = ("daemon", "virsh") if run % 2 == 0 else ("virsh", "daemon")
            for tool in order:
                if tool == "daemon":
                    seconds = by_daemon(here, there, vm_id)
                else:
                    seconds = by_virsh(here, there, name)
                results[tool].append((seconds, downtime_ms(there, name)))
                here, there = there, here
    finally:
        hosts.stop()

    floor_time = median([t for t, _ in results["virsh"]])
    floor_down = median([d for _, d in results["virsh"]])
    rows = []
    for tool in ("virsh", "daemon"):
        times = [t for t, _ in results[tool]]
        downs = [d for _, d in results[tool]]
        rows.append(
            (
                tool,
                len(times),
                median(times),
                median(times) / floor_time,
                median(downs),
                median(downs) / floor_down if floor_down else float("nan"),
            )
        )
    table(
        f"live migration of a {args.memory_mib} MiB TCG guest between two hosts (median of {args.runs})",
        ("tool", "moves", "time s", "time ratio", "downtime ms", "downtime ratio"),
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
