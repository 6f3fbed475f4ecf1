"""The agent box as gRPC handlers see it: worker-thread calls, run on the reactor.

:class:`~quantix.agent.manager.AgentManager` and the quiesce owner
(:class:`~quantix.agent.quiesce.Quiesce`) are reactor-only; a handler in a gRPC worker thread
reaches them through :class:`WorkerAgents`, which makes every hop through :mod:`quantix.bridge`.
"""

from __future__ import annotations

from google.protobuf.message import Message
from twisted.internet.interfaces import IReactorFromThreads

from quantix import bridge
from quantix.agent.guestinfo import GuestInfo
from quantix.agent.manager import AgentManager
from quantix.agent.quiesce import Frozen, Quiesce
from quantix.proto import agent_pb2


class WorkerAgents:
    """:class:`quantix.facades.GuestAgents` over one manager and the reactor that runs it."""

    def __init__(self, reactor: IReactorFromThreads, manager: AgentManager, quiesce: Quiesce) -> None:
        self._reactor = reactor
        self._manager = manager
        self._quiesce = quiesce

    def request(self, vm_id: str, payload: Message, timeout: float) -> Message:
        """Worker: one round trip to the VM's agent; blocks this thread, not the reactor."""
        return bridge.call_on_reactor(self._reactor, self._manager.request, vm_id, payload, timeout)

    def info(self, vm_id: str) -> GuestInfo:
        """Any thread: read without a reactor hop. The cache is written only on the reactor, by
        replacing field values (never mutating them), so a reader here sees each field whole,
        old or new; that is all a status snapshot needs."""
        return self._manager.info(vm_id)

    def freeze(
        self, vm_id: str, request: agent_pb2.QuiesceFilesystemsRequest, timeout: float, hold_for: float
    ) -> Frozen:
        """Worker: :meth:`Quiesce.freeze` (serialised per VM, auto-thaw after ``hold_for``)."""
        return bridge.call_on_reactor(self._reactor, self._quiesce.freeze, vm_id, request, timeout, hold_for)

    def thaw(
        self, vm_id: str, token: str, request: agent_pb2.ThawFilesystemsRequest, timeout: float
    ) -> agent_pb2.ThawFilesystemsResponse:
        """Worker: :meth:`Quiesce.thaw` of the freeze ``token`` names."""
        return bridge.call_on_reactor(self._reactor, self._quiesce.thaw, vm_id, token, request, timeout)
