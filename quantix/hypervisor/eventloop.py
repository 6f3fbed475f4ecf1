"""libvirt event loop (minimal: libvirt's default loop in one thread, callbacks hop to the reactor)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import libvirt

_installed: ThreadEventLoop | None = None


class ThreadEventLoop:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def start(self) -> None:
        libvirt.virEventRegisterDefaultImpl()
        threading.Thread(target=self._run, name="libvirt-events", daemon=True).start()

    def _run(self) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()

    def dispatch(self, func: Callable[..., Any]) -> Callable[..., None]:
        def hop(*args: Any) -> None:
            self.reactor.callFromThread(func, *args)

        return hop


def install(kind: str, reactor: Any) -> ThreadEventLoop:
    global _installed
    if _installed is None:
        _installed = ThreadEventLoop(reactor)
        _installed.start()
    return _installed
