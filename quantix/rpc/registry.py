"""Declare RPC handlers on plain classes; the server builds grpc method handlers from them.

A box's handler class marks methods with ``@rpc("MethodName")``. Each method takes
``(request, context)`` and returns the response message (or yields them, for a streaming RPC).
It raises :mod:`quantix.errors` exceptions for failures; it never calls ``context.abort``
itself, so every RPC shares one error map, one access log and one metrics hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])
_ATTR = "__quantix_rpc__"


def rpc(name: str) -> Callable[[F], F]:
    """Mark a method as the handler of the ``NodeDaemonService`` RPC ``name``."""

    def mark(func: F) -> F:
        setattr(func, _ATTR, name)
        return func

    return mark


def collect(objects: Iterable[object]) -> dict[str, Callable[..., object]]:
    """Map RPC name to bound handler over all ``objects``; a name claimed twice is a bug."""
    found: dict[str, Callable[..., object]] = {}
    for obj in objects:
        for attr in dir(type(obj)):
            name = getattr(getattr(type(obj), attr), _ATTR, None)
            if name is None:
                continue
            if name in found:
                raise ValueError(f"RPC {name} has two handlers")
            found[name] = getattr(obj, attr)
    return found
