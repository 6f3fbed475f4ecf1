"""Every box's RPC handler class, in one list the server builds its method table from."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quantix.rpc.registry import collect


def handler_classes() -> list[type]:
    from quantix.rpc.agent_rpcs import AgentRpcs
    from quantix.rpc.event_rpcs import EventRpcs
    from quantix.rpc.node_rpcs import NodeRpcs
    from quantix.rpc.storage_rpcs import StorageRpcs
    from quantix.rpc.vm_rpcs import VmRpcs

    return [NodeRpcs, AgentRpcs, StorageRpcs, EventRpcs, VmRpcs]


def build(node: Any) -> dict[str, Callable[..., Any]]:
    from quantix.rpc.network_rpcs import NetworkRpcs

    return collect([*(cls(node) for cls in handler_classes()), NetworkRpcs(node.network)])
