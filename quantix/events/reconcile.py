"""Pure reconciliation: the events that turn the state we know into the state libvirt reports.

Events can be missed while the libvirt connection is down, or when a domain is changed by a
client whose events never reached us. Comparing a full inventory with what the daemon last saw
recovers the transitions (with ``metadata["source"] = "reconcile"``), including domains defined
or undefined behind the daemon's back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import libvirt

from quantix.events import mapping as m

#: uuid -> (name, coarse state)
Inventory = Mapping[str, tuple[str, str]]
Change = tuple[int, str, str, dict[str, str]]

_ACTIVE = (m.RUNNING, m.PAUSED, m.SUSPENDED)


def _into(name: str, before: str, after: str) -> tuple[int, str] | None:
    """Event type and message for a domain that went from ``before`` to ``after``."""
    if after == m.RUNNING:
        if before in (m.PAUSED, m.SUSPENDED):
            return m.VM_RESUMED, f"VM {name} resumed"
        return m.VM_STARTED, f"VM {name} started"
    if after in (m.PAUSED, m.SUSPENDED):
        return m.VM_PAUSED, f"VM {name} paused"
    if after == m.STOPPED:
        return m.VM_STOPPED, f"VM {name} stopped"
    if after == m.CRASHED:
        return m.VM_CRASHED, f"VM {name} crashed"
    return None


def _meta(before: str | None, after: str | None, **extra: str) -> dict[str, str]:
    return {"source": "reconcile", "previous_state": before or "absent", "state": after or "absent", **extra}


def diff(known: Inventory, current: Inventory) -> list[Change]:
    """Events for every difference, in a stable order (by uuid)."""
    out: list[Change] = []
    for uuid in sorted(set(known) | set(current)):
        before = known.get(uuid)
        after = current.get(uuid)
        if before == after:
            continue
        if before is None:
            name, state = after  # type: ignore[misc]
            out.append((m.UNKNOWN, uuid, f"VM {name} defined", _meta(None, state, libvirt_event="defined")))
            if state != m.STOPPED:
                change = _into(name, m.STOPPED, state)
                if change:
                    out.append((change[0], uuid, change[1], _meta(None, state)))
            continue
        if after is None:
            name, state = before
            if state in _ACTIVE:
                out.append((m.VM_STOPPED, uuid, f"VM {name} stopped", _meta(state, None)))
            out.append(
                (m.UNKNOWN, uuid, f"VM {name} undefined", _meta(state, None, libvirt_event="undefined"))
            )
            continue
        if before[1] != after[1]:
            change = _into(after[0], before[1], after[1])
            if change:
                out.append((change[0], uuid, change[1], _meta(before[1], after[1])))
    return out


STATS = libvirt.VIR_DOMAIN_STATS_STATE


def inventory(conn: libvirt.virConnect) -> dict[str, tuple[str, str]]:
    """Blocking (worker thread): every domain's name and coarse state in one bulk call."""
    out: dict[str, tuple[str, str]] = {}
    try:
        records: Iterable[tuple[libvirt.virDomain, dict[str, int]]] = conn.getAllDomainStats(STATS, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
            raise
        records = []
        for dom in conn.listAllDomains(0):
            state, reason = dom.state()
            records.append((dom, {"state.state": state, "state.reason": reason}))
    for dom, stats in records:
        state = m.coarse_state(stats.get("state.state", -1), stats.get("state.reason", 0))
        out[dom.UUIDString()] = (dom.name(), state)
    return out
