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
            "--metrics-listen",
        ):
            self.assertIn(flag, result.stdout)
        self.assertIn("0.0.0.0:9090", result.stdout)

    def test_version_names_daemon_proto_and_libvirt(self):
        import libvirt

        from quantix import __version__
        from quantix.proto import codegen

        result = twistd("quantix-node", "--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
        self.assertEqual(lines["quantix-node"].strip(), __version__)
        self.assertEqual(lines["proto fingerprint"].strip(), codegen.fingerprint(codegen.source_root()))
        major = libvirt.getVersion() // 1_000_000
        self.assertRegex(lines["libvirt"].strip(), rf"^{major}\.\d+\.\d+$")

    def test_only_given_flags(self):
        opts = Options()
        opts.parseOptions(["--listen", "127.0.0.1:1234", "--register"])
        self.assertEqual(opts.given(), {"listen": "127.0.0.1:1234", "register": True})

    def test_metrics_listen_flag(self):
        from quantix.plugin import load_config

        for value, expected in (("127.0.0.1:9999", "127.0.0.1:9999"), ("off", None)):
            opts = Options()
            opts.parseOptions(["--config", os.devnull, "--metrics-listen", value])
            self.assertEqual(load_config(opts, environ={}).server.metrics_listen, expected)

    def busy_port(self) -> int:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        return busy.getsockname()[1]

    def start_on(self, listen: str, metrics: str) -> subprocess.CompletedProcess:
        state = os.path.abspath(self.mktemp())
        config = state + ".yaml"  # no 8080 listener: another run on this host may hold the port
        with open(config, "w") as fh:
            fh.write("http:\n  listen: null\n")
        return twistd(
            "-n",
            "--pidfile=",
            "--logfile=-",
            "quantix-node",
            "--libvirt-uri",
            "test:///default",
            "--listen",
            listen,
            "--metrics-listen",
            metrics,
            "--state-dir",
            state,
            "--config",
            config,
        )

    def test_port_in_use_is_one_line(self):
        port = self.busy_port()
        result = self.start_on(f"127.0.0.1:{port}", "off")
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(
            result.stderr.strip(),
            f"quantix-node: gRPC listener: cannot listen on 127.0.0.1:{port}: address already in use"
            " (choose another with --listen HOST:PORT or listen_address)",
        )
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_metrics_port_in_use_names_the_listener_and_the_flag(self):
        """A second daemon on the same host meets the metrics port first (it binds before gRPC)."""
        port = self.busy_port()
        result = self.start_on("127.0.0.1:0", f"127.0.0.1:{port}")
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip().splitlines(), [result.stderr.strip()])
        busy = f"metrics listener: cannot listen on 127.0.0.1:{port}: address already in use"
        self.assertIn(busy, result.stderr)
        self.assertIn("--metrics-listen", result.stderr)
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
