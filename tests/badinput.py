"""Hostile values and helpers for the bad-input table (``tests/test_bad_input.py``).

Every value that names something carries a per-run marker, so a file created from it anywhere
on the host is recognisable even in directories other tests write to at the same time.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import grpc

MARK = f"qtxbad{uuid.uuid4().hex[:8]}"
#: Well-formed UUIDs no VM, pool or volume has.
UNKNOWN = str(uuid.uuid4())
BIG = MARK + "x" * (1024 * 1024)  # a 1 MiB string
XML = f"{MARK}<>&'\"]]>"  # XML metacharacters and the CDATA end
DOTS = f"../../../{MARK}"
ABS = f"/tmp/{MARK}"
NUL = f"{MARK}\x00x"  # NUL: no C string (libvirt, the OS) can carry it
CTRL = f"{MARK}\n\x1b[2J"  # newline and an escape sequence
U64 = 2**64 - 1
U32 = 2**32 - 1
BAD_ENUM = 999

RUNNING = "11111111-2222-3333-4444-555555555555"
STOPPED = "66666666-7777-8888-9999-000000000000"

TRACEBACK_SIGNS = ("Traceback", 'File "')


def fresh_id() -> str:
    """A new UUID for a VM a row creates; its text is a marker too (ids become file names)."""
    return str(uuid.uuid4())


def outcome_unary(stub: Any, method: str, request: Any, metadata: Any = None) -> tuple[grpc.StatusCode, str]:
    """(code, details) of one blocking unary call; OK with an empty message on success."""
    try:
        getattr(stub, method)(request, metadata=metadata, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def outcome_stream(
    stub: Any, method: str, request: Any, metadata: Any = None, settle: float = 0.3
) -> tuple[grpc.StatusCode, str]:
    """A server stream still open after ``settle`` seconds counts as OK (it never ends normally);
    an error status before that is the outcome; a stream that ends by itself is reported."""
    call = getattr(stub, method)(request, metadata=metadata, timeout=30)
    timer = threading.Timer(settle, call.cancel)
    timer.start()
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK, ""
        return exc.code(), exc.details() or ""
    finally:
        timer.cancel()
    return grpc.StatusCode.OK, "stream ended"


def raw_outcome(
    channel: grpc.Channel, path: str, payload: bytes, streaming: bool
) -> tuple[grpc.StatusCode, str]:
    """Send bytes that are not a valid protobuf message to a method."""
    ident = lambda b: b  # noqa: E731
    if streaming:
        call = channel.unary_stream(path, request_serializer=ident, response_deserializer=ident)
        try:
            for _ in call(payload, timeout=30):
                break
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""
    call = channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
    try:
        call(payload, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# -- writes outside the configured directories ------------------------------------------------

#: Shared directories: only entries carrying one of the run's markers count (other processes
#: write here too). Listed one level deep.
SHARED_ROOTS = ("/tmp", "/var/tmp", "/dev/shm")
#: Directories the daemon has no business writing to in these tests: any new entry counts.
#: Walked recursively (they are small or absent).
PRIVATE_ROOTS = (
    "/var/lib/limiquantix",
    "/var/run/quantix-kvm",
    "/etc/limiquantix",
    "/var/log/limiquantix",
)


def _walk(root: str, depth: int) -> set[str]:
    out: set[str] = set()
    if not os.path.isdir(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel_depth = dirpath[len(root) :].count(os.sep)
        for name in dirnames + filenames:
            out.add(os.path.join(dirpath, name))
        if rel_depth + 1 >= depth:
            dirnames[:] = []
    return out


def snapshot(*extra_shared: str) -> tuple[set[str], set[str]]:
    """(shared entries, private entries); ``extra_shared`` adds e.g. the working directory."""
    shared = set().union(*(_walk(r, 1) for r in (*SHARED_ROOTS, *extra_shared)))
    private = set().union(*(_walk(r, 50) for r in PRIVATE_ROOTS))
    return shared, private


def new_outside(before: tuple[set[str], set[str]], after: tuple[set[str], set[str]], markers: Iterable[str]):
    """Entries that appeared outside the daemon's own temp root."""
    marks = tuple(markers)
    shared = {p for p in after[0] - before[0] if any(m in p for m in marks)}
    private = after[1] - before[1]
    return sorted(shared | private)
