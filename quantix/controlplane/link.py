"""Registration, heartbeat and pool assignment: the node's side of the control-plane protocol.

One small state machine on the reactor (:class:`Link`, :data:`TRANSITIONS`). At any moment
there is at most one timer and one call in flight for the main loop: ``register →
(SyncNodeVMs, SyncFullState) → heartbeat → heartbeat …``. Failures go back through a jittered
backoff, so a control plane that is down for hours costs one request a minute and nothing
accumulates. Pool assignment runs beside the loop, one operation per pool at a time, and never
holds up a heartbeat.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Protocol, TypeVar

from google.protobuf.message import Message
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from quantix.controlplane import messages, state
from quantix.controlplane.connect import ConnectError
from quantix.controlplane.facts import HeartbeatSample, HostFacts, PoolReport, VMFacts
from quantix.proto import compute_pb2, storage_pb2
from quantix.util.backoff import Backoff
from quantix.util.jsontypes import JsonValue
from quantix.util.states import StateMachine

NODE_SERVICE = "limiquantix.compute.v1.NodeService"
POOL_SERVICE = "limiquantix.storage.v1.StoragePoolService"

# Heartbeat failures in a row after which the node registers again (the control plane may have
# restarted with an in-memory store, or marked us disconnected).
FAILURES_BEFORE_REREGISTER = 3
# Notifications in flight at once; beyond that they are dropped (the next full sync repairs).
MAX_NOTIFICATIONS_IN_FLIGHT = 16
# While a failure repeats unchanged, only every Nth occurrence is logged.
_LOG_EVERY = 60

_VM_CHANGE_EVENTS = {
    "created": compute_pb2.VM_CHANGE_CREATED,
    "updated": compute_pb2.VM_CHANGE_UPDATED,
    "deleted": compute_pb2.VM_CHANGE_DELETED,
}

log = Logger(namespace="quantix.controlplane")


def _warning(fmt: str, **kwargs: object) -> None:
    log.emit(LogLevel.warn, fmt, **kwargs)


#: One step of the main loop; it answers when to run which step next (None: stop).
Step = Callable[[], Coroutine[defer.Deferred[object], object, "tuple[float, Step] | None"]]


M = TypeVar("M", bound=Message)
T = TypeVar("T")


class CallClient(Protocol):
    """What the link, and the reporters that share its client, need of
    :class:`~quantix.controlplane.connect.ConnectClient`."""

    base_url: str

    def call(
        self, service: str, method: str, request: Message, response_cls: type[M]
    ) -> defer.Deferred[M]: ...

    def post_json(self, path: str, body: Mapping[str, object]) -> defer.Deferred[JsonValue]: ...


class Link(enum.Enum):
    """Where the main loop is. Pool operations and notifications run beside it, in any state."""

    IDLE = "idle"  # not running, registering not yet allowed
    ALLOWED = "allowed"  # registering allowed (the gRPC server listens), the service not running
    HELD = "held"  # running, waiting for start_registration
    REGISTER_PENDING = "register_pending"  # the timer runs RegisterNode (startup jitter, backoff)
    REGISTERING = "registering"  # RegisterNode, then SyncNodeVMs / SyncFullState in flight
    HEARTBEAT_PENDING = "heartbeat_pending"  # the timer runs the next heartbeat
    HEARTBEATING = "heartbeating"  # UpdateHeartbeat (and what its answer asks for) in flight


class Input(enum.Enum):
    START = "start"  # startService
    ALLOW = "allow"  # start_registration
    STOP = "stop"  # stopService
    DUE = "due"  # the timer fired
    REGISTER_NEXT = "register_next"  # a step ended; register next (first failure, lost node, bug)
    HEARTBEAT_NEXT = "heartbeat_next"  # a step ended; heartbeat next


_ACTIVE = (Link.REGISTER_PENDING, Link.REGISTERING, Link.HEARTBEAT_PENDING, Link.HEARTBEATING)
_CALLING = (Link.REGISTERING, Link.HEARTBEATING)

#: Every legal move of the main loop; anything else raises ``IllegalTransition``.
TRANSITIONS: dict[tuple[Link, Input], Link] = {
    (Link.IDLE, Input.START): Link.HELD,
    (Link.IDLE, Input.ALLOW): Link.ALLOWED,
    (Link.IDLE, Input.STOP): Link.IDLE,
    (Link.ALLOWED, Input.START): Link.REGISTER_PENDING,
    (Link.ALLOWED, Input.ALLOW): Link.ALLOWED,
    (Link.ALLOWED, Input.STOP): Link.ALLOWED,
    (Link.HELD, Input.ALLOW): Link.REGISTER_PENDING,
    (Link.HELD, Input.STOP): Link.IDLE,
    (Link.REGISTER_PENDING, Input.DUE): Link.REGISTERING,
    (Link.REGISTERING, Input.REGISTER_NEXT): Link.REGISTER_PENDING,
    (Link.REGISTERING, Input.HEARTBEAT_NEXT): Link.HEARTBEAT_PENDING,
    (Link.HEARTBEAT_PENDING, Input.DUE): Link.HEARTBEATING,
    (Link.HEARTBEATING, Input.HEARTBEAT_NEXT): Link.HEARTBEAT_PENDING,
    (Link.HEARTBEATING, Input.REGISTER_NEXT): Link.REGISTER_PENDING,
    # Once allowed, always allowed; a stop keeps that for a restart.
    **{(state, Input.ALLOW): state for state in _ACTIVE},
    **{(state, Input.STOP): Link.ALLOWED for state in _ACTIVE},
}


async def _gather(source: Callable[[], T | defer.Deferred[T]]) -> T:
    """A data source's value, whether it answers at once or with a Deferred."""
    result = source()
    if isinstance(result, defer.Deferred):
        return await result
    return result


