"""One lock per key (VM id, pool id), freed when nobody holds or waits for it.

Operations on one object run one after another while operations on different objects run in
parallel; a daemon that sees millions of ids over its life keeps only the locks in use.
For worker threads (blocking libvirt calls); the reactor never waits on these.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class KeyedLocks:
    """Reference-counted per-key locks: ``with locks.hold(key): ...``."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}

    @contextlib.contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        """Hold the lock of ``key`` for the ``with`` block (waiting for an earlier holder)."""
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _Entry()
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._guard:
                entry.users -= 1
                if not entry.users:
                    del self._entries[key]

    def __len__(self) -> int:
        """Keys currently held or waited for."""
        with self._guard:
            return len(self._entries)
