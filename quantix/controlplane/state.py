"""What the link remembers across restarts: the node id and the pools it was assigned."""

from __future__ import annotations

import json
from pathlib import Path

import attrs

from quantix.util.files import atomic_write

FILENAME = "controlplane.json"


@attrs.frozen
class LinkState:
    # The control plane the id came from: an id from another control plane means nothing.
    control_plane: str = ""
    node_id: str = ""
    pools: tuple[str, ...] = ()


def load(state_dir: str | Path, control_plane: str) -> LinkState:
    """The stored state for ``control_plane``; empty when missing, unreadable or for another one."""
    try:
        doc = json.loads((Path(state_dir) / FILENAME).read_text())
    except (OSError, ValueError):
        return LinkState(control_plane=control_plane)
    if not isinstance(doc, dict) or doc.get("control_plane") != control_plane:
        return LinkState(control_plane=control_plane)
    pools = doc.get("pools") or []
    return LinkState(
        control_plane=control_plane,
        node_id=str(doc.get("node_id") or ""),
        pools=tuple(str(p) for p in pools) if isinstance(pools, list) else (),
    )


def save(state_dir: str | Path, state: LinkState) -> None:
    """Replace the state file atomically: a crash leaves the old file or the new one, never half."""
    body = json.dumps(
        {"control_plane": state.control_plane, "node_id": state.node_id, "pools": list(state.pools)},
        indent=2,
    )
    atomic_write(Path(state_dir) / FILENAME, body + "\n")
