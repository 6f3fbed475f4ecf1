"""ListVMs and GetVMStatus with many domains: the daemon vs. raw libvirt-python in this process.

The host is a generated libvirt test-driver file with N ``<domain type='test'>`` entries, half of
them running. Rows, all measured in the same run:

* raw bulk: ``getAllDomainStats`` with the daemon's stats flags plus building the same
  ``ListVMsOnNodeResponse``, in this process (the floor; ratios are against it);
* per-domain loop: ``listAllDomains`` then ``info()`` and ``XMLDesc()`` per domain, same message;
* bare grpcio: a grpcio servicer in another process returning the daemon's recorded response, so
  the transport (serialize, send, parse) cost is separate from the libvirt/mapping cost;
* daemon: ``ListVMs`` over gRPC to the daemon process (``--libvirt-uri test://<file>``).

GetVMStatus looks one VM up among N: per call, the daemon vs. ``lookupByUUIDString`` plus the
one-domain stats query and the live XML in this process (and the bare servicer). Target: daemon
<= 1.2x the raw bulk query.

usage: python bench/bench_vms.py [--sizes 1000,5000] [--runs 7] [--calls 300] [--settle 60]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable

import grpc
import libvirt
from common import (
    AGENT_RETRIES_SETTLE,
    baseline_argv,
    free_port,
    median,
    start_daemon,
    stop,
    table,
    wait_serving,
)
from google.protobuf import empty_pb2

from quantix.hypervisor.vms import NOWAIT, STATS
from quantix.proto import node_grpc, node_pb2

_EMPTY = empty_pb2.Empty()
TEST_NS = "http://libvirt.org/schemas/domain/test/1.0"
_POWER = {
    libvirt.VIR_DOMAIN_RUNNING: node_pb2.POWER_STATE_RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: node_pb2.POWER_STATE_RUNNING,
    libvirt.VIR_DOMAIN_SHUTDOWN: node_pb2.POWER_STATE_RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: node_pb2.POWER_STATE_PAUSED,
    libvirt.VIR_DOMAIN_SHUTOFF: node_pb2.POWER_STATE_STOPPED,
    libvirt.VIR_DOMAIN_CRASHED: node_pb2.POWER_STATE_CRASHED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: node_pb2.POWER_STATE_SUSPENDED,
}


def node_xml(count: int, directory: str) -> tuple[str, list[str]]:
    """A test-driver host file with ``count`` domains, every other one running; (path, uuids)."""
    ET.register_namespace("test", TEST_NS)
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, text in (("mhz", "2400"), ("model", "x86_64"), ("active", "64"), ("nodes", "1")):
        ET.SubElement(cpu, tag).text = text
    for tag, text in (("sockets", "2"), ("cores", "16"), ("threads", "2")):
        ET.SubElement(cpu, tag).text = text
    ET.SubElement(node, "memory").text = str(1024**3)  # KiB
    ids = []
    for i in range(count):
        vm_id = str(uuid.UUID(int=i + 1, version=4))
        ids.append(vm_id)
        dom = ET.SubElement(node, "domain", type="test")
        ET.SubElement(dom, "name").text = f"bench-vm-{i:05d}"
        ET.SubElement(dom, "uuid").text = vm_id
        ET.SubElement(dom, "memory").text = "262144"
        ET.SubElement(dom, "vcpu").text = "1"
        ET.SubElement(ET.SubElement(dom, "os"), "type", arch="x86_64").text = "hvm"
        devices = ET.SubElement(dom, "devices")
        disk = ET.SubElement(devices, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=f"/var/lib/limiquantix/vms/bench-{i:05d}.qcow2")
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
        state = libvirt.VIR_DOMAIN_RUNNING if i % 2 == 0 else libvirt.VIR_DOMAIN_SHUTOFF
        ET.SubElement(dom, f"{{{TEST_NS}}}runstate").text = str(state)
    path = os.path.join(directory, f"node-{count}.xml")
    ET.ElementTree(node).write(path, encoding="utf-8", xml_declaration=True)
    return path, ids


# -- the in-process floors -------------------------------------------------------------------


def _status(vm_id: str, name: str, state: int, cpu_ns: int, mem_total: int, mem_used: int) -> object:
    return node_pb2.VMStatusResponse(
        vm_id=vm_id,
        name=name,
        state=_POWER.get(state, node_pb2.POWER_STATE_UNKNOWN),
        resource_usage=node_pb2.ResourceUsage(
            cpu_time_ns=cpu_ns, memory_used_bytes=mem_used, memory_total_bytes=mem_total
        ),
    )


def raw_bulk(conn: libvirt.virConnect) -> object:
    """One bulk stats query, one message per domain."""
    out = []
    for dom, st in conn.getAllDomainStats(STATS, NOWAIT):
        total = int(st.get("balloon.maximum", 0)) * 1024
        used = int(st.get("balloon.current", 0)) * 1024
        out.append(
            _status(
                dom.UUIDString(), dom.name(), st.get("state.state", 0), st.get("cpu.time", 0), total, used
            )
        )
    return node_pb2.ListVMsOnNodeResponse(vms=out)


def per_domain(conn: libvirt.virConnect) -> object:
    """The naive loop: a round of calls for every domain."""
    out = []
    for dom in conn.listAllDomains(0):
        state, max_kib, cur_kib, _, cpu_ns = dom.info()
        name = ET.fromstring(dom.XMLDesc(0)).findtext("name", "")
        out.append(_status(dom.UUIDString(), name, state, cpu_ns, max_kib * 1024, cur_kib * 1024))
    return node_pb2.ListVMsOnNodeResponse(vms=out)


def raw_status(conn: libvirt.virConnect, vm_id: str) -> object:
    """GetVMStatus by hand: lookup, the one-domain stats query, memory from info(), disks from XML."""
    dom = conn.lookupByUUIDString(vm_id)
    st = conn.domainListGetStats([dom], STATS, NOWAIT)[0][1]
    _, max_kib, cur_kib, _, cpu_ns = dom.info()
    msg = _status(vm_id, dom.name(), st.get("state.state", 0), cpu_ns, max_kib * 1024, cur_kib * 1024)
    for disk in ET.fromstring(dom.XMLDesc(0)).iterfind("devices/disk"):
        source = disk.find("source")
        msg.disks.add(
            id=disk.find("target").get("dev", ""), path=source.get("file", "") if source is not None else ""
        )
    return msg


# -- measurement ------------------------------------------------------------------------------


def task_cpu(pid: int) -> float:
    """CPU seconds of every thread of ``pid`` so far, to the nanosecond (``/proc/.../schedstat``)."""
    total = 0
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended
    return total / 1e9


Timed = tuple[Callable[[], object], Callable[[], float]]


def interleaved(fns: dict[str, Timed], rounds: int, per_sample: int = 1) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each ``(function, cpu clock)``, sampled in turn round
    after round so that drift on a shared machine hits every path alike. The CPU clock is the
    process doing the work; it moves far less than wall time when the machine is busy."""
    for fn, _ in fns.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, clock) in fns.items():
            c, t = clock(), time.perf_counter()
            for _ in range(per_sample):
                fn()
            wall[name].append((time.perf_counter() - t) / per_sample)
            cpu[name].append((clock() - c) / per_sample)
    return {name: (median(wall[name]), median(cpu[name])) for name in fns}


