"""The local image scan reported to the control plane (research note C.1). Blocking: a worker.

Only ``storage.cloud_images``, not recursively: shared pool directories would make every node
report the same NFS file under its own id. Regular files with an image extension count; partial
downloads do not. Format and virtual size come from ``qemu-img info`` (so a raw ``.img`` is not
recorded as qcow2), remembered per (path, size, mtime) so a rescan costs one ``stat`` per file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import attrs

from quantix import errors
from quantix.images import qemu
from quantix.images.jobs import rfc3339

EXTENSIONS = (".qcow2", ".img", ".raw", ".iso", ".vmdk")
#: A directory with more files than this is reported in part (the first ones by name).
MAX_FILES = 10_000


@attrs.frozen
class LocalImage:
    path: str
    filename: str
    size_bytes: int
    virtual_size_bytes: int
    format: str
    modified_at: str


class Scanner:
    """``scan()`` lists ``directory``; instances keep the qemu-img cache between scans."""

    def __init__(self, directory: str, info: Callable[[str], qemu.ImageInfo] = qemu.info) -> None:
        self.directory = directory
        self._info = info
        self._cache: dict[tuple[str, int, int], tuple[str, int]] = {}

    def scan(self) -> list[LocalImage]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        out = []
        seen = set()
        for name in names[:MAX_FILES]:
            if not name.lower().endswith(EXTENSIONS) or name.startswith("."):
                continue
            path = os.path.join(self.directory, name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            key = (path, st.st_size, st.st_mtime_ns)
            seen.add(key)
            if key not in self._cache:
                self._cache[key] = self._probe(path, name, st.st_size)
            fmt, virtual = self._cache[key]
            out.append(LocalImage(path, name, st.st_size, virtual, fmt, rfc3339(st.st_mtime) or ""))
        self._cache = {k: v for k, v in self._cache.items() if k in seen}
        return out

    def _probe(self, path: str, name: str, size: int) -> tuple[str, int]:
        try:
            found = self._info(path)
            return found.format, found.virtual_size or size
        except errors.QuantixError:
            return name.rsplit(".", 1)[-1].lower(), size
