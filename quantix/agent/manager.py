"""One supervised channel connection per running VM.

:class:`quantix.node.NodeService` calls :meth:`AgentManager.vm_started` and :meth:`vm_stopped`
from the domain watcher's state listener (a VM seen running, or stopped, crashed or gone, by a
libvirt event or a reconciliation); there is no periodic scan. Each VM gets a ``ClientService``
that reconnects with backoff (QEMU creates the socket at start, the guest may reboot, and only
one client may hold the socket at a time). The socket path is resolved afresh on every attempt,
so a VM whose socket appears late is still found.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import cast

from google.protobuf.message import Message
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime, IReactorUNIX, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from quantix import bridge
from quantix.agent import sockets
from quantix.agent.guestinfo import EventSink, GuestInfo, GuestInfoCache
from quantix.agent.protocol import AgentProtocol
from quantix.errors import Unavailable
from quantix.proto import agent_pb2
from quantix.util.backoff import retry_policy

CHANNEL_NAMES = ("org.quantix.agent.0", "org.limiquantix.agent.0")
CHANNEL_ROOTS = ("/run/libvirt/qemu/channel", "/var/lib/libvirt/qemu/channel/target")
DEFAULT_SOCKET_DIR = "/var/run/quantix-kvm/vms"
_DOMAIN_DIR = re.compile(r"^domain-\d+-(?P<name>.+)$")
IDENTIFY_TIMEOUT = 10.0
#: first wait before reconnecting to a channel we hung up on as hostile; doubles per offence
HOSTILE_HOLD = 30.0
HOSTILE_HOLD_MAX = 600.0
_SHORT_NAME = 20  # libvirt truncates the domain name in per-domain directory names


def socket_candidates(
    vm_id: str,
    socket_dir: str,
    channel_roots: Sequence[str] = CHANNEL_ROOTS,
    domain_name: str | None = None,
    listdir: Callable[[str], Iterable[str]] = os.listdir,
) -> list[str]:
    """Every path where the VM's agent socket may live, best first.

    Our own ``<socket_dir>/<vm_id>.agent.sock`` (what our domain XML asks QEMU to bind), then
    libvirt-chosen paths for channels defined without a source path:
    ``<root>/domain-<id>-<name>/<channel>``. A directory matches only when its name part equals
    the VM's id or name (as libvirt shortens it), never by substring, so another VM's socket is
    never picked.
    """
    out = [os.path.join(socket_dir, f"{vm_id}.agent.sock")]
    wanted = {n[:_SHORT_NAME] for n in (vm_id, domain_name) if n}
    for root in channel_roots:
        try:
            entries = sorted(listdir(root))
        except OSError:
            continue
        for entry in entries:
            m = _DOMAIN_DIR.match(entry)
            if m and m.group("name") in wanted:
                out.extend(os.path.join(root, entry, ch) for ch in CHANNEL_NAMES)
    return out


@implementer(IStreamClientEndpoint)
class _FirstSocketEndpoint:
    """A UNIX client endpoint whose path is the first acceptable candidate at connect time.

    A candidate that is a symlink, not a socket, or owned by an unexpected user is skipped
    (and logged once): see :mod:`quantix.agent.sockets`.
    """

    log = Logger()

    def __init__(self, reactor: IReactorUNIX, candidates: Callable[[], list[str]], timeout: float) -> None:
        self._reactor = reactor
        self._candidates = candidates
        self._timeout = timeout
        self._owners = sockets.expected_owners()
        self._refused: set[tuple[str, str]] = set()
        self.last_path: str | None = None

    def connect(self, factory: IProtocolFactory) -> defer.Deferred:
        for path in self._candidates():
            try:
                refusal = sockets.socket_refusal(path, self._owners)
            except OSError:
                continue
            if refusal is not None:
                if (path, refusal) not in self._refused:
                    self._refused.add((path, refusal))
                    self.log.warn("agent socket {path} refused: it {why}", path=path, why=refusal)
                continue
            self.last_path = path
            return UNIXClientEndpoint(self._reactor, path, timeout=self._timeout).connect(factory)
        return defer.fail(ConnectError(string="no agent socket yet"))


class _VM:
    def __init__(self, service: ClientService, endpoint: _FirstSocketEndpoint) -> None:
        self.service = service
        self.endpoint = endpoint
        self.proto: AgentProtocol | None = None


class AgentManager:
    """Channel connections for all running VMs, plus their guest info.

    Reactor only (enforced on the entry points); gRPC handlers use
    :class:`quantix.agent.facade.WorkerAgents`. :meth:`info` is safe from any thread.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        socket_dir: str = DEFAULT_SOCKET_DIR,
        channel_roots: Sequence[str] = CHANNEL_ROOTS,
        telemetry_interval: float = 5.0,
        on_event: EventSink | None = None,
        clock: IReactorTime | None = None,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        """``clock`` (default: the reactor) drives request timeouts and the telemetry watchdog."""
        self.reactor = reactor
        self.clock = clock or reactor
        self.socket_dir = socket_dir
        self.channel_roots = tuple(channel_roots)
        self.guests = GuestInfoCache(self.clock, telemetry_interval, on_event=on_event)
        self._retry = retry_policy(initial_backoff, max_backoff, factor=1.5)
        self._connect_timeout = connect_timeout
        self._vms: dict[str, _VM] = {}
        self._strikes: dict[str, int] = {}  # hostile-stream hang-ups per VM since it started
        self._hold_until: dict[str, float] = {}
        #: Set by stop_all: a state change reported after shutdown began (a reconciliation that
        #: was still running in a worker thread) must not start a channel that nobody stops.
        self._closed = False

    @bridge.reactor_only
    def vm_started(self, vm_id: str, domain_name: str | None = None, socket_path: str | None = None) -> None:
        """Start (idempotently) supervising the VM's channel.

        ``socket_path`` is the ``<channel>`` source path from the domain XML when the caller
        knows it; it is then the only candidate.
        """
        if vm_id in self._vms or self._closed:
            return
        if socket_path:

            def candidates():
                return [socket_path]
        else:

            def candidates():
                return socket_candidates(vm_id, self.socket_dir, self.channel_roots, domain_name)

        endpoint = _FirstSocketEndpoint(cast(IReactorUNIX, self.reactor), candidates, self._connect_timeout)
        factory = Factory.forProtocol(lambda: self._build(vm_id))
        # Not "Starting factory <...Factory object at 0x...>" at every (re)connect: the
        # channel's state changes are logged once each by _changed.
        factory.noisy = False
        service = ClientService(
            endpoint, factory, retryPolicy=lambda attempt: self._delay(vm_id, attempt), clock=self.reactor
        )
        self._vms[vm_id] = _VM(service, endpoint)
        self._changed(vm_id, "waiting")
        service.startService()

    @bridge.reactor_only
    def vm_stopped(self, vm_id: str) -> defer.Deferred:
        """Stop supervising; pending requests fail with ``Unavailable``. Fires when closed."""
        vm = self._vms.pop(vm_id, None)
        self.guests.forget(vm_id)
        self._strikes.pop(vm_id, None)
        self._hold_until.pop(vm_id, None)
        if vm is None:
            return defer.succeed(None)
        self._changed(vm_id, "stopped")
        return vm.service.stopService()

    def stop_all(self) -> defer.Deferred:
        """Close every channel (daemon shutdown); no channel opens after this."""
        self._closed = True
        return defer.DeferredList([self.vm_stopped(v) for v in list(self._vms)], consumeErrors=True)

    @bridge.reactor_only
    def request(self, vm_id: str, payload: Message, timeout: float) -> defer.Deferred[Message]:
        """Send one request to the VM's agent; fires with the reply payload message."""
        vm = self._vms.get(vm_id)
        if vm is None or vm.proto is None or not vm.proto.connected:
            return defer.fail(Unavailable(f"no guest agent connection for VM {vm_id}"))
        return vm.proto.request(payload, timeout)

    def info(self, vm_id: str) -> GuestInfo:
        """The VM's guest info snapshot."""
        return self.guests.get(vm_id)

    def is_channel_open(self, vm_id: str) -> bool:
        """The socket is connected (the agent itself may still be silent)."""
        vm = self._vms.get(vm_id)
        return vm is not None and vm.proto is not None and bool(vm.proto.connected)

    def connected_count(self) -> int:
        """Open agent channels (the ``quantix_agent_connections`` metric)."""
        return sum(1 for vm_id in self._vms if self.is_channel_open(vm_id))

    def socket_path(self, vm_id: str) -> str | None:
        """The path of the last connection attempt, for logs and tests."""
        vm = self._vms.get(vm_id)
        return vm.endpoint.last_path if vm else None

    def when_connected(self, vm_id: str) -> defer.Deferred:
        """Fires with the protocol once the VM's channel is open."""
        vm = self._vms.get(vm_id)
        if vm is None:
            return defer.fail(Unavailable(f"VM {vm_id} is not supervised"))
        return vm.service.whenConnected()

    def held_for(self, vm_id: str) -> float:
        """Seconds until the VM's channel may reconnect after a hostile-stream hang-up (0: none)."""
        return max(0.0, self._hold_until.get(vm_id, 0.0) - self.reactor.seconds())

    def _delay(self, vm_id: str, attempt: int) -> float:
        return max(self._retry(attempt), self.held_for(vm_id))

    def _hostile(self, vm_id: str) -> None:
        """Rate-limit a guest that floods its channel: reconnect only after a growing hold."""
        if vm_id not in self._vms:
            return
        strikes = self._strikes[vm_id] = self._strikes.get(vm_id, 0) + 1
        hold = min(HOSTILE_HOLD_MAX, HOSTILE_HOLD * 2 ** (strikes - 1))
        self._hold_until[vm_id] = self.reactor.seconds() + hold
        self.log.warn(
            "agent channel {vm}: reconnecting in {hold:g}s (offence {n})", vm=vm_id, hold=hold, n=strikes
        )

    # -- per-connection callbacks -------------------------------------------------------------

    def _build(self, vm_id: str) -> AgentProtocol:
        proto = _TrackedProtocol(self.clock)
        proto.manager, proto.vm_id, proto.label = self, vm_id, vm_id
        proto.on_unsolicited = lambda msg: self._unsolicited(vm_id, proto, msg)
        return proto

    def _made(self, vm_id: str, proto: AgentProtocol) -> None:
        vm = self._vms.get(vm_id)
        if vm is not None:
            vm.proto = proto
            self._changed(vm_id, "open", path=vm.endpoint.last_path)

    def _lost(self, vm_id: str, proto: AgentProtocol, reason: object = None) -> None:
        vm = self._vms.get(vm_id)
        if vm is not None and vm.proto is proto:
            vm.proto = None
            self.guests.channel_down(vm_id)
            why = getattr(reason, "value", reason)
            self._changed(vm_id, "closed", path=vm.endpoint.last_path, reason=str(why or "closed"))

    def _changed(self, vm_id: str, state: str, **fields: object) -> None:
        """One structured line per channel state change: ``waiting`` (supervised, no socket
        yet), ``open``, ``closed`` (will reconnect), ``stopped`` (the VM stopped). Fields:
        ``vm_id``, ``channel_state``, and ``path``/``reason`` where known."""
        self.log.info("agent channel {vm_id} {channel_state}", vm_id=vm_id, channel_state=state, **fields)

    def _unsolicited(self, vm_id: str, proto: _TrackedProtocol, msg: agent_pb2.AgentMessage) -> None:
        kind = msg.WhichOneof("payload")
        if kind == "agent_ready":
            proto.identified = True
            self.guests.agent_ready(vm_id, msg.agent_ready)
        elif kind == "telemetry":
            self.guests.telemetry(vm_id, msg.telemetry)
            if not proto.identified:
                # The agent sends agent_ready once per open of its port, so after our own
                # reconnect (daemon restart) only telemetry comes: ask who it is instead.
                proto.identified = True
                d = proto.request(agent_pb2.GetCapabilitiesRequest(), IDENTIFY_TIMEOUT)
                d.addCallbacks(
                    lambda caps: self.guests.capabilities(vm_id, caps),
                    lambda f: self.log.info("agent {vm} did not describe itself: {e}", vm=vm_id, e=f.value),
                )
        elif kind == "error":
            e = msg.error
            fmt = "guest agent {vm} reports {code}: {msg}"
            self.log.warn(fmt, vm=vm_id, code=e.code, msg=e.message)


class _TrackedProtocol(AgentProtocol):
    manager: AgentManager
    vm_id: str
    identified = False  # agent_ready seen, or capabilities asked for, on this connection

    def connectionMade(self) -> None:
        super().connectionMade()
        self.manager._made(self.vm_id, self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        super().connectionLost(reason)
        self.manager._lost(self.vm_id, self, reason)

    def _dispatch(self, msg: agent_pb2.AgentMessage) -> None:
        self.manager.guests.seen(self.vm_id)  # any frame proves the agent is alive
        super()._dispatch(msg)

    def _drop_hostile(self, reason: str) -> None:
        self.manager._hostile(self.vm_id)
        super()._drop_hostile(reason)