def bare_server(tmp: str, replies: dict[str, bytes]) -> tuple[subprocess.Popen, str]:
    canned = []
    replies = {"HealthCheck": node_pb2.HealthCheckResponse(healthy=True).SerializeToString(), **replies}
    for method, payload in replies.items():
        path = os.path.join(tmp, f"{method}.bin")
        with open(path, "wb") as fh:
            fh.write(method.encode() + b"\n" + payload)
        canned.append(path)
    port = free_port()
    proc = subprocess.Popen(
        baseline_argv(port, canned),
        stdout=subprocess.PIPE,
    )
    proc.stdout.readline()
    address = f"127.0.0.1:{port}"
    wait_serving(address)
    return proc, address


def stub_for(address: str) -> tuple[grpc.Channel, object]:
    limit = 64 * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    channel = grpc.insecure_channel(address, options=options)
    return channel, node_grpc.NodeDaemonServiceStub(channel)


def bench_size(
    count: int, tmp: str, runs: int, calls: int, settle: float
) -> tuple[list[list[object]], list[list[object]]]:
    path, ids = node_xml(count, tmp)
    uri = f"test://{path}"
    probe = ids[len(ids) // 2]
    request = node_pb2.VMIdRequest(vm_id=probe)
    daemon, address, boot = start_daemon(uri=uri)
    time.sleep(settle)  # see AGENT_RETRIES_SETTLE
    bare = None
    channels: list[grpc.Channel] = []
    conn = libvirt.open(uri)
    try:
        channel, stub = stub_for(address)
        channels.append(channel)
        listed = stub.ListVMs(_EMPTY)
        assert len(listed.vms) == count, (len(listed.vms), count)
        status = stub.GetVMStatus(request)
        replies = {"ListVMs": listed.SerializeToString(), "GetVMStatus": status.SerializeToString()}
        bare, bare_address = bare_server(tmp, replies)
        channel, bare_stub = stub_for(bare_address)
        channels.append(channel)
        here = time.process_time
        daemon_cpu, bare_cpu = (lambda: task_cpu(daemon.pid)), (lambda: task_cpu(bare.pid))
        lists = interleaved(
            {
                "bulk": (lambda: raw_bulk(conn), here),
                "loop": (lambda: per_domain(conn), here),
                "bare": (lambda: bare_stub.ListVMs(_EMPTY), bare_cpu),
                "daemon": (lambda: stub.ListVMs(_EMPTY), daemon_cpu),
            },
            runs,
        )
        statuses = interleaved(
            {
                "raw": (lambda: raw_status(conn, probe), here),
                "bare": (lambda: bare_stub.GetVMStatus(request), bare_cpu),
                "daemon": (lambda: stub.GetVMStatus(request), daemon_cpu),
            },
            runs,
            calls,
        )
    finally:
        conn.close()
        for channel in channels:
            channel.close()
        stop(daemon)
        if bare is not None:
            stop(bare)
    size = len(listed.SerializeToString())
    lists["floor"] = tuple(a + b for a, b in zip(lists["bulk"], lists["bare"], strict=True))
    statuses["floor"] = tuple(a + b for a, b in zip(statuses["raw"], statuses["bare"], strict=True))
    list_names = [
        ("bulk", "raw bulk (getAllDomainStats + protobuf)"),
        ("loop", "per-domain loop (info + XMLDesc)"),
        ("bare", f"bare grpcio, same response ({size // 1024} KiB)"),
        ("floor", "floor: raw bulk + bare grpcio"),
        ("daemon", "daemon over gRPC"),
    ]
    status_names = [
        ("raw", "raw lookupByUUIDString + stats + XML"),
        ("bare", "bare grpcio, same response"),
        ("floor", "floor: raw + bare grpcio"),
        ("daemon", "daemon over gRPC"),
    ]
    list_rows = [rows(count, what, lists[key], lists["bulk"], lists["floor"]) for key, what in list_names]
    status_rows = [
        rows(count, what, statuses[key], statuses["raw"], statuses["floor"]) for key, what in status_names
    ]
    print(f"  {count} domains: daemon SERVING after {boot:.1f}s", flush=True)
    return list_rows, status_rows


def rows(
    count: int, what: str, t: tuple[float, float], base: tuple[float, float], floor: tuple[float, float]
) -> list[object]:
    return [count, what, t[0] * 1e3, t[0] / base[0], t[0] / floor[0], t[1] * 1e3, t[1] / floor[1]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,5000", help="domain counts, comma separated")
    parser.add_argument(
        "--runs", type=int, default=7, help="samples per row (median), taken in turn across rows"
    )
    parser.add_argument("--calls", type=int, default=300, help="GetVMStatus calls per sample")
    parser.add_argument(
        "--settle", type=float, default=AGENT_RETRIES_SETTLE, help="seconds from start to the first call"
    )
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="qtx-bench-vms-")
    list_rows: list[list[object]] = []
    status_rows: list[list[object]] = []
    for count in (int(x) for x in args.sizes.split(",")):
        lr, sr = bench_size(count, tmp, args.runs, args.calls, args.settle)
        list_rows += lr
        status_rows += sr
    table(
        f"ListVMs, median of {args.runs} (target: daemon <= 1.2x raw bulk)",
        ["domains", "path", "ms", "x raw bulk", "x floor", "cpu ms", "cpu x floor"],
        list_rows,
    )
    table(
        f"GetVMStatus of one VM among N, per call (median of {args.runs} samples of {args.calls} calls)",
        ["domains", "path", "ms/call", "x raw", "x floor", "cpu ms/call", "cpu x floor"],
        status_rows,
    )


if __name__ == "__main__":
    main()
