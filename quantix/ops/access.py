"""One access-log line per RPC, at debug level, with the fields an operator filters on."""

from __future__ import annotations

import grpc
from twisted.logger import Logger

log = Logger(namespace="quantix.access")


def vm_id_of(request: object) -> str:
    """The request's ``vm_id`` when its message type has one (most VM RPCs do)."""
    try:
        value = getattr(request, "vm_id", "")
    except Exception:  # a request that failed to decode is None; be defensive anyway
        return ""
    return value if isinstance(value, str) else ""


def log_rpc(method: str, code: grpc.StatusCode, seconds: float, peer: str, request: object = None) -> None:
    """A request observer (:meth:`quantix.rpc.status.RpcObservers.add_with_request`): fields
    ``method``, ``code`` (name), ``duration`` (seconds), ``peer`` and, when the request names
    one, ``vm_id``."""
    fields = {"method": method, "code": code.name, "duration": round(seconds, 6), "peer": peer}
    vm_id = vm_id_of(request)
    if vm_id:
        log.debug("{method} {code} {duration:.3f}s peer={peer} vm_id={vm_id}", vm_id=vm_id, **fields)
    else:
        log.debug("{method} {code} {duration:.3f}s peer={peer}", **fields)
