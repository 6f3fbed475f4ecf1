"""``StreamMetrics`` samples: host counters from psutil, per-VM counters from one bulk libvirt call.

A :class:`Sampler` keeps the previous counters, so rates (CPU %, IOPS) are computed over its
interval. The :class:`MetricsHub` keeps one sampler per requested interval and shares each
sample, serialized once, with every subscriber of that interval: the cost of ``StreamMetrics``
is one libvirt + psutil sample per interval, however many clients stream. Sampling blocks
(libvirt round trip), so it runs in the gRPC thread of whichever subscriber is due first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import libvirt
import psutil
from google.protobuf.timestamp_pb2 import Timestamp
from twisted.application.service import Service

from quantix import errors
from quantix.proto import node_pb2

if TYPE_CHECKING:
    from psutil._ntuples import scputimes, sdiskio

SHUTTING_DOWN = "node daemon is shutting down"

VM_STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)


def _busy_total(t: scputimes) -> tuple[float, float]:
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
    """One interval's sampler; the first sample has zero rates (no previous counters yet)."""

    def __init__(self, conn: Callable[[], libvirt.virConnect], flags: int = 0) -> None:
        self._conn = conn
        self._flags = flags
        self._prev_at: float | None = None
        self._prev_cpu = _busy_total(psutil.cpu_times())
        self._prev_disks: dict[str, sdiskio] = {}
        self._prev_vms: dict[str, int] = {}

    def sample(self) -> node_pb2.NodeMetrics:
        now = time.monotonic()
        dt = now - self._prev_at if self._prev_at is not None else 0.0
        self._prev_at = now
        ts = Timestamp()
        ts.FromNanoseconds(time.time_ns())  # as the event bus stamps events

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


def stats_flags(uri: str) -> int:
    """``NOWAIT`` keeps a sample from waiting behind a busy domain's job (the test driver lacks it)."""
    return 0 if uri.startswith("test:") else libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT


class _Channel:
    """The samples of one interval: the latest one, serialized, and who is taking the next.

    One subscriber at a time waits for the next sample to fall due (the timekeeper) and takes it
    (outside the lock); the others wait to be told it is there, then all send the same bytes. So
    each subscriber wakes once per sample: were they all to wait for the due time, they would all
    wake at once and queue for the lock and the GIL, only to wait again for the sample.
    """

    def __init__(self, sampler: Sampler, interval: float) -> None:
        self.sampler = sampler
        self.interval = interval
        self.cond = threading.Condition(threading.Lock())
        self.subscribers = 0
        self.seq = 0
        self.latest = b""
        self.due = 0.0
        self.sampling = False
        #: A subscriber is waiting for ``due`` (the others wait for a notification).
        self.timekeeper = False
        self.closed = False
        #: Samples taken (for tests and benchmarks: one per interval, not one per subscriber).
        self.taken = 0

    def next_after(self, seen: int, sub: MetricsSubscription) -> tuple[int, bytes] | None:
        """Blocking: the first sample newer than ``seen`` (the latest at once for a new
        subscriber), taking it when due; None once ``sub`` is cancelled."""
        with self.cond:
            keeper = False  # this caller is the timekeeper
            while True:
                if self.closed or sub.cancelled or self.seq > seen:
                    if keeper:  # leaving: the others elect another timekeeper
                        self.timekeeper = False
                        self.cond.notify_all()
                    if self.closed:
                        raise errors.Unavailable(SHUTTING_DOWN)
                    return None if sub.cancelled else (self.seq, self.latest)
                if self.sampling or (self.timekeeper and not keeper):
                    self.cond.wait()
                    continue
                wait = self.due - time.monotonic()
                if wait <= 0:
                    self.timekeeper = False
                    self.sampling = True
                    break
                self.timekeeper = keeper = True
                self.cond.wait(wait)
        started = time.monotonic()
        data = None
        try:
            data = self.sampler.sample().SerializeToString()
        finally:
            with self.cond:
                self.sampling = False
                seq = self.seq
                if data is not None:
                    seq = self.seq = self.seq + 1
                    self.taken += 1
                    self.latest = data
                    # Keep to the interval's grid; after a stall, start a new one (no burst).
                    self.due = self.due + self.interval if self.seq > 1 else started + self.interval
                    if self.due < started:
                        self.due = started + self.interval
                self.cond.notify_all()
        return seq, data

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class MetricsSubscription:
    """One ``StreamMetrics`` stream: iterate :meth:`samples` (serialized ``NodeMetrics``)."""

    def __init__(self, hub: MetricsHub, channel: _Channel) -> None:
        self._hub = hub
        self._channel = channel
        self.cancelled = False

    def samples(self) -> Iterator[bytes]:
        """Blocking iterator (gRPC thread); returns once cancelled, raises ``Unavailable`` when
        the daemon stops."""
        seen = 0
        try:
            while (got := self._channel.next_after(seen, self)) is not None:
                seen, data = got
                yield data
        finally:
            self._hub._leave(self._channel)

    def cancel(self) -> None:
        """From any thread (grpc's RPC-done callback): end :meth:`samples` now."""
        self.cancelled = True
        self._channel.wake()


class MetricsHub(Service):
    """One :class:`Sampler` per requested interval, shared by all of that interval's streams."""

    def __init__(self, conn: Callable[[], libvirt.virConnect], flags: int = 0) -> None:
        self._conn = conn
        self._flags = flags
        self._lock = threading.Lock()
        self._channels: dict[float, _Channel] = {}
        self._closed = False

    def subscribe(self, interval: float) -> MetricsSubscription:
        with self._lock:
            if self._closed:
                raise errors.Unavailable(SHUTTING_DOWN)
            channel = self._channels.get(interval)
            if channel is None:
                channel = self._channels[interval] = _Channel(Sampler(self._conn, self._flags), interval)
            channel.subscribers += 1
        return MetricsSubscription(self, channel)

    def channel(self, interval: float) -> _Channel | None:
        return self._channels.get(interval)

    def _leave(self, channel: _Channel) -> None:
        with self._lock:
            channel.subscribers -= 1
            if channel.subscribers == 0 and self._channels.get(channel.interval) is channel:
                del self._channels[channel.interval]

    def startService(self) -> None:
        super().startService()
        self._closed = False

    def stopService(self) -> None:
        """End every stream with UNAVAILABLE."""
        super().stopService()
        with self._lock:
            self._closed = True
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
