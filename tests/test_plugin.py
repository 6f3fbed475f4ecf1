"""The twistd plugin is discoverable, lists its options, and a busy port fails with one line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial import unittest

from quantix.plugin import Options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twistd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class PluginTests(unittest.TestCase):
    def test_discovered(self):
        tapnames = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("quantix-node", tapnames)

    def test_options_listed_in_help(self):
        result = twistd("quantix-node", "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        for flag in (
            "--listen",
            "--config",
            "--libvirt-uri",
            "--control-plane",
            "--register",
            "--node-id",
            "--state-dir",
            "--agent-socket-dir",
            "--log-level",
        ):
            self.assertIn(flag, result.stdout)
        self.assertIn("0.0.0.0:9090", result.stdout)

    def test_only_given_flags(self):
        opts = Options()
        opts.parseOptions(["--listen", "127.0.0.1:1234", "--register"])
        self.assertEqual(opts.given(), {"listen": "127.0.0.1:1234", "register": True})

    def test_port_in_use_is_one_line(self):
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        state = os.path.abspath(self.mktemp())
        result = twistd(
            "-n",
            "--pidfile=",
            "--logfile=-",
            "quantix-node",
            "--libvirt-uri",
            "test:///default",
            "--listen",
            f"127.0.0.1:{port}",
            "--state-dir",
            state,
            "--config",
            os.devnull,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.strip(), f"quantix-node: cannot listen on 127.0.0.1:{port}: address already in use"
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_bad_config_is_one_line(self):
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as fh:
            fh.write("hypervisor:\n  type: xen\n")
        result = twistd("-n", "--pidfile=", "quantix-node", "--config", path)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip().splitlines(), [result.stderr.strip()])
        self.assertIn(f"{path}: key hypervisor.type", result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
