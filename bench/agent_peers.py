"""Serve N reference guest agents (tests/guestpeer.py) on UNIX sockets: the guest side for benches.

usage: agent_peers.py DIR COUNT TELEMETRY_SECONDS   (sockets: DIR/<n>.agent.sock; prints "ready")
"""

from __future__ import annotations

import os
import sys

import common  # noqa: F401  (puts the checkout on sys.path)
from twisted.internet import reactor

from tests.guestpeer import GuestPeer


def main() -> None:
    directory, count, telemetry = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    for n in range(count):
        path = os.path.join(directory, f"vm-{n:04d}.agent.sock")
        reactor.listenUNIX(path, GuestPeer(reactor, telemetry_interval=telemetry or None), backlog=1024)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
