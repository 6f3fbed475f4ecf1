"""Idle memory: a plain start imports nothing its configuration does not use.

The daemon is built and started the way twistd does it (the plugin's options and
``make_service``) in a child process with ``--libvirt-uri test:///default``; once it serves, the
child reports which of the heavy optional modules were imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from tests.support import HERE

ROOT = os.path.dirname(HERE)

#: Used only by what a plain start does not configure or do: the cloud-init ISO builder (CreateVM
#: with cloud-init), the control-plane client (--register), the metrics endpoint
#: (server.metrics_listen), the HTTP client of image downloads (the first download), the web
#: server of the 8080 and 8443 listeners (both off here).
UNUSED = (
    "pycdlib",
    "treq",
    "twisted.web.client",
    "twisted.web.server",
    "twisted.web.http",
    "quantix.web.listener",
    "quantix.controlplane.connect",
    "quantix.controlplane.sources",
    "prometheus_client",
)

CHILD = """
import json, os, sys
from twisted.internet import reactor
from quantix.plugin import Options, make_service

options = Options()
options.parseOptions(sys.argv[1:])
node = make_service(options)
node.startService()

def report():
    print(json.dumps({"serving": node.grpc.port is not None,
                      "loaded": sorted(m for m in json.loads(os.environ["UNUSED"]) if m in sys.modules)}))
    reactor.stop()

reactor.callLater(1.0, report)
reactor.run()
"""


class LeanStartTests(unittest.TestCase):
    def test_plain_start_does_not_import_unused_features(self):
        tmp = tempfile.mkdtemp(prefix="qtx-lean-")
        self.addCleanup(__import__("shutil").rmtree, tmp, True)
        env = dict(
            os.environ,
            PYTHONPATH=ROOT,
            QUANTIX_SERVER_METRICS_LISTEN="",
            # Off: then nothing of the web server is imported (and the fixed default ports are
            # not taken from another test run).
            QUANTIX_HTTP_LISTEN="",
            QUANTIX_HTTPS_LISTEN="",
            UNUSED=json.dumps(UNUSED),
        )
        args = [
            "--listen", "127.0.0.1:0", "--libvirt-uri", "test:///default", "--config", os.devnull,
            "--state-dir", os.path.join(tmp, "state"), "--agent-socket-dir", os.path.join(tmp, "agents"),
        ]  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", CHILD, *args], env=env, cwd=tmp, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        report = json.loads(out.stdout.strip().splitlines()[-1])
        self.assertTrue(report["serving"])
        self.assertEqual(report["loaded"], [])
