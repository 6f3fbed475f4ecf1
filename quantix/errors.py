"""Domain errors raised by every box; :mod:`quantix.rpc.status` maps each to one gRPC code.

Boxes never import grpc to report a failure: they raise one of these, so the mapping to status
codes lives in exactly one table.
"""

from __future__ import annotations


class QuantixError(Exception):
    """Base class: the message is safe to show to a client."""


class NotFound(QuantixError):
    """A VM, pool, volume, snapshot or file does not exist."""


class VMNotFound(NotFound):
    """Missing VM; the control plane matches on the text "VM not found"."""

    def __init__(self, vm_id: str) -> None:
        super().__init__(f"VM not found: {vm_id}")
        self.vm_id = vm_id


class AlreadyExists(QuantixError):
    """Something with that id exists and differs from what was asked for."""


class WrongState(QuantixError):
    """The object exists but is in a state that forbids the operation."""


class Invalid(QuantixError):
    """The request itself is malformed."""


class HypervisorDown(QuantixError):
    """libvirt is not connected right now."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("hypervisor unavailable" + (f": {detail}" if detail else ""))


class Unavailable(QuantixError):
    """A dependency other than libvirt (a guest agent, a remote storage server) cannot be reached."""


class Timeout(QuantixError):
    """The operation did not finish within its deadline; nothing was rolled back."""


class ResourceExhausted(QuantixError):
    """A bounded resource (a subscriber queue, a limit) overflowed."""


class Unsupported(QuantixError):
    """The operation exists in the contract but this node cannot perform it."""
