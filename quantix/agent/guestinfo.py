"""What the daemon knows about each VM's guest agent, fed by ``agent_ready`` and ``telemetry``.

``connected`` means "the agent inside the guest is talking", not "the socket is open": QEMU
accepts a connection even when no agent runs. It turns true on ``agent_ready`` or telemetry and
false when the channel drops or after ``missed_intervals`` telemetry intervals of silence.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from quantix.agent.protocol import set_timestamp
from quantix.proto import agent_pb2, node_pb2

AGENT_CONNECTED: int = node_pb2.EVENT_TYPE_AGENT_CONNECTED
AGENT_DISCONNECTED: int = node_pb2.EVENT_TYPE_AGENT_DISCONNECTED

#: on_event(vm_id, kind, message) with kind one of AGENT_CONNECTED / AGENT_DISCONNECTED
EventSink = Callable[[str, int, str], None]


@attrs.define
class GuestInfo:
    """A snapshot of one VM's guest agent state (copies, safe to hand to another thread)."""

    connected: bool = False
    version: str = ""
    os_name: str = ""
    os_version: str = ""
    kernel_version: str = ""
    architecture: str = ""
    hostname: str = ""
    ip_addresses: list[str] = attrs.Factory(list)
    capabilities: list[str] = attrs.Factory(list)
    telemetry: agent_pb2.TelemetryReport | None = None
    last_seen: float | None = None  # clock seconds of the last frame from the agent


