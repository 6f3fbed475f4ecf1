"""Answers for the control plane's host update dashboard (``/api/v1/updates/*`` on 8443).

The node has no update source of its own (it is installed as a wheel or a distribution package
and updated by those means), so the answers say exactly that: nothing available, the running
version, ``idle``, and ``apply`` refused with a reason, in the shapes the control plane decodes.
"""

from __future__ import annotations

import quantix
from quantix.util.jsontypes import JsonObject

NO_SOURCE = (
    "this node has no update source: update the quantix-node package with the host's package "
    "manager (or pip), then restart the daemon"
)


def version(hostname: str, channel: str) -> JsonObject:
    """``updates/version``."""
    return {"currentVersion": quantix.__version__, "channel": channel, "hostname": hostname}


def check(channel: str) -> JsonObject:
    """``updates/check``: nothing available (no ``latestVersion``, which the control plane needs)."""
    return {
        "available": False,
        "currentVersion": quantix.__version__,
        "channel": channel,
        "components": [],
        "fullImageAvailable": False,
        "totalDownloadSize": 0,
    }


def status() -> JsonObject:
    """``updates/status``."""
    return {"status": "idle", "message": "no update source is configured on this node"}


class UpdateUnsupported(Exception):
    """``updates/apply`` without an update source: 501 ``not_supported``."""

    code = "not_supported"
    status = 501

    def __init__(self) -> None:
        super().__init__(NO_SOURCE)
