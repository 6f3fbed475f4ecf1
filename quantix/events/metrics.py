"""``StreamMetrics`` samples: host counters from psutil, per-VM counters from one bulk libvirt call.

A :class:`Sampler` belongs to one stream and keeps the previous counters, so rates (CPU %, IOPS)
are computed over that stream's own interval without any process-wide state shared between
streams. Sampling blocks (libvirt round trip), so it runs in the stream's gRPC thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import libvirt
import psutil
from google.protobuf.timestamp_pb2 import Timestamp

from quantix.proto import node_pb2

VM_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)


def _busy_total(t: Any) -> tuple[float, float]:
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = sum(t)
    # guest time is already counted in user time on Linux
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return total - idle, total


def vm_counters(stats: Mapping[str, int | float | str]) -> dict[str, int]:
    """Pure: sum a ``getAllDomainStats`` record into the counters ``VMMetrics`` carries."""
    out = {"cpu_ns": int(stats.get("cpu.time", 0)), "vcpus": int(stats.get("vcpu.current", 0) or 0)}
    if "balloon.available" in stats and "balloon.unused" in stats:
        mem_kib = int(stats["balloon.available"]) - int(stats["balloon.unused"])
    else:
        mem_kib = int(stats.get("balloon.rss", stats.get("balloon.current", 0)))
    out["memory"] = max(0, int(mem_kib)) * 1024
    blocks = int(stats.get("block.count", 0))
    out["rd"] = sum(int(stats.get(f"block.{i}.rd.bytes", 0)) for i in range(blocks))
    out["wr"] = sum(int(stats.get(f"block.{i}.wr.bytes", 0)) for i in range(blocks))
    nets = int(stats.get("net.count", 0))
    out["rx"] = sum(int(stats.get(f"net.{i}.rx.bytes", 0)) for i in range(nets))
    out["tx"] = sum(int(stats.get(f"net.{i}.tx.bytes", 0)) for i in range(nets))
    return out


def _pct(delta: float, span: float) -> float:
    return max(0.0, min(100.0, 100.0 * delta / span)) if span > 0 else 0.0


class Sampler:
    """One stream's sampler; the first sample has zero rates (no previous counters yet)."""

    def __init__(self, conn: Callable[[], libvirt.virConnect], flags: int = 0) -> None:
        self._conn = conn
        self._flags = flags
        self._prev_at: float | None = None
        self._prev_cpu = _busy_total(psutil.cpu_times())
        self._prev_disks: dict[str, Any] = {}
        self._prev_vms: dict[str, int] = {}

    def sample(self) -> node_pb2.NodeMetrics:
        now = time.monotonic()
        dt = now - self._prev_at if self._prev_at is not None else 0.0
        self._prev_at = now
        ts = Timestamp()
        ts.GetCurrentTime()

        busy, total = _busy_total(psutil.cpu_times())
        cpu = _pct(busy - self._prev_cpu[0], total - self._prev_cpu[1])
        self._prev_cpu = (busy, total)
        mem = psutil.virtual_memory()

        disks = []
        counters = psutil.disk_io_counters(perdisk=True) or {}
        for name, c in sorted(counters.items()):
            p = self._prev_disks.get(name)
            rd_iops = wr_iops = util = 0.0
            if p is not None and dt > 0:
                rd_iops = (c.read_count - p.read_count) / dt
                wr_iops = (c.write_count - p.write_count) / dt
                util = _pct((getattr(c, "busy_time", 0) - getattr(p, "busy_time", 0)) / 1000.0, dt)
            disks.append(
                node_pb2.DiskMetrics(
                    device=name,
                    read_bytes=c.read_bytes,
                    write_bytes=c.write_bytes,
                    read_iops=max(0, int(rd_iops)),
                    write_iops=max(0, int(wr_iops)),
                    utilization_percent=util,
                )
            )
        self._prev_disks = counters

        nets = [
            node_pb2.NetworkMetrics(
                interface=name,
                rx_bytes=c.bytes_recv,
                tx_bytes=c.bytes_sent,
                rx_packets=c.packets_recv,
                tx_packets=c.packets_sent,
                rx_errors=c.errin,
                tx_errors=c.errout,
            )
            for name, c in sorted((psutil.net_io_counters(pernic=True) or {}).items())
        ]

        return node_pb2.NodeMetrics(
            timestamp=ts,
            cpu_usage_percent=cpu,
            memory_used_bytes=mem.total - mem.available,
            memory_total_bytes=mem.total,
            disks=disks,
            networks=nets,
            vms=self._vms(dt),
        )

    def _vms(self, dt: float) -> list[node_pb2.VMMetrics]:
        try:
            records = self._conn().getAllDomainStats(VM_STATS, self._flags)
        except Exception:
            return []  # hypervisor down: host metrics are still worth sending
        out = []
        prev_cpu = self._prev_vms
        self._prev_vms = {}
        for dom, stats in records:
            uuid = dom.UUIDString()
            c = vm_counters(stats)
            self._prev_vms[uuid] = c["cpu_ns"]
            cpu = 0.0
            if uuid in prev_cpu and dt > 0:
                cpu = _pct((c["cpu_ns"] - prev_cpu[uuid]) / 1e9, dt * max(1, c["vcpus"]))
            out.append(
                node_pb2.VMMetrics(
                    vm_id=uuid,
                    name=dom.name(),
                    cpu_usage_percent=cpu,
                    memory_used_bytes=c["memory"],
                    disk_read_bytes=c["rd"],
                    disk_write_bytes=c["wr"],
                    network_rx_bytes=c["rx"],
                    network_tx_bytes=c["tx"],
                )
            )
        return out
