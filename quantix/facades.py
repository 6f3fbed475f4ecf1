"""The typed seams between boxes: what a handler class or another box may ask of a box.

:mod:`quantix.node` builds the boxes and hands each consumer exactly the facades it uses; a test
builds the same facades from real parts, or from a small explicit fake that satisfies the
protocol. Each method says where it runs:

- *any thread*: safe from the reactor and from worker threads;
- *worker*: blocks (libvirt, files, or a wait on the reactor); call it from a gRPC or pool
  thread, never from the reactor;
- *reactor*: touches reactor-owned state; enforced with :func:`quantix.bridge.reactor_only`.

Hops between the two sides happen only in :mod:`quantix.bridge`.

The storage box's facade is the concrete
:class:`~quantix.hypervisor.storage.manager.StorageManager` (every method: worker), and the
host-facts box's is :class:`~quantix.hypervisor.hostinfo.HostBox`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import libvirt
    from google.protobuf.message import Message

    from quantix.agent.guestinfo import GuestInfo
    from quantix.agent.quiesce import Frozen
    from quantix.events.bus import Published
    from quantix.hypervisor.connection import HypervisorIdentity
    from quantix.proto import agent_pb2


class VmHost(Protocol):
    """The hypervisor box: the supervised libvirt connection
    (:class:`quantix.hypervisor.connection.Hypervisor`). Any thread."""

    @property
    def uri(self) -> str: ...

    @property
    def identity(self) -> HypervisorIdentity | None:
        """Facts of the current (or last) connection; None before the first one."""

    @property
    def connected(self) -> bool: ...

    def conn(self) -> libvirt.virConnect:
        """The live connection, or :class:`~quantix.errors.HypervisorDown`."""


class GuestAgents(Protocol):
    """The agent box as a gRPC handler sees it (:class:`quantix.agent.facade.WorkerAgents`)."""

    def request(self, vm_id: str, payload: Message, timeout: float) -> Message:
        """Worker: one agent round trip; the reply payload, or a :class:`~quantix.errors.QuantixError`."""

    def info(self, vm_id: str) -> GuestInfo:
        """Any thread: the guest-info snapshot (fields are replaced whole, never mutated)."""

    def freeze(
        self, vm_id: str, request: agent_pb2.QuiesceFilesystemsRequest, timeout: float, hold_for: float
    ) -> Frozen:
        """Worker: freeze the guest's filesystems through the one quiesce owner; refused
        (``success=false``) while the VM is frozen; thawed automatically after ``hold_for``."""

    def thaw(
        self, vm_id: str, token: str, request: agent_pb2.ThawFilesystemsRequest, timeout: float
    ) -> agent_pb2.ThawFilesystemsResponse:
        """Worker: thaw the freeze ``token`` names (:class:`~quantix.errors.Invalid` for another)."""


class Subscription(Protocol):
    def events(self, is_active: Callable[[], bool], poll: float) -> Iterator[Published]:
        """Worker: blocking iterator over the subscriber's events until ``is_active()`` is false."""

    def cancel(self) -> None:
        """Any thread: end the subscription (the client went away)."""


class EventFeed(Protocol):
    """The event box (:class:`quantix.events.bus.EventBus`) as handlers use it."""

    #: Set while the bus is closed (shutdown): streams end with UNAVAILABLE.
    closed: threading.Event

    def publish_from_thread(
        self, event_type: int, vm_id: str, message: str, metadata: dict[str, str] | None = None
    ) -> None:
        """Any thread: publish on the reactor, in order with libvirt's events."""

    def subscribe(self, resume_after: int | None = None) -> Subscription:
        """Any thread: a new subscriber, replaying buffered events after ``resume_after``."""


class ControlPlaneStatus(Protocol):
    """The control-plane link (:class:`quantix.controlplane.link.ControlPlaneLink`), read by metrics."""

    #: Registered with the control plane (reactor-owned; read as a whole value).
    registered: bool
