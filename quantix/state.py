"""Small persistent facts kept in the state directory (node id, control-plane id)."""

from __future__ import annotations

import uuid
from pathlib import Path

from quantix.util.files import atomic_write


def ensure_dir(path: str) -> Path:
    """Create the state directory (0700: it holds identities) if it is missing."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    return p


def read_text(path: Path) -> str | None:
    try:
        value = path.read_text().strip()
    except FileNotFoundError:
        return None
    return value or None


def node_id(state_dir: str, override: str | None = None) -> str:
    """The node's id: the override if given, else the persisted one, else a new persisted UUID."""
    if override:
        return override
    path = ensure_dir(state_dir) / "node-id"
    existing = read_text(path)
    if existing:
        return existing
    new = str(uuid.uuid4())
    atomic_write(path, new + "\n")
    return new
