"""The one owner of guest filesystem freezes.

A freeze is state the node must keep: which VM is frozen, under which token, which mount points,
and the timer that thaws it when nobody else does. ``QuiesceFilesystems``/``ThawFilesystems``
and quiesced snapshots all go through :class:`Quiesce`, so they see the same records.

Everything runs on the reactor. Freezes, thaws and automatic thaws of one VM are serialised
(one after another, each with its agent round trip), so two concurrent freezes of one VM cannot
both pass the "already frozen" check: the second waits for the first and is then refused.
Different VMs do not wait for each other.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator
from typing import ParamSpec, TypeVar

import attrs
from google.protobuf.message import Message
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from quantix import bridge
from quantix.agent.protocol import expect
from quantix.errors import Invalid
from quantix.proto import agent_pb2

ALREADY_FROZEN = "filesystems are already frozen"
#: Per round trip of an automatic thaw.
THAW_TIMEOUT = 30.0

T = TypeVar("T")
P = ParamSpec("P")
#: The agent manager's round trip: fires with the guest's reply payload.
Request = Callable[[str, Message, float], "defer.Deferred[Message]"]


@attrs.define
class Freeze:
    """An active freeze: our token (handed to the caller), the agent's own, the frozen mounts."""

    token: str
    agent_token: str
    mounts: list[str]
    timer: IDelayedCall


@attrs.frozen
class Frozen:
    """What :meth:`Quiesce.freeze` answers: the agent's reply and, on success, the token to
    thaw with (the agent's own, or one we made up when the agent gave none)."""

    reply: agent_pb2.QuiesceFilesystemsResponse
    token: str = ""


class _VmLock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = defer.DeferredLock()
        self.users = 0


class Quiesce:
    """Freeze/thaw state of every VM, its automatic-thaw timers, and their serialisation.

    ``request(vm_id, payload, timeout)`` is the agent manager's round trip (reactor; a
    Deferred); ``clock`` runs the automatic-thaw timers. Reactor only (enforced).
    """

    log = Logger()

    def __init__(self, request: Request, clock: IReactorTime) -> None:
        self._request = request
        self._clock = clock
        self._freezes: dict[str, Freeze] = {}
        self._locks: dict[str, _VmLock] = {}

    def frozen(self, vm_id: str) -> Freeze | None:
        """The VM's active freeze, if any (reactor)."""
        return self._freezes.get(vm_id)

    @bridge.reactor_only
    def freeze(
        self, vm_id: str, request: agent_pb2.QuiesceFilesystemsRequest, timeout: float, hold_for: float
    ) -> defer.Deferred[Frozen]:
        """Freeze through the agent unless the VM is frozen already (then the reply says so,
        ``success=false``); on success remember the freeze and thaw it after ``hold_for``
        seconds unless :meth:`thaw` comes first. Agent failures fail the Deferred."""
        return self._serialised(vm_id, self._freeze, vm_id, request, timeout, hold_for)

    @bridge.reactor_only
    def thaw(
        self, vm_id: str, token: str, request: agent_pb2.ThawFilesystemsRequest, timeout: float
    ) -> defer.Deferred[agent_pb2.ThawFilesystemsResponse]:
        """Thaw the freeze ``token`` names: :class:`~quantix.errors.Invalid` when another freeze
        is active. A freeze we do not know (the daemon restarted) is passed on with ``token``:
        the agent checks its own. ``request``'s token is filled in here."""
        return self._serialised(vm_id, self._thaw, vm_id, token, request, timeout)

    # -- internals ----------------------------------------------------------------------------

    def _serialised(
        self, vm_id: str, func: Callable[P, defer.Deferred[T]], *args: P.args, **kwargs: P.kwargs
    ) -> defer.Deferred[T]:
        entry = self._locks.get(vm_id)
        if entry is None:
            entry = self._locks[vm_id] = _VmLock()
        entry.users += 1

        def release(result: object) -> object:
            entry.users -= 1
            if not entry.users:
                del self._locks[vm_id]
            return result

        d = entry.lock.run(func, *args, **kwargs)
        d.addBoth(release)  # passes the result (or failure) on unchanged
        return d

    @defer.inlineCallbacks
    def _freeze(
        self, vm_id: str, request: agent_pb2.QuiesceFilesystemsRequest, timeout: float, hold_for: float
    ) -> Generator[defer.Deferred[Message], Message, Frozen]:
        if vm_id in self._freezes:
            return Frozen(agent_pb2.QuiesceFilesystemsResponse(success=False, error=ALREADY_FROZEN))
        answer = yield self._request(vm_id, request, timeout)
        reply = expect(answer, agent_pb2.QuiesceFilesystemsResponse)
        if not reply.success:
            return Frozen(reply)
        token = reply.quiesce_token or str(uuid.uuid4())
        mounts = [f.mount_point for f in reply.frozen] or list(request.mount_points)
        timer = self._clock.callLater(hold_for, self._auto_thaw, vm_id, token)
        self._freezes[vm_id] = Freeze(token, reply.quiesce_token, mounts, timer)
        return Frozen(reply, token)

    def _claim(self, vm_id: str, token: str) -> Freeze | None:
        f = self._freezes.get(vm_id)
        if f is None:
            return None
        if token != f.token:
            raise Invalid("quiesce token does not match the active freeze")
        del self._freezes[vm_id]
        if f.timer.active():
            f.timer.cancel()
        return f

    def _thaw(
        self, vm_id: str, token: str, request: agent_pb2.ThawFilesystemsRequest, timeout: float
    ) -> defer.Deferred[agent_pb2.ThawFilesystemsResponse]:
        f = self._claim(vm_id, token)
        request.quiesce_token = f.agent_token if f is not None else token
        d = self._request(vm_id, request, timeout)
        return d.addCallback(lambda reply: expect(reply, agent_pb2.ThawFilesystemsResponse))

    def _auto_thaw(self, vm_id: str, token: str) -> defer.Deferred[Message | None]:
        return self._serialised(vm_id, self._auto_thaw_now, vm_id, token)

    def _auto_thaw_now(self, vm_id: str, token: str) -> defer.Deferred[Message | None]:
        f = self._freezes.get(vm_id)
        if f is None or f.token != token:
            return defer.succeed(None)  # thawed meanwhile
        del self._freezes[vm_id]
        msg = "auto-thawing filesystems of {vm}: no ThawFilesystems within the quiesce timeout"
        self.log.warn(msg, vm=vm_id)
        req = agent_pb2.ThawFilesystemsRequest(quiesce_token=f.agent_token, mount_points=f.mounts)
        d = self._request(vm_id, req, THAW_TIMEOUT)
        return d.addErrback(lambda fail: self.log.failure("automatic thaw of {vm} failed", fail, vm=vm_id))
