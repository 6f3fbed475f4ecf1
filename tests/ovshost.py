"""A private host with Open vSwitch: ovsdb-server, ovs-vswitchd (userspace ``netdev`` datapath, no
kernel module) and a libvirtd, all in one new mount and network namespace.

libvirt plugs ``<virtualport type='openvswitch'>`` taps by running ``ovs-vsctl`` against the
default database socket, and ovs-vswitchd must see those taps: so both live in the namespace,
where ``/run/openvswitch`` is a private directory. From outside, the database socket is at
:attr:`db_socket` and libvirt at :attr:`uri`. Nothing reaches the host's network or the shared
libvirtd; stopping the host ends every process it started, and the namespace with them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from tests.privlibvirtd import PrivateLibvirtd, _unavailable

RUN = "/run/openvswitch"
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
BRIDGE = "br-int"


class OvsHost(PrivateLibvirtd):
    def __init__(self) -> None:
        for tool in ("ovsdb-server", "ovs-vswitchd", "ovsdb-tool", "ovs-vsctl", "ip"):
            if shutil.which(tool) is None:
                _unavailable(f"Open vSwitch cannot start: {tool} is not installed")
        if not os.path.exists(SCHEMA):
            _unavailable(f"Open vSwitch cannot start: {SCHEMA} is missing")
        daemon = f"--pidfile --detach --no-chdir --log-file={RUN}/%s.log"
        prelude = " && ".join(
            [
                "ip link set lo up",
                f"ovsdb-tool create {RUN}/conf.db {SCHEMA}",
                f"ovsdb-server {RUN}/conf.db --remote=punix:{RUN}/db.sock {daemon % 'ovsdb-server'}",
                "ovs-vsctl --no-wait init",
                f"ovs-vswitchd {daemon % 'ovs-vswitchd'}",
                f"ovs-vsctl --timeout=10 add-br {BRIDGE} -- set bridge {BRIDGE} datapath_type=netdev",
            ]
        )
        super().__init__(extra_mounts=(RUN,), netns=True, prelude=prelude)
        self.db_socket = os.path.join(self.outside(RUN), "db.sock")

    def vsctl(self, *args: str) -> str:
        """``ovs-vsctl`` against this host's database (from outside the namespace)."""
        out = subprocess.run(
            ["ovs-vsctl", f"--db=unix:{self.db_socket}", "--timeout=10", *args],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def stop_ovsdb(self) -> None:
        """Stop ovsdb-server alone (the database going away under a running daemon)."""
        self._signal("ovsdb-server", signal.SIGTERM)

    def start_ovsdb(self) -> None:
        """Start ovsdb-server again on the same database and socket."""
        run = self.outside(RUN)
        subprocess.run(
            [
                "ovsdb-server",
                f"{run}/conf.db",
                f"--remote=punix:{run}/db.sock",
                f"--pidfile={run}/ovsdb-server.pid",
                f"--unixctl={run}/ovsdb-server.ctl",
                "--detach",
                "--no-chdir",
                f"--log-file={run}/ovsdb-server.log",
            ],
            check=True,
            capture_output=True,
        )

    def _signal(self, name: str, sig: int) -> None:
        try:
            with open(os.path.join(self.outside(RUN), f"{name}.pid")) as fh:
                os.kill(int(fh.read().strip()), sig)
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        for name in ("ovs-vswitchd", "ovsdb-server"):
            self._signal(name, signal.SIGTERM)
        super().stop()