def _empty() -> tuple[()]:
    return ()


class ControlPlaneLink(service.Service):
    """Keep this node registered and heartbeating with the control plane.

    ``reactor`` only needs ``callLater``/``seconds`` (a ``task.Clock`` in tests); ``client`` is a
    :class:`~quantix.controlplane.connect.ConnectClient`. The data sources are callables that
    return a value or a Deferred, so the caller decides what runs in a thread:

    * ``facts() -> HostFacts``, gathered again for every registration;
    * ``vms() -> Iterable[VMFacts]`` for SyncNodeVMs/SyncFullState;
    * ``heartbeat_sample() -> HeartbeatSample`` and ``pool_reports() -> Iterable[PoolReport]``;
    * ``ensure_pool(StoragePool) -> Deferred`` and ``release_pool(pool_id) -> Deferred`` for the
      pools the control plane assigns to this node and takes back.

    Nothing is sent before :meth:`start_registration`: the control plane dials our gRPC port as
    soon as it creates the node record, so the server has to be listening first.
    """

    name = "control-plane-link"

    def __init__(
        self,
        reactor: IReactorTime,
        client: CallClient,
        facts: Callable[[], HostFacts | defer.Deferred[HostFacts]],
        state_dir: str,
        *,
        vms: Callable[[], Iterable[VMFacts] | defer.Deferred[Iterable[VMFacts]]] = _empty,
        heartbeat_sample: Callable[[], HeartbeatSample | defer.Deferred[HeartbeatSample]] = HeartbeatSample,
        pool_reports: Callable[[], Iterable[PoolReport] | defer.Deferred[Iterable[PoolReport]]] = _empty,
        ensure_pool: Callable[[storage_pb2.StoragePool], defer.Deferred] | None = None,
        release_pool: Callable[[str], defer.Deferred] | None = None,
        heartbeat_interval: float = 30.0,
        startup_jitter: float = 5.0,
        backoff: Backoff | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._clock = reactor
        self._client = client
        self._facts = facts
        self._vms = vms
        self._sample = heartbeat_sample
        self._pool_reports = pool_reports
        self._ensure_pool = ensure_pool
        self._release_pool = release_pool
        self._state_dir = state_dir
        self._interval = heartbeat_interval
        self._startup_jitter = startup_jitter
        self._rand = rand
        self._backoff = backoff or Backoff(rand=rand)

        stored = state.load(state_dir, client.base_url)
        self._stored = stored

        # Public state, for health checks and metrics.
        self.registered = False
        self.node_id: str | None = stored.node_id or None
        self.last_heartbeat_ok: float | None = None
        self.consecutive_failures = 0
        self.last_error: str | None = None

        self.states = StateMachine("control-plane link", Link.IDLE, TRANSITIONS)
        self._timer: IDelayedCall | None = None
        self._current: defer.Deferred | None = None
        self._idle_waiters: list[defer.Deferred] = []

        # Pools: ensured by this process, and assigned in an earlier run (only to release them).
        self._pools: set[str] = set()
        self._pools_before: set[str] = set(stored.pools)
        self._pool_ops: dict[str, defer.Deferred] = {}
        self._no_pool_handler_logged = False

        #: Called with the node id after every (re)registration, without waiting for them.
        self.registered_listeners: list[Callable[[str], object]] = []
        self._unimplemented: set[str] = set()
        self._unimplemented_logged: set[str] = set()
        self._notifications: set[defer.Deferred] = set()
        self._last_failure_text: str | None = None
        self._repeats = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def state(self) -> Link:
        return self.states.state

    def startService(self) -> None:
        super().startService()
        if self.states.fire(Input.START) is Link.ALLOWED:
            self._schedule(self._rand() * self._startup_jitter)

    def start_registration(self) -> None:
        """The gRPC server is listening: registering may begin (idempotent)."""
        if self.states.fire(Input.ALLOW) is Link.HELD:
            self._schedule(self._rand() * self._startup_jitter)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        self.states.fire(Input.STOP)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for d in [self._current, *self._notifications, *self._pool_ops.values()]:
            if d is not None:
                d.cancel()
        self._check_idle()
        return defer.succeed(None)

    @property
    def client(self) -> CallClient:
        """The Connect client (other reporters to the same control plane share it)."""
        return self._client

    @property
    def assigned_pools(self) -> frozenset[str]:
        """Pools the control plane assigned that this process has set up."""
        return frozenset(self._pools)

    def idle(self) -> defer.Deferred:
        """Fires when no call is in flight (only a timer pending); lets tests step a fake clock."""
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    # -- the main loop -----------------------------------------------------------------------

    def _schedule(self, delay: float) -> None:
        """Arm the one timer; the state (…_PENDING) says which step it runs."""
        self._timer = self._clock.callLater(max(delay, 0.0), self._due)
        self._check_idle()

    def _due(self) -> None:
        self._timer = None
        self.states.fire(Input.DUE)
        step = self._register if self.states.state is Link.REGISTERING else self._heartbeat
        d = defer.maybeDeferred(step)
        self._current = d
        d.addCallbacks(self._stepped, self._crashed)

    def _stepped(self, nxt: tuple[float, Step] | None) -> None:
        self._current = None
        if nxt is not None and self.states.state in _CALLING:
            delay, step = nxt
            self.states.fire(Input.HEARTBEAT_NEXT if step == self._heartbeat else Input.REGISTER_NEXT)
            self._schedule(delay)
        self._check_idle()

    def _crashed(self, failure: Failure) -> None:
        """A bug in a step: log it and start over rather than stop talking to the control plane."""
        self._current = None
        if failure.check(defer.CancelledError) or self.states.state not in _CALLING:
            self._check_idle()
            return
        log.failure("control-plane link step failed", failure)
        self.registered = False
        self.states.fire(Input.REGISTER_NEXT)
        self._schedule(self._backoff.next())

    def _check_idle(self) -> None:
        if self._current is None and not self._pool_ops and not self._notifications:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    # -- steps -------------------------------------------------------------------------------

    async def _register(self) -> tuple[float, Step] | None:
        try:
            facts = await _gather(self._facts)
            node = await self._client.call(
                NODE_SERVICE, "RegisterNode", messages.register_request(facts), compute_pb2.Node
            )
            if not node.id:
                raise ConnectError("internal", "RegisterNode answered without an id", 200)
        except Exception as exc:
            if not self.running:
                return None
            self._failed("registration", exc)
            return (self._retry_delay(exc), self._register)

        self._adopt(node.id)
        self.registered = True
        self.consecutive_failures = 0
        self.last_error = None
        self._last_failure_text = None
        self._unimplemented.clear()
        log.info(
            "registered with {url} as node {node_id} ({hostname})",
            url=self._client.base_url,
            node_id=node.id,
            hostname=facts.hostname,
        )
        vms = await self._read_vms()
        if vms is not None:
            await self._optional(
                "SyncNodeVMs", messages.sync_vms_request(node.id, vms), compute_pb2.SyncNodeVMsResponse
            )
        await self._full_sync(facts, vms)
        for listener in list(self.registered_listeners):
            try:
                listener(node.id)
            except Exception:
                log.failure("a registration listener failed")
        # The backoff is reset by a heartbeat, not by registering: a control plane that accepts
        # registrations but forgets us at once must not be hammered.
        return (0.0, self._heartbeat)

    async def _heartbeat(self) -> tuple[float, Step] | None:
        try:
            sample = await _gather(self._sample)
            pools = await _gather(self._pool_reports)
            request = messages.heartbeat_request(self.node_id or "", sample, pools)
            answer = await self._client.call(
                NODE_SERVICE, "UpdateHeartbeat", request, compute_pb2.UpdateHeartbeatResponse
            )
        except Exception as exc:
            if not self.running:
                return None
            self._failed("heartbeat", exc)
            if isinstance(exc, ConnectError) and exc.code == "not_found":
                _warning(
                    "control plane does not know node {node_id}: registering again", node_id=self.node_id
                )
                self.registered = False
                return (self._retry_delay(exc), self._register)
            if self.consecutive_failures >= FAILURES_BEFORE_REREGISTER:
                self.registered = False
                return (self._retry_delay(exc), self._register)
            return (self._retry_delay(exc, cap=self._interval), self._heartbeat)

        if self._last_failure_text is not None:
            log.info("control plane reachable again after {n} failures", n=self.consecutive_failures)
        self.consecutive_failures = 0
        self.last_error = None
        self._last_failure_text = None
        self.last_heartbeat_ok = self._clock.seconds()
        self._backoff.reset()
        self._reconcile_pools(list(answer.assigned_pool_ids))
        if answer.request_full_sync:
            await self._resync()
        return (self._interval, self._heartbeat)

    def _retry_delay(self, exc: BaseException, cap: float | None = None) -> float:
        delay = self._backoff.next()
        if cap is not None:
            delay = min(delay, cap)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    def _failed(self, what: str, exc: BaseException) -> None:
        """Count a failure; log it when it is new, and only now and then while it repeats."""
        self.consecutive_failures += 1
        text = str(exc)
        self.last_error = f"{what}: {text}"
        if not isinstance(exc, ConnectError):
            log.failure("{what} failed", what=what)
        elif text != self._last_failure_text or self._repeats >= _LOG_EVERY:
            _warning(
                "{what} with {url} failed ({n} in a row): {error}",
                what=what,
                url=self._client.base_url,
                n=self.consecutive_failures,
                error=text,
            )
            self._repeats = 0
        else:
            self._repeats += 1
        self._last_failure_text = text

    def _adopt(self, node_id: str) -> None:
        if self.node_id and node_id != self.node_id:
            _warning("control plane gave a new node id {new} (was {old})", new=node_id, old=self.node_id)
        self.node_id = node_id
        self._persist()

    def _persist(self) -> None:
        # A few hundred bytes, written only when something changed: cheap enough for the reactor.
        wanted = state.LinkState(
            control_plane=self._client.base_url,
            node_id=self.node_id or "",
            pools=tuple(sorted(self._pools | self._pools_before)),
        )
        if wanted != self._stored:
            state.save(self._state_dir, wanted)
            self._stored = wanted

    # -- optional calls ----------------------------------------------------------------------

    async def _read_vms(self) -> list[VMFacts] | None:
        try:
            return list(await _gather(self._vms))
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("listing VMs for the control plane failed")
            return None

    async def _resync(self) -> compute_pb2.SyncFullStateResponse | None:
        """The control plane asked for our full state (a newer one than today's may)."""
        try:
            facts = await _gather(self._facts)
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("gathering host facts failed")
            return None
        return await self._full_sync(facts, await self._read_vms())

    async def _full_sync(
        self, facts: HostFacts, vms: list[VMFacts] | None
    ) -> compute_pb2.SyncFullStateResponse | None:
        if "SyncFullState" in self._unimplemented or vms is None:
            return None
        try:
            pools = await _gather(self._pool_reports)
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("collecting pool reports failed")
            return None
        request = messages.full_state_request(self.node_id or "", facts, vms, pools)
        return await self._optional("SyncFullState", request, compute_pb2.SyncFullStateResponse)

    async def _optional(self, method: str, request: Message, response_cls: type[M]) -> M | None:
        """A call whose failure must not stop the link; ``unimplemented`` is remembered."""
        if method in self._unimplemented:
            return None
        try:
            return await self._client.call(NODE_SERVICE, method, request, response_cls)
        except ConnectError as exc:
            if exc.code == "unimplemented":
                self._unimplemented.add(method)
                if method not in self._unimplemented_logged:
                    self._unimplemented_logged.add(method)
                    log.info("control plane does not implement {method}; skipping it", method=method)
            elif self.running:
                _warning("{method} failed: {error}", method=method, error=exc)
            return None

    def notify_vm_change(self, vm: VMFacts, event: str, previous_state: str = "") -> defer.Deferred:
        """Push one VM change (``created``/``updated``/``deleted``); best effort, never fails."""
        if (
            not self.running
            or not self.registered
            or "NotifyVMChange" in self._unimplemented
            or len(self._notifications) >= MAX_NOTIFICATIONS_IN_FLIGHT
        ):
            return defer.succeed(None)
        request = compute_pb2.VMChangeNotification(
            node_id=self.node_id or "",
            vm=messages.vm_status(vm),
            event_type=_VM_CHANGE_EVENTS.get(event, compute_pb2.VM_CHANGE_UPDATED),
            timestamp_unix=int(self._clock.seconds()),
            previous_state=messages.power_state(previous_state)
            if previous_state
            else compute_pb2.VM_POWER_STATE_UNKNOWN,
        )
        d = defer.Deferred.fromCoroutine(self._optional("NotifyVMChange", request, compute_pb2.VMChangeAck))
        self._notifications.add(d)

        def done(result: object) -> None:
            self._notifications.discard(d)
            self._check_idle()

        d.addBoth(done)
        return d

    # -- pools -------------------------------------------------------------------------------

    def _reconcile_pools(self, assigned: list[str]) -> None:
        """Set up newly assigned pools and release withdrawn ones, one operation per pool."""
        if self._ensure_pool is None or self._release_pool is None:
            if assigned and not self._no_pool_handler_logged:
                self._no_pool_handler_logged = True
                _warning("control plane assigned pools {pools} but no storage handler is set", pools=assigned)
            return
        wanted = set(assigned)
        for pool_id in sorted(wanted - self._pools - set(self._pool_ops)):
            self._pool_op(pool_id, defer.Deferred.fromCoroutine(self._set_up_pool(pool_id)))
        for pool_id in sorted((self._pools | self._pools_before) - wanted - set(self._pool_ops)):
            self._pool_op(pool_id, defer.Deferred.fromCoroutine(self._take_back_pool(pool_id)))

    def _pool_op(self, pool_id: str, d: defer.Deferred) -> None:
        self._pool_ops[pool_id] = d

        def done(result: object) -> None:
            self._pool_ops.pop(pool_id, None)
            self._check_idle()

        d.addBoth(done)

    async def _set_up_pool(self, pool_id: str) -> None:
        try:
            pool = await self._client.call(
                POOL_SERVICE, "GetPool", storage_pb2.GetPoolRequest(id=pool_id), storage_pb2.StoragePool
            )
            assert self._ensure_pool is not None  # checked by _reconcile_pools
            await defer.maybeDeferred(self._ensure_pool, pool)
        except defer.CancelledError:
            return
        except ConnectError as exc:
            _warning("fetching assigned pool {pool_id} failed: {error}", pool_id=pool_id, error=exc)
            return
        except Exception:
            log.failure("setting up assigned pool {pool_id} failed", pool_id=pool_id)
            return
        log.info("assigned pool {pool_id} ({name}) is set up", pool_id=pool_id, name=pool.name)
        self._pools.add(pool_id)
        self._pools_before.discard(pool_id)
        self._persist()

    async def _take_back_pool(self, pool_id: str) -> None:
        try:
            assert self._release_pool is not None  # checked by _reconcile_pools
            await defer.maybeDeferred(self._release_pool, pool_id)
        except defer.CancelledError:
            return
        except Exception:
            log.failure("releasing pool {pool_id} failed", pool_id=pool_id)
            return
        log.info("pool {pool_id} is no longer assigned: released", pool_id=pool_id)
        self._pools.discard(pool_id)
        self._pools_before.discard(pool_id)
        self._persist()