class GuestInfoCache:
    """Per-VM guest info, with a silence watchdog. Reactor thread only."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        telemetry_interval: float = 5.0,
        missed_intervals: int = 3,
        on_event: EventSink | None = None,
    ) -> None:
        self.clock = clock
        self.telemetry_interval = telemetry_interval
        self.missed_intervals = missed_intervals
        self.on_event = on_event
        self._info: dict[str, GuestInfo] = {}
        self._watchdogs: dict[str, IDelayedCall] = {}
        self._report_waiters: dict[str, list[defer.Deferred]] = {}

    def get(self, vm_id: str) -> GuestInfo:
        """A copy of the VM's info (all defaults, ``connected=False``, when unknown).

        Safe from any thread: the reactor only ever assigns new values to an entry's fields (a new
        list, a new report), never changes one in place, so a copy taken elsewhere is whole.
        """
        info = self._info.get(vm_id)
        if info is None:
            return GuestInfo()
        copy = attrs.evolve(info, ip_addresses=list(info.ip_addresses), capabilities=list(info.capabilities))
        if info.telemetry is not None:
            copy.telemetry = agent_pb2.TelemetryReport()
            copy.telemetry.CopyFrom(info.telemetry)
        return copy

    def agent_ready(self, vm_id: str, ev: agent_pb2.AgentReadyEvent) -> None:
        info = self._info.setdefault(vm_id, GuestInfo())
        info.version = ev.version
        info.os_name = ev.os_name
        info.os_version = ev.os_version
        info.kernel_version = ev.kernel_version
        info.architecture = ev.architecture
        info.hostname = ev.hostname
        info.ip_addresses = list(ev.ip_addresses)
        info.capabilities = list(ev.capabilities)
        self._alive(vm_id, info, "agent ready" + (f" (version {ev.version})" if ev.version else ""))

    def telemetry(self, vm_id: str, report: agent_pb2.TelemetryReport) -> None:
        info = self._info.setdefault(vm_id, GuestInfo())
        info.telemetry = report
        if report.hostname:
            info.hostname = report.hostname
        ips = reachable_ips(a for i in report.interfaces for a in (*i.ipv4_addresses, *i.ipv6_addresses))
        if ips:
            info.ip_addresses = ips
        self._alive(vm_id, info, "agent telemetry resumed")
        for d in self._report_waiters.pop(vm_id, []):
            d.callback(None)

    def next_telemetry(self, vm_id: str) -> defer.Deferred:
        """Fires when the VM's next telemetry report has been stored (the caller bounds the
        wait, e.g. with ``addTimeout``; cancelling forgets the waiter)."""

        def forget(d: defer.Deferred) -> None:
            waiting = self._report_waiters.get(vm_id, [])
            if d in waiting:
                waiting.remove(d)
            if not waiting:
                self._report_waiters.pop(vm_id, None)

        d: defer.Deferred = defer.Deferred(canceller=forget)
        self._report_waiters.setdefault(vm_id, []).append(d)
        return d

    def capabilities(self, vm_id: str, caps: agent_pb2.GetCapabilitiesResponse) -> None:
        """What the agent says of itself when asked (it sent no ``agent_ready`` to us)."""
        info = self._info.get(vm_id)
        if info is None:
            return
        info.version = caps.version or info.version
        info.architecture = caps.architecture or info.architecture
        info.os_name = info.os_name or caps.os
        info.capabilities = list(caps.capabilities)

    def seen(self, vm_id: str) -> None:
        """Every other frame from the agent (a reply) also proves it is alive."""
        info = self._info.get(vm_id)
        if info is not None and info.connected:
            info.last_seen = self.clock.seconds()

    def channel_down(self, vm_id: str, why: str = "agent channel closed") -> None:
        """The socket closed (VM stopped, QEMU restarted the chardev, guest hung up)."""
        self._cancel_watchdog(vm_id)
        info = self._info.get(vm_id)
        if info is not None and info.connected:
            info.connected = False
            self._emit(vm_id, AGENT_DISCONNECTED, why)

    def forget(self, vm_id: str) -> None:
        """The VM is gone: drop its entry (reporting a disconnect if it was connected)."""
        self.channel_down(vm_id, "VM stopped")
        self._info.pop(vm_id, None)

    def _alive(self, vm_id: str, info: GuestInfo, why: str) -> None:
        info.last_seen = self.clock.seconds()
        self._cancel_watchdog(vm_id)
        self._watchdogs[vm_id] = self.clock.callLater(
            self.telemetry_interval * self.missed_intervals, self._silent, vm_id
        )
        if not info.connected:
            info.connected = True
            self._emit(vm_id, AGENT_CONNECTED, why)

    def _silent(self, vm_id: str) -> None:
        self._watchdogs.pop(vm_id, None)
        info = self._info.get(vm_id)
        if info is not None and info.connected:
            info.connected = False
            self._emit(
                vm_id,
                AGENT_DISCONNECTED,
                f"no telemetry for {self.missed_intervals} intervals of {self.telemetry_interval:g}s",
            )

    def _cancel_watchdog(self, vm_id: str) -> None:
        dc = self._watchdogs.pop(vm_id, None)
        if dc is not None and dc.active():
            dc.cancel()

    def _emit(self, vm_id: str, kind: int, message: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(vm_id, kind, message)
        except Exception:
            self.log.failure("agent event subscriber failed")


def reachable_ips(addresses: Iterable[str]) -> list[str]:
    """Addresses worth showing: no loopback or link-local, no CIDR suffix, no unparsable text."""
    out = []
    for text in addresses:
        try:
            ip = ipaddress.ip_interface(text.strip()).ip
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            out.append(str(ip))
    return out


def to_proto(info: GuestInfo) -> node_pb2.GuestAgentInfo:
    """``VMStatusResponse.guest_agent`` from a snapshot; capabilities are the agent's own."""
    out = node_pb2.GuestAgentInfo(
        connected=info.connected,
        version=info.version,
        os_name=info.os_name,
        os_version=info.os_version,
        kernel_version=info.kernel_version,
        hostname=info.hostname,
        ip_addresses=info.ip_addresses,
        capabilities=info.capabilities,
    )
    if info.last_seen is not None:
        set_timestamp(out.last_seen, info.last_seen)
    t = info.telemetry
    if t is None:
        return out
    for i in t.interfaces:
        out.interfaces.add(
            name=i.name,
            mac_address=i.mac_address,
            ipv4_addresses=i.ipv4_addresses,
            ipv6_addresses=i.ipv6_addresses,
            is_up=i.state == agent_pb2.INTERFACE_STATE_UP,
        )
    ru = out.resource_usage
    ru.cpu_usage_percent = t.cpu_usage_percent
    ru.memory_total_bytes = t.memory_total_bytes
    ru.memory_used_bytes = t.memory_used_bytes
    # Trust the guest's own figure (it counts reclaimable cache); derive it only when absent.
    ru.memory_available_bytes = t.memory_available_bytes or max(t.memory_total_bytes - t.memory_used_bytes, 0)
    ru.swap_total_bytes = t.swap_total_bytes
    ru.swap_used_bytes = t.swap_used_bytes
    ru.load_avg_1, ru.load_avg_5, ru.load_avg_15 = t.load_avg_1, t.load_avg_5, t.load_avg_15
    ru.process_count = t.process_count
    ru.uptime_seconds = t.uptime_seconds
    for d in t.disks:
        pct = d.usage_percent or (100.0 * d.used_bytes / d.total_bytes if d.total_bytes else 0.0)
        ru.disks.add(
            mount_point=d.mount_point,
            device=d.device,
            filesystem=d.filesystem,
            total_bytes=d.total_bytes,
            used_bytes=d.used_bytes,
            available_bytes=d.available_bytes,
            usage_percent=pct,
        )
    return out
